"""config-diff: what each phase really runs with, beside a reference, as a tree.

Reference: the settings every phase shares (the schema's defaults <- train.defaults) or, with
--against, the same phase in another config. Markers: changed (differs from the reference),
new (the reference has no such key), default (nobody set it: the schema's default for the phase), same.
"""
from __future__ import annotations

import json

import yaml

from .settings import PHASES, PHASE_DEFAULTS, TRAIN_DEFAULTS, filled, merge, phase_settings

MARK = {"changed": "[yellow]~ changed[/]", "new": "[green]+ new[/]", "default": "[dim]· default[/]",
        "same": "= same"}


def load_config(paths: list) -> dict:
    cfg = {}
    for p in paths:
        with open(p) as f:
            cfg = merge(cfg, yaml.safe_load(f) or {})
    return cfg


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff(cfg: dict, against: dict | None = None) -> dict:
    shared = flatten(filled(merge(TRAIN_DEFAULTS, cfg.get("train", {}).get("defaults"))))
    result = {}
    for phase in PHASES:
        eff = flatten(phase_settings(cfg, phase))
        ref = flatten(phase_settings(against, phase)) if against is not None else shared
        code = flatten(filled(merge(TRAIN_DEFAULTS, PHASE_DEFAULTS[phase])))
        rows = {}
        for k, v in eff.items():
            if k not in ref:
                status = "new"
            elif ref[k] != v:
                status = "changed"
            elif code.get(k) == v:
                status = "default"
            else:
                status = "same"
            rows[k] = {"value": v, "reference": ref.get(k), "status": status}
        result[phase] = rows
    return result


def show(result: dict, reference_name: str, all_keys: bool = False) -> None:
    from rich.tree import Tree
    from .ui import console
    root = Tree(f"[bold]effective settings per phase[/] (reference: {reference_name})")
    for phase, rows in result.items():
        node = root.add(f"[bold]{phase}[/]")
        for k, r in rows.items():
            if r["status"] in ("changed", "new") or all_keys:
                ref = "" if r["status"] in ("default", "same", "new") else f"  (was {json.dumps(r['reference'])})"
                node.add(f"{k}: {json.dumps(r['value'])}  {MARK[r['status']]}{ref}")
        quiet = sum(r["status"] in ("default", "same") for r in rows.values())
        if not all_keys and quiet:
            node.add(f"[dim]{quiet} more settings as in the reference (--all shows them)[/]")
    console.print(root)
