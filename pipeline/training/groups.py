"""What trains in a phase: the optimizer's parameter groups from the phase's `groups` patterns,
everything else frozen; and the parse-time check of every phase's patterns (and LoRA targets)
against the model's parameter names."""
from __future__ import annotations

from fnmatch import fnmatchcase

import torch

from ..model import codecs
from ..model.lora import LoRAConfig, apply_lora
from ..settings import GROUP_DEFAULTS


def matches(name: str, pattern: str) -> bool:
    """A group pattern covers a parameter directly or as a module prefix (fnmatch)."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def param_groups(model, groups: list, lr: float):
    """Optimizer param groups from the phase's groups; everything else frozen.

    A pattern matches a parameter name with fnmatch, directly or as a module prefix
    ("decoder.new_block" covers "decoder.new_block.*"). A pattern matching nothing, a parameter
    matched by two patterns, or a trainable parameter of the codec's frozen parts (its family's
    FROZEN prefixes: the encoder and quantizer, for Mimi also its encoder transformer and
    downsampling) is a config error."""
    groups = [{**GROUP_DEFAULTS, **g} for g in groups]       # trainable, lr_factor: the schema's defaults
    owner, counts, out = {}, [], []
    names = [n for n, _ in model.named_parameters()]
    for g in groups:
        pat = g["pattern"]
        hits = [n for n in names if matches(n, pat)]
        if not hits:
            raise ValueError(f"group pattern {pat!r} matches no parameter")
        for n in hits:
            if n in owner:
                raise ValueError(f"group patterns {owner[n]!r} and {pat!r} overlap (both match {n})")
            owner[n] = pat
        frozen = [n for n in hits if n.startswith(model.FROZEN)]
        if g["trainable"] and frozen:
            raise ValueError(f"group pattern {pat!r} would train {frozen[0]}: the codec's encoder side "
                             f"({', '.join(p.rstrip('.') for p in model.FROZEN)}) stays frozen, so that the codes keep "
                             "their meaning")
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    for g in groups:
        mine = [n for n, pat in owner.items() if pat == g["pattern"]]
        trainable, factor = g["trainable"], float(g["lr_factor"])
        counts.append({"pattern": g["pattern"], "params": sum(params[n].numel() for n in mine),
                       "trainable": trainable, "lr_factor": factor})
        if trainable:
            for n in mine:
                params[n].requires_grad_(True)
            out.append({"params": [params[n] for n in mine], "lr": lr * factor, "name": g["pattern"]})
    rest = sum(p.numel() for n, p in params.items() if n not in owner)
    counts.append({"pattern": "(no group)", "params": rest, "trainable": False, "lr_factor": 0.0})
    return out, counts


def lora_config(s: dict) -> LoRAConfig:
    """A phase's `lora` settings as a LoRAConfig (`enabled` is the phase's, not the adapter's)."""
    return LoRAConfig(**{k: v for k, v in s["lora"].items() if k != "enabled"})


def check_phase_groups(codec_config: dict, target_rate: int, phases: dict, n_q: int | None = None) -> None:
    """Check every phase's groups (and LoRA targets) against the model's parameter names without
    weights (meta device): the Snakefile calls this at parse time, so a bad pattern in the last
    phase fails before the first phase trains. Raises ValueError naming the phase and pattern."""
    for name, s in phases.items():
        try:
            with torch.device("meta"):
                model = codecs.model_from_config(codec_config, target_rate, n_q)
                if s["lora"]["enabled"]:
                    apply_lora(model, lora_config(s))
            param_groups(model, s["groups"], s["lr"])
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
