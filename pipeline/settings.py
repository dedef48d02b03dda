"""Effective settings of each job, from the config and the schema (no torch import: the Snakefile
uses this at parse time, and what it returns is what Snakemake records as `params`).

Every default lives in workflow/schemas/config.schema.yaml; this module reads them and keeps only
the checks that span several keys. So does the phase chain: the schema's `train` section lists the
phases in order, each with `x-after` (the phase whose output it starts from) and, for a phase that
trains named adapters, `x-adapters` (the config section that names them: one job each). Code asks
the chain (PHASE_CHAIN, training_jobs, final_job), never a phase by its name. A phase's settings are

    schema defaults <- the phase's own defaults (train.<phase>.default) <- train.defaults <- train.<phase>
                    (<- <section>.adapters.<name> for one adapter's job)

built once, at parse time, by phase_settings (filled in and checked), and split in two: the *run
settings* (everything that changes the training trajectory: they are the rule's params and define
the run) and the *runtime knobs* (the schema's `x-runtime` list: workers, device, logging and
checkpoint intervals...), which change how a phase runs, never what it computes, so changing one
neither reruns a finished phase nor discards a killed run. The trainer takes them as they are.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


@functools.cache
def schema() -> dict:
    # libyaml's loader when there is one: every `python -m pipeline` reads the schema (0.1 s in Python)
    return yaml.load(SCHEMA_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def is_map(node: dict) -> bool:
    """An object whose keys are the user's names (lora.adapters), not a fixed set of settings."""
    return not node.get("properties") and isinstance(node.get("additionalProperties"), dict)


def schema_defaults(node: dict) -> dict:
    """{key: default} of an object schema, nested objects included. A map's default (lora.adapters)
    is left out: merged under the user's map, its entries would be added to theirs."""
    out = {}
    for key, prop in node.get("properties", {}).items():
        if "default" in prop and not is_map(prop):
            out[key] = copy.deepcopy(prop["default"])
        elif prop.get("properties"):
            out[key] = schema_defaults(prop)
    return out


# ---- the phase chain ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    name: str
    after: str | None        # the phase whose output it starts from; None: the codec, with a new block
    adapters: str | None     # the config section naming its adapters (one job each); None: one job


def _chain() -> dict:
    chain = {}
    for name, node in schema()["properties"]["train"]["properties"].items():
        if "x-after" not in node:
            continue                              # train.defaults
        phase = Phase(name, node["x-after"], node.get("x-adapters"))
        if phase.after is not None and phase.after not in chain:
            raise ValueError(f"schema: train.{name}.x-after names {phase.after!r}, not an earlier phase")
        if phase.after is not None and chain[phase.after].adapters:
            raise ValueError(f"schema: train.{name} cannot start from {phase.after!r}: it has an output per adapter")
        chain[name] = phase
    return chain


PHASE_CHAIN = _chain()
PHASES = tuple(PHASE_CHAIN)
SINGLE_JOB_PHASES = tuple(p.name for p in PHASE_CHAIN.values() if not p.adapters)
ADAPTER_PHASES = tuple(p.name for p in PHASE_CHAIN.values() if p.adapters)


class Job(NamedTuple):
    """One training job: a phase, or one named adapter of a phase with adapters."""
    phase: str
    adapter: str | None = None

    @property
    def name(self) -> str:
        """As the evaluation table and `bench memory` name it: the phase, or phase:adapter."""
        return f"{self.phase}:{self.adapter}" if self.adapter else self.phase

    @property
    def folder(self) -> str:
        """Its output folder under the phases' folder (results/phase11)."""
        return f"{self.phase}/{self.adapter}" if self.adapter else self.phase

    @property
    def where(self) -> str:
        """The config key its settings end at, for error messages."""
        return f"{PHASE_CHAIN[self.phase].adapters}.adapters.{self.adapter}" if self.adapter else f"train.{self.phase}"


# ---- defaults -----------------------------------------------------------------------------------
PHASE_SCHEMA = schema()["$defs"]["phase"]
TRAIN_DEFAULTS = schema_defaults(PHASE_SCHEMA)
PHASE_DEFAULTS = {p: schema()["properties"]["train"]["properties"][p].get("default", {}) for p in PHASES}
RUNTIME_KEYS = frozenset(PHASE_SCHEMA["x-runtime"])
GROUP_DEFAULTS = schema_defaults(PHASE_SCHEMA["properties"]["groups"]["items"])
EVAL_DEFAULTS = schema_defaults(schema()["properties"]["eval"])
DEMO_DEFAULTS = schema_defaults(schema()["properties"]["demo"])
DEMO_CODEC_DEFAULTS = schema_defaults(schema()["properties"]["codec"]["properties"]["demo"])


def split_runtime(section: str, values: dict) -> tuple[dict, dict]:
    """A top-level section's (precompute, eval) values -> (what its outputs depend on, its
    runtime knobs: the schema's x-runtime, which say where and in what pieces a job runs)."""
    runtime = set(schema()["properties"][section].get("x-runtime", ()))
    return ({k: v for k, v in values.items() if k not in runtime}, {k: v for k, v in values.items() if k in runtime})


# a shard job's settings: precompute's keys but the shard counts (the DAG's shape), the target rate
# and the number of codebooks encoded (codec.n_q)
PRECOMPUTE_DEFAULTS = {**{k: v for k, v in schema_defaults(schema()["properties"]["precompute"]).items()
                          if k not in ("shards", "heldout_shards")},
                       **{k: schema()["properties"]["codec"]["properties"][k]["default"] for k in ("target_rate", "n_q")}}


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


def phase_settings(config: dict, phase: str, adapter: str | None = None) -> dict:
    """The complete, checked settings of one training job (run settings and runtime knobs
    together): a phase, or one named adapter of a phase with adapters (its overrides, e.g. its
    dataset_ids, over the phase's settings). A mistake raises ValueError naming its config key."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; phases are {PHASES}")
    train = config.get("train", {})
    s = merge(merge(merge(TRAIN_DEFAULTS, PHASE_DEFAULTS[phase]), train.get("defaults")), train.get(phase))
    entries = manifest_entries(config.get("manifest", []))
    s["source_weights"] = [w for _, w in entries] if len(entries) > 1 else None
    s = complete(s, f"train.{phase}")
    if adapter is None:
        return s
    adapters, _ = adapters_of(config, phase)
    if adapter not in adapters:
        raise ValueError(f"{Job(phase, adapter).where}: no such adapter; there are {sorted(adapters)}")
    return complete(merge(s, adapters[adapter]), Job(phase, adapter).where)


def filled(s: dict) -> dict:
    """A phase's settings with the defaults of its group entries filled in and no manifest
    weights unless given."""
    return {"source_weights": None, **s, "groups": [{**GROUP_DEFAULTS, **g} for g in s["groups"]]}


def complete(s: dict, where: str) -> dict:
    """A phase's settings filled in and checked."""
    s = filled(s)
    check_phase(s, where)
    return s


def runtime_keys(s: dict) -> frozenset:
    """The runtime knobs of these settings: when the output is chosen among the kept checkpoints
    (select: rank_sum), what decides which are kept is a run setting."""
    return RUNTIME_KEYS - {"keep_best", "val_every", "val_batches"} if s.get("select") == "rank_sum" else RUNTIME_KEYS


def run_settings(s: dict) -> dict:
    """What defines a run: every setting but the runtime knobs."""
    keys = runtime_keys(s)
    return {k: v for k, v in s.items() if k not in keys}


def runtime_settings(s: dict) -> dict:
    keys = runtime_keys(s)
    return {k: v for k, v in s.items() if k in keys}


@functools.cache
def _phase_validator():
    import jsonschema
    return jsonschema.Draft202012Validator(PHASE_SCHEMA)


def check_phase(s: dict, where: str) -> None:
    """Schema (keys, types, ranges) and the checks that span keys; raises ValueError naming `where`."""
    errors = sorted(_phase_validator().iter_errors(
        {k: v for k, v in s.items() if k != "source_weights"}), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        raise ValueError(f"{'.'.join([where, *map(str, e.path)])}: {e.message}")
    if s["warmup_steps"] > s["steps"]:
        raise ValueError(f"{where}: warmup_steps {s['warmup_steps']} > steps {s['steps']}")


def check_segment(s: dict, geo, where: str) -> None:
    """Spectral loss sizes must fit in a training segment (they used to be clamped silently), and
    the discriminators' STFT sizes in what they see of it (the segment, or its crop_seconds window)."""
    from_frames = segment_samples(s, geo)
    too_big = [n for n in s["n_ffts"] if n > from_frames]
    if too_big:
        raise ValueError(f"{where}.n_ffts: {too_big} exceed a training segment of {from_frames} samples "
                         f"(segment_seconds {s['segment_seconds']} at {geo.target_rate} Hz): lower them or "
                         "lengthen the segments")
    a = s["adversarial"]
    if a["enabled"] and a["stft_n_ffts"]:
        seen = from_frames if a["crop_seconds"] is None else min(from_frames, round(a["crop_seconds"] * geo.target_rate))
        if max(a["stft_n_ffts"]) > seen:
            raise ValueError(f"{where}.adversarial.stft_n_ffts: {max(a['stft_n_ffts'])} exceeds the {seen} samples the "
                             f"discriminators see (segment_seconds {s['segment_seconds']}, crop_seconds "
                             f"{a['crop_seconds']} at {geo.target_rate} Hz)")


def segment_frames(seconds: float, geo) -> int:
    """Segment length in finest frames: a whole number (at least one) of `geo.quantum`, so every
    codebook gets whole codes and SNAC's local attention whole windows."""
    per_second = geo.target_rate / geo.hop_target
    return max(1, round(seconds * per_second / geo.quantum)) * geo.quantum


def segment_samples(s: dict, geo) -> int:
    return segment_frames(s["segment_seconds"], geo) * geo.hop_target


def adapters_of(config: dict, phase: str) -> tuple:
    """A phase with adapters: ({name: overrides}, the name merged into final.pt or None), from the
    config section the chain names (lora: adapters, final). One job per adapter."""
    key = PHASE_CHAIN[phase].adapters
    section = config.get(key) or {}
    adapters = section.get("adapters") or copy.deepcopy(schema()["properties"][key]["properties"]["adapters"]["default"])
    final = section.get("final", next(iter(adapters)))
    if final is not None and final not in adapters:
        raise ValueError(f"{key}.final names {final!r}, but {key}.adapters has {sorted(adapters)}")
    return adapters, final


def training_jobs(config: dict) -> list:
    """Every training job of the chain, in order: one per phase, one per adapter of a phase with
    adapters."""
    return [job for p in PHASES for job in
            ([Job(p, a) for a in adapters_of(config, p)[0]] if PHASE_CHAIN[p].adapters else [Job(p)])]


def final_job(config: dict) -> Job:
    """The job whose output final.pt holds: the last phase's; for a phase with adapters, the adapter
    its section's `final` names (merged), or with `final: null` the phase before it."""
    last = PHASE_CHAIN[PHASES[-1]]
    if not last.adapters:
        return Job(last.name)
    _, final = adapters_of(config, last.name)
    return Job(last.name, final) if final is not None else Job(last.after)


def with_defaults(config: dict) -> dict:
    """The config with the schema's defaults filled in for every section but `train` (phases are
    merged by phase_settings, where filling them here would override train.defaults)."""
    top = schema()["properties"]
    return merge({k: schema_defaults(v) for k, v in top.items() if k != "train" and v.get("properties")}, config)
