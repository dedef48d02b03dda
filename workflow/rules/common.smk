# Helpers shared by the rules. Nothing here writes into the tree: the manifests are only read
# (at parse time) to give every shard job its audio files as inputs and a digest of its rows.
import functools
import json
import os
import sys

sys.path.insert(0, workflow.basedir)

from pipeline.data.manifest import parse_manifest, rows_digest, shard_rows
from pipeline.settings import (PHASE_CHAIN, PHASES, PRECOMPUTE_DEFAULTS, adapter_settings, lora_adapters,
                               manifest_entries, merge, phase_settings, run_settings, runtime_settings,
                               with_defaults)

config.update(with_defaults(config))      # the schema's defaults (validated without filling them in)

DEMO_DIR = "data/demo"
RESULTS = "results"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
PY = f"{sys.executable} -m pipeline"

# split -> where its manifest comes from and where its cache and accounting go
SPLITS = {
    "train": dict(manifest=[p for p, _ in manifest_entries(config["manifest"])], cache="cache",
                  summary="precompute", shards=config["precompute"]["shards"]),
    "heldout": dict(manifest=[config["heldout_manifest"]], cache="cache_heldout",
                    summary="precompute/heldout", shards=config["precompute"]["heldout_shards"]),
}
CACHE_SPLIT = {v["cache"]: k for k, v in SPLITS.items()}
SUMMARY_SPLIT = {v["summary"]: k for k, v in SPLITS.items()}


wildcard_constraints:
    shard=r"\d{3,4}",
    cachedir="|".join(CACHE_SPLIT),
    sdir="|".join(SUMMARY_SPLIT),
    phase="|".join(PHASES),
    adapter=r"[A-Za-z0-9_-]+",


def is_demo(path):
    return os.path.abspath(path).startswith(os.path.abspath(DEMO_DIR) + os.sep)


def manifest_of(split):
    """The split's manifest paths; waits for the demo corpus checkpoint when one is the demo's."""
    for m in SPLITS[split]["manifest"]:
        if is_demo(m):
            checkpoints.demo_data.get()
        elif not os.path.isfile(m):
            raise WorkflowError(f"{split} manifest {m!r} does not exist (config key "
                                f"{'manifest' if split == 'train' else 'heldout_manifest'})")
    return SPLITS[split]["manifest"]


@functools.lru_cache(maxsize=None)
def _sharded(split, mtimes):
    parsed = parse_manifest(SPLITS[split]["manifest"])
    return shard_rows(parsed.rows, SPLITS[split]["shards"])


def shard_of_split(split, k):
    ms = manifest_of(split)
    return _sharded(split, tuple(os.stat(m).st_mtime_ns for m in ms))[k]


def shard_paths(split):
    s = SPLITS[split]
    return [f"{RESULTS}/{s['cache']}/shard-{k:03d}.zarr" for k in range(s["shards"])]


# ---- codec ---------------------------------------------------------------------------------
def codec_dir():
    return config["codec"]["pretrained"] or f"{RESULTS}/codec/demo"


def codec_files():
    d = codec_dir()
    if not config["codec"]["pretrained"]:
        return [f"{d}/config.json", f"{d}/model.safetensors"]
    for w in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(f"{d}/{w}"):
            return [f"{d}/config.json", f"{d}/{w}"]
    raise WorkflowError(f"codec.pretrained {d!r} holds neither model.safetensors nor pytorch_model.bin "
                        "(expected the official SNAC layout: config.json + pytorch_model.bin)")


def precompute_settings():
    p = config["precompute"]
    s = {k: p[k] for k in PRECOMPUTE_DEFAULTS if k in p}
    s["target_rate"] = config["codec"].get("target_rate", 48000)
    return merge(PRECOMPUTE_DEFAULTS, s)


# ---- training ------------------------------------------------------------------------------
PHASE_DIR = f"{RESULTS}/phase11"
TARGET_RATE = config["codec"]["target_rate"]


def settings_of(phase, adapter=None):
    return adapter_settings(config, adapter) if adapter else phase_settings(config, phase)


def run_json(phase, adapter=None):
    """A phase's run settings: a rule param, so changing one reruns that phase and the later ones."""
    return json.dumps(run_settings(settings_of(phase, adapter)), sort_keys=True)


def runtime_json(phase, adapter=None):
    """A phase's runtime knobs, for a param whose function takes `resources`: Snakemake treats such
    a param as derived and never reruns a job because it changed."""
    return json.dumps(runtime_settings(settings_of(phase, adapter)), sort_keys=True)


try:
    ADAPTERS, FINAL_ADAPTER = lora_adapters(config)
except ValueError as e:
    raise WorkflowError(str(e))


def codec_config():
    """The codec's constructor config: the pretrained folder's config.json, or the demo's."""
    if not config["codec"]["pretrained"]:
        return config["codec"]["demo"]["config"]
    path = f"{codec_dir()}/config.json"
    if not os.path.isfile(path):
        raise WorkflowError(f"codec.pretrained: {path} does not exist (expected the official SNAC "
                            "layout: config.json + pytorch_model.bin)")
    with open(path) as f:
        return json.load(f)


def check_groups():
    """Every phase's parameter groups and LoRA targets against the model's parameter names,
    at parse time: a bad pattern in a late phase fails before the first job runs."""
    from pipeline.model.codec import geometry
    from pipeline.model.snac48 import check_phase_groups
    from pipeline.settings import check_segment
    phases = {f"train.{p}": phase_settings(config, p) for p in PHASES if p != "lora"}
    phases.update({f"lora.adapters.{a}": adapter_settings(config, a) for a in ADAPTERS})
    try:
        check_phase_groups(codec_config(), TARGET_RATE, phases)
        for where, s in phases.items():
            check_segment(s, geometry(codec_config(), TARGET_RATE), where)
    except ValueError as e:
        raise WorkflowError(f"config error: {e}")


if workflow.is_main_process:      # not again inside every cluster job, which re-parses this file
    check_groups()


def final_source():
    """What final.pt holds: the full phase with the named adapter merged, or without (final: null)."""
    return f"{PHASE_DIR}/lora/{FINAL_ADAPTER}" if FINAL_ADAPTER else f"{PHASE_DIR}/full"


def eval_models():
    """name -> phase output folder, for the evaluation table: every phase of the chain (each LoRA
    adapter but the one merged into final.pt as lora:<name>), then final."""
    m = {p: f"{PHASE_DIR}/{p}" for p in PHASES if p != "lora"}
    m.update({f"lora:{a}": f"{PHASE_DIR}/lora/{a}" for a in ADAPTERS if a != FINAL_ADAPTER})
    m["final"] = final_source()
    return m


def all_targets():
    return [f"{PHASE_DIR}/final.pt", f"{PHASE_DIR}/eval.json",
            f"{RESULTS}/precompute/summary.json", f"{RESULTS}/precompute/heldout/summary.json"]
