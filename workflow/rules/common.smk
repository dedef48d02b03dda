# Helpers shared by the rules. The manifests are read at parse time to give every shard job two
# digests as params, one of its rows and one of its audio files' sizes and mtimes. Nothing here
# writes into the tree but two caches under .snakemake/ that no rule reads (files written at parse
# time elsewhere would refresh mtimes and rerun jobs): that per-shard index, and passed checks.
import functools
import glob
import hashlib
import json
import os
import shlex
import sys

sys.path.insert(0, workflow.basedir)

from snakemake.io import IOFile
from snakemake.logging import logger

from pipeline.data.manifest import ShardIndex, check_heldout_disjoint, shard_record
from pipeline.settings import (ADAPTER_PHASES, PHASE_CHAIN, PHASES, PRECOMPUTE_DEFAULTS, SINGLE_JOB_PHASES, Job,
                               final_job, manifest_entries, phase_settings, run_settings, runtime_settings,
                               split_runtime, training_jobs, with_defaults)

config.update(with_defaults(config))      # the schema's defaults (validated without filling them in)

DEMO_DIR = "data/demo"
RESULTS = "results"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
# quoted: an interpreter inside a path with a space (a venv in "My Projects/") runs every rule
PY = f"{shlex.quote(sys.executable)} -m pipeline"

# LINT: what `snakemake --lint` still reports on the rules is kept on purpose, for these reasons;
# a comment above each rule points here.
# - "Specify a conda environment or container for each rule." Every job runs this package from
#   the one virtual environment the README's set-up command installs with pip (torch with the
#   CUDA build that suits the machine, and the rest); an environment per rule would repeat it
#   (gigabytes each) and could resolve another torch than the one the tests ran with.
# - "Shell command directly uses variable PY (DEMO_DIR, RESULTS) from outside of the rule." PY is
#   the interpreter Snakemake itself runs under, a fact of the machine, not of the results: as a
#   param it would be recorded, and a venv moved elsewhere would rerun everything. And Snakemake
#   records the text of each shell command (rerun trigger `code`): rewriting {PY}, {DEMO_DIR} or
#   {RESULTS} as params would rerun every finished job once, for nothing it computes.
# - "Param codec (out, source) is a prefix of input or output file but hardcoded." The workflow
#   runs on one shared filesystem (locally, or under SLURM with workflow/profiles/slurm), never on
#   remote storage, where such a prefix would break. Derived from the input or output instead, the
#   param would become a derived one, which Snakemake leaves out of its record of params: every
#   finished job would rerun once for "Params have changed".

# parse-time caches (never read by a rule): the manifest index, passed config checks
INDEX_CACHE = ".snakemake/phase11-manifest-index"
CHECK_CACHE = ".snakemake/phase11-checked"

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


def demo_corpus_settings():
    """The demo corpus's settings; it is made at the rate the decoder is trained for."""
    return {**config.get("demo", {}), "rate": config["codec"]["target_rate"]}


def manifest_key(split):
    return "manifest" if split == "train" else "heldout_manifest"


def check_manifests():
    """A manifest that does not exist fails at parse time, naming its config key. (Raised in an
    input function instead, the error is swallowed whenever the results already exist: Snakemake
    then says "Nothing to be done".) The demo's manifests are written by the demo_data checkpoint."""
    for split, s in SPLITS.items():
        for m in s["manifest"]:
            if not is_demo(m) and not os.path.isfile(m):
                raise WorkflowError(f"{split} manifest {m!r} does not exist (config key {manifest_key(split)})")


check_manifests()


def check_heldout():
    """Held-out utterances that are also training ones (same id, or same audio file) are refused
    before any work, naming up to five: the evaluation would score the model on what it trained
    on. A pass is remembered under .snakemake/ keyed by the manifests' bytes; when the training
    manifests changed, the check rides on the parse that rebuilds their index. The demo's manifests, written by the demo_data checkpoint, are disjoint by
    construction; they are checked too once they exist."""
    train, held = SPLITS["train"]["manifest"], SPLITS["heldout"]["manifest"]
    if not all(os.path.isfile(m) for m in train + held):
        return
    try:
        check_heldout_disjoint(train, held, CHECK_CACHE, index=(SPLITS["train"]["shards"], INDEX_CACHE))
    except ValueError as e:
        raise WorkflowError(f"{e} (config keys manifest, heldout_manifest)")


if workflow.is_main_process:      # not again inside every cluster job, which re-parses this file
    check_heldout()


def manifest_of(split):
    """The split's manifest paths; waits for the demo corpus checkpoint when one is the demo's
    (the others were checked at parse time, check_manifests)."""
    if any(is_demo(m) for m in SPLITS[split]["manifest"]):
        checkpoints.demo_data.get()
    return SPLITS[split]["manifest"]


@functools.lru_cache(maxsize=None)
def _index(split, stats):
    return ShardIndex.load(SPLITS[split]["manifest"], SPLITS[split]["shards"], INDEX_CACHE)


def shard_index(split):
    """Row digest and audio paths of each shard of the split (see pipeline/data/manifest.py).
    Cached under .snakemake/ keyed by the manifests' bytes; in this process, by their stat."""
    ms = manifest_of(split)
    return _index(split, tuple((st.st_size, st.st_mtime_ns, st.st_ino) for st in map(os.stat, ms)))


def evaluated_here(rule, wc):
    """Whether this process needs the params of that job. A cluster job (the SLURM plugin's
    jobstep: `snakemake --target-jobs RULE:WILDCARDS --mode remote ...`) re-parses the workflow
    and builds the DAG around its target, creating the jobs upstream of it too, and evaluates
    the params of every job in its DAG (DAG.update_conda_envs); it runs and records only its
    target(s). A train job would otherwise stat every audio file of every shard."""
    if workflow.is_main_process:
        return True
    targets = getattr(workflow.dag_settings, "target_jobs", None)
    if not targets:
        return True
    w = dict(wc.items())
    return any(t.rulename == rule and dict(t.wildcards_dict) == w for t in targets)


NOT_EVALUATED = "(not evaluated in a cluster job of another rule)"


def shard_paths(split):
    s = SPLITS[split]
    return [f"{RESULTS}/{s['cache']}/shard-{k:03d}.zarr" for k in range(s["shards"])]


_FORCED = set()


def rebuild_if_deleted(split, k):
    """A shard folder deleted after the run is rebuilt, and what was built from it reruns.

    Snakemake alone says "Nothing to be done": it rebuilds a missing intermediate output only when
    a job downstream has to run anyway (DAG.update_needrun). Evidence that the shard was built:
    its split's summary.json, built from every shard, exists. Such a shard is forced, as
    `--forcerun` would (Snakemake reruns forced jobs and everything downstream of them). It cannot
    go into workflow.dag_settings.forcerun at parse time: Snakemake assigns the DAG settings after
    parsing the Snakefile (api.py, DAGApi). This runs in the shard job's input function, while the
    DAG is built and before it decides what must run."""
    path = shard_paths(split)[k]
    summary = f"{RESULTS}/{SPLITS[split]['summary']}/summary.json"
    if not workflow.is_main_process or path in _FORCED or os.path.exists(path) or not os.path.exists(summary):
        return
    if workflow.dag is None:    # not building a DAG (--lint, --list-rules ...)
        return
    force(path, f"is missing although {summary}, built from it, exists")


def force(path, why):
    """Rebuild `path` and rerun what depends on it (as --forcerun would), once, saying why."""
    _FORCED.add(path)
    logger.warning(f"{path} {why}: rebuilding it (and rerunning what depends on it)")
    workflow.dag.forcefiles.add(path)


def rebuild_if_stale(split, k):
    """A shard folder that does not hold what Snakemake's records say it holds is rebuilt, and
    what was built from it reruns (forced, as in rebuild_if_deleted).

    Each shard records the digest of the manifest rows it was built from (pipeline.data.cache).
    When it differs from the current rows while Snakemake's record of the shard job's params
    holds the current rows (or there is no record), Snakemake would use the folder as it is:
    a shard restored from a backup (`cp -a`), copied from another tree, or written by an older
    version of this pipeline. (When the recorded params differ too, the manifest was edited and
    Snakemake reruns the shard itself, for "Params have changed": nothing to do here.) Cost: one
    zarr.json read per shard, about a millisecond (pipeline.data.manifest.shard_record)."""
    path = shard_paths(split)[k]
    if not workflow.is_main_process or path in _FORCED or workflow.dag is None:
        return
    record = shard_record(path)
    if record is None:          # no folder, or not a zarr group: Snakemake or training say so
        return
    want = shard_index(split).rows_digest(k)
    if record.get("rows") == want:
        return
    persistence = workflow.persistence
    recorded = persistence.params(IOFile(path)) if persistence is not None else None
    if recorded and repr(want) not in recorded:
        return                  # the params changed: Snakemake reruns the shard anyway
    force(path, "has no record of the manifest rows it was built from (written by an older version of this "
          "pipeline)" if "rows" not in record else
          "was built from other manifest rows than the current ones (restored from a backup, copied from "
          "another tree, or edited?)")


def shard_split(wc):
    return CACHE_SPLIT[wc.cachedir]


def shard_manifests(wc):
    """A shard job's manifest inputs (ancient: editing one line must not rerun every shard;
    the rows digest param reruns the line's own shard)."""
    rebuild_if_deleted(shard_split(wc), int(wc.shard))
    rebuild_if_stale(shard_split(wc), int(wc.shard))
    return [ancient(m) for m in manifest_of(shard_split(wc))]


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
    """What a shard holds depends on (a param: changing one reruns every shard); not the schema's
    x-runtime knobs, which bound memory and say where the job runs (same codes)."""
    run, _ = split_runtime("precompute", {k: config["precompute"][k] for k in PRECOMPUTE_DEFAULTS
                                          if k in config["precompute"]})
    n_q = config["codec"].get("n_q")          # only when set: a SNAC run's params stay what they were
    return {**run, "target_rate": config["codec"]["target_rate"], **({"n_q": n_q} if n_q is not None else {})}


def precompute_runtime():
    return split_runtime("precompute", config["precompute"])[1]


# ---- training ------------------------------------------------------------------------------
# The jobs follow the phase chain (pipeline.settings.PHASE_CHAIN, declared in the schema): rule
# train runs the phases of one job each, rule train_lora one job per named adapter of a phase with
# adapters (its name is the profiles'). No phase is named here.
PHASE_DIR = f"{RESULTS}/phase11"
TARGET_RATE = config["codec"]["target_rate"]


def job_of(wc):
    """The training job of a train or train_lora job's wildcards."""
    return Job(wc.phase, getattr(wc, "adapter", None))


def job_dir(job):
    return f"{PHASE_DIR}/{job.folder}"


def previous_phase_dir(phase):
    prev = PHASE_CHAIN[phase].after
    return f"{PHASE_DIR}/{prev}" if prev else None


@functools.lru_cache(maxsize=None)       # the config is fixed once parsed; callers only read it
def settings_of(job):
    """A training job's settings, complete and checked (pipeline.settings.phase_settings): the one
    place they are built; the rule's params carry them to the trainer as they are."""
    return phase_settings(config, job.phase, job.adapter)


def run_json(job):
    """A job's run settings: a rule param, so changing one reruns that phase and the later ones."""
    return json.dumps(run_settings(settings_of(job)), sort_keys=True)


def select_arg(job):
    """select: rank_sum scores the kept checkpoints with the evaluation's metrics: then (only then)
    their settings are a param of the phase, so changing them reruns it."""
    if settings_of(job)["select"] != "rank_sum":
        return ""
    metrics = json.dumps({k: config["eval"][k] for k in ("n_ffts", "lsd_floor_db")}, sort_keys=True)
    return f"--metrics {shlex.quote(metrics)}"


def runtime_json(job):
    """A job's runtime knobs, for a param whose function takes `resources`: Snakemake treats such
    a param as derived and never reruns a job because it changed."""
    return json.dumps(runtime_settings(settings_of(job)), sort_keys=True)


def init_arg(job):
    """The previous phase's output (none for the first phase), and the adapter a job trains."""
    prev = previous_phase_dir(job.phase)
    return " ".join(([f"--init {prev}"] if prev else []) + ([f"--adapter {job.adapter}"] if job.adapter else []))


def train_inputs(wc):
    d = dict(codec=codec_files(), cache=shard_paths("train"), heldout=shard_paths("heldout"))
    prev = previous_phase_dir(wc.phase)
    if prev:
        d["init"] = f"{prev}/model.safetensors"
    return d


try:
    JOBS = training_jobs(config)
    FINAL = final_job(config)
except ValueError as e:
    raise WorkflowError(str(e))


def codec_config():
    """The codec's constructor config: the pretrained folder's config.json, or the demo's."""
    if not config["codec"]["pretrained"]:
        return config["codec"]["demo"]["config"]
    path = f"{codec_dir()}/config.json"
    if not os.path.isfile(path):
        raise WorkflowError(f"codec.pretrained: {path} does not exist (expected a codec folder: SNAC's official "
                            "layout, config.json + pytorch_model.bin, or a Mimi folder from save_pretrained)")
    with open(path) as f:
        return json.load(f)


def check_groups():
    """Every phase's parameter groups and LoRA targets against the model's parameter names,
    at parse time: a bad pattern in a late phase, or a loss size larger than its segments, fails
    before the first job runs. A passed check is remembered under .snakemake/ (keyed by the codec
    config, the phases' settings and the checking code): importing torch and building the model on
    the meta device cost more than the rest of a million-row dry run."""
    phases = {job.where: settings_of(job) for job in JOBS}
    cfg = codec_config()
    model_code = hashlib.sha256()
    for f in sorted(glob.glob(f"{workflow.basedir}/pipeline/model/**/*.py", recursive=True)) + \
            [f"{workflow.basedir}/pipeline/{m}.py" for m in ("settings", "geometry", "training/groups")]:
        with open(f, "rb") as fh:
            model_code.update(fh.read())
    key = hashlib.sha256(json.dumps([cfg, TARGET_RATE, config["codec"].get("n_q"), phases, model_code.hexdigest()],
                                    sort_keys=True, default=str).encode()).hexdigest()[:24]
    passed = f"{CHECK_CACHE}/groups-{key}"
    if os.path.exists(passed):
        return
    from pipeline.model import codecs
    from pipeline.settings import check_segment
    from pipeline.training.groups import check_phase_groups
    try:
        n_q = config["codec"].get("n_q")
        geo = codecs.geometry(cfg, TARGET_RATE, n_q)       # codec-level mistakes (n_q) first, unprefixed
        check_phase_groups(cfg, TARGET_RATE, phases, n_q)
        for where, s in phases.items():
            check_segment(s, geo, where)
    except ValueError as e:
        raise WorkflowError(f"config error: {e}")
    try:
        os.makedirs(CHECK_CACHE, exist_ok=True)
        open(passed, "w").close()
    except OSError:
        pass


if workflow.is_main_process:      # not again inside every cluster job, which re-parses this file
    check_groups()


def final_source():
    """What final.pt holds (pipeline.settings.final_job): the lora phase with the named adapter
    merged, or the phase before it (lora.final: null)."""
    return job_dir(FINAL)


def eval_models():
    """name -> output folder, for the evaluation table: every training job (a LoRA adapter as
    lora:<name>) but the adapter merged into final.pt, then final."""
    m = {job.name: job_dir(job) for job in JOBS if not (job.adapter and job == FINAL)}
    m["final"] = final_source()
    return m


def all_targets():
    return [f"{PHASE_DIR}/final.pt", f"{PHASE_DIR}/eval.json",
            f"{RESULTS}/precompute/summary.json", f"{RESULTS}/precompute/heldout/summary.json"]


# ---- report --------------------------------------------------------------------------------
REPORT_DIR = f"{RESULTS}/report"
N_CLIPS = config["eval"]["report_clips"]


def report_phases():
    """name -> folder of every training job (its metrics.jsonl gives the curves); a LoRA adapter's
    name is lora-<adapter> (it names a file)."""
    return {job.name.replace(":", "-"): job_dir(job) for job in JOBS}


def report_targets():
    return ([f"{REPORT_DIR}/evaluation.html"] + [f"{REPORT_DIR}/clip-{k:02d}.html" for k in range(N_CLIPS)]
            + [f"{REPORT_DIR}/curves-{n}.png" for n in report_phases()])
