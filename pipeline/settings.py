"""Effective settings of each job, computed from the config (no torch import: the Snakefile
uses this at parse time, and what it returns is what Snakemake records as `params`).

A phase's settings are: code defaults <- `train.defaults` <- `train.<phase>`. Passing the
merged dict as a param means changing one phase's hyperparameter reruns exactly that phase (and,
through their inputs, the phases after it).
"""
from __future__ import annotations

import copy

PHASES = ("warmup", "full", "lora")

PRECOMPUTE_DEFAULTS = {"target_rate": 48000, "min_seconds": 0.5, "low_rate_policy": "reject", "bwe_model": None,
                       "batch_seconds": 64.0, "window_seconds": 600.0, "device": "auto", "resample_quality": "HQ"}

TRAIN_DEFAULTS = {
    "steps": 1000, "batch_size": 32, "grad_accum": 1, "segment_seconds": 4.0,
    "lr": 1e-5, "lr_min_ratio": 0.1, "warmup_steps": 100, "betas": [0.8, 0.99],
    "weight_decay": 0.01, "grad_clip": 1.0, "seed": 0,
    "val_every": 200, "val_batches": 8, "ckpt_every": 100, "keep_best": 3, "log_every": 10,
    "max_nonfinite": 20,
    "lambdas": {"l1": 1.0, "stft": 1.0, "mel": 1.0},
    "n_ffts": [1024, 2048, 4096, 8192], "n_mels": 128,
    "dataset_ids": None, "allow_bandlimited": False,
    # parameter groups: module-name patterns (fnmatch; a pattern also covers everything under the
    # module), each trainable or frozen with its own lr factor; parameters in no group are frozen
    "groups": [{"pattern": "decoder", "trainable": True, "lr_factor": 1.0}],
    "init": "smart",
    # warm restart: start from these weights (model folder, final.pt, .safetensors or a step
    # checkpoint), loaded strictly or, on an architecture mismatch, non-strictly with a report;
    # fresh optimizer and schedule, step 0
    "init_checkpoint": None,
    # exact resume from this run's own newest step checkpoint (same settings and inputs)
    "resume": True,
    "lora": {"enabled": False, "rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["decoder.*"]},
    "device": "auto", "num_workers": 2, "preload": "auto",
    # sampling weight per training manifest (from `manifest: [{path, weight}]`); None: uniform
    # over utterances. Not a per-phase key: filled in from the manifest list.
    "source_weights": None,
}
PHASE_DEFAULTS = {
    "warmup": {"lr": 5e-5, "groups": [{"pattern": "decoder.new_block", "trainable": True, "lr_factor": 1.0}]},
    "full": {"lr": 1e-5, "groups": [{"pattern": "decoder", "trainable": True, "lr_factor": 1.0}]},
    "lora": {"lr": 1e-4, "lora": {"enabled": True},
             "groups": [{"pattern": "*.lora_*", "trainable": True, "lr_factor": 1.0}]},
}
INITS = ("smart", "random")


def manifest_entries(value) -> list:
    """`manifest: PATH` or `manifest: [{path, weight}, ...]` -> [(path, weight), ...]."""
    if isinstance(value, str):
        return [(value, 1.0)]
    return [(m["path"], float(m.get("weight", 1.0))) for m in value]


def merge(base: dict, over: dict | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def phase_settings(config: dict, phase: str) -> dict:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; phases are {PHASES}")
    train = config.get("train", {})
    s = merge(merge(merge(TRAIN_DEFAULTS, PHASE_DEFAULTS[phase]), train.get("defaults")), train.get(phase))
    entries = manifest_entries(config.get("manifest", []))
    s["source_weights"] = [w for _, w in entries] if len(entries) > 1 else None
    check_phase(s, phase)
    return s


def check_phase(s: dict, phase: str) -> None:
    unknown = set(s) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ValueError(f"train.{phase}: unknown keys {sorted(unknown)}")
    for g in s["groups"]:
        unknown = set(g) - {"pattern", "trainable", "lr_factor"}
        if unknown or "pattern" not in g:
            raise ValueError(f"train.{phase}.groups: each group is {{pattern, trainable, lr_factor}}, got {g}")
    if s["init"] not in INITS:
        raise ValueError(f"train.{phase}.init must be one of {INITS}")
    if s["warmup_steps"] > s["steps"]:
        raise ValueError(f"train.{phase}: warmup_steps {s['warmup_steps']} > steps {s['steps']}")
    unknown = set(s["lambdas"]) - {"l1", "stft", "mel"}
    if unknown:
        raise ValueError(f"train.{phase}.lambdas: unknown terms {sorted(unknown)}")


def lora_adapters(config: dict) -> tuple:
    """(adapters {name: overrides}, name merged into final.pt or None). One job per adapter."""
    lora = config.get("lora") or {}
    adapters = lora.get("adapters") or {"default": {}}
    final = lora.get("final", next(iter(adapters)))
    if final is not None and final not in adapters:
        raise ValueError(f"lora.final names {final!r}, but lora.adapters has {sorted(adapters)}")
    return adapters, final


def adapter_settings(config: dict, name: str) -> dict:
    """The lora phase's settings with one adapter's overrides (e.g. its dataset_ids)."""
    adapters, _ = lora_adapters(config)
    s = merge(phase_settings(config, "lora"), adapters[name])
    check_phase(s, f"lora.adapters.{name}")
    return s
