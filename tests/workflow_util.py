"""Helpers for the end-to-end Snakemake tests (tests/test_workflow.py).

The workflow never runs inside the repository (its results/ belongs to the developer): a test
copies Snakefile, workflow/, config/ and pipeline/ into a temporary tree and runs Snakemake there
with a small override config. Dry runs are parsed into one dict per job that would run.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("Snakefile", "workflow", "config", "pipeline")

# Small enough for 2 shared CPU cores: 12 + 3 clips of 1-2 s, a 20-step demo codec, 6-step phases.
FAST_YAML = """\
demo: {seed: 1234, n_train: 12, n_heldout: 3, min_seconds: 1.0, max_seconds: 2.0}
codec: {pretrained: null, demo: {steps: 20}}
precompute: {shards: 3, heldout_shards: 1}
train:
  defaults: {steps: 6, batch_size: 2, segment_seconds: 0.25, warmup_steps: 1, val_every: 3,
             val_batches: 1, ckpt_every: 2, keep_best: 1, log_every: 2, n_ffts: [256, 512],
             n_mels: 40, num_workers: 0}
  full: {adversarial: {start_step: 3}}      # the demo's discriminators join for the last 3 steps
eval: {n_ffts: [256, 512]}
"""
N_TRAIN, N_HELDOUT, N_SHARDS, STEPS = 12, 3, 3, 6

# One dry-run / run job header, e.g. "rule train:", "localrule all:", "checkpoint demo_data:".
_JOB = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
_FIELD = re.compile(r"^    (\w+): (.*)$")


def run_env() -> dict:
    env = dict(os.environ)
    # Two cores shared with other work: OpenMP threads that spin-wait at barriers while the other
    # core is busy elsewhere made a 4-second training job take a minute. PASSIVE only changes
    # how idle threads wait, never a result.
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["COLUMNS"] = "240"            # rich wraps at 80 columns in logs otherwise
    env.pop("SNAKEMAKE_PROFILE", None)
    return env


def make_tree(dest: Path, fast_yaml: str = FAST_YAML) -> Path:
    """A fresh copy of the workflow's code (no data/, no results/) + fast.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    (dest / "fast.yaml").write_text(fast_yaml)
    return dest




def clone_tree(src: Path, dest: Path) -> Path:
    """Copy a built tree, .snakemake metadata included, keeping every mtime (copy2 + copystat)."""
    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns("locks"))
    return dest


def snakemake_cmd(targets=(), configfiles=("fast.yaml",), extra=()) -> list:
    # Targets go first: --configfile and --forcerun take several values and would swallow them.
    return [sys.executable, "-m", "snakemake", *targets, "--cores", "2",
            "--configfile", *configfiles, *extra]


@dataclass
class Result:
    rc: int
    out: str                      # stdout + stderr
    seconds: float
    jobs: list = field(default_factory=list)

    def keys(self) -> Counter:
        """Counter of (rule, wildcards) of the jobs listed."""
        return Counter((j["rule"], j.get("wildcards", "")) for j in self.jobs)

    def rules(self) -> Counter:
        return Counter(j["rule"] for j in self.jobs)


def snakemake(cwd: Path, targets=(), configfiles=("fast.yaml",), extra=(), timeout=120) -> Result:
    cmd = snakemake_cmd(targets, configfiles, extra)
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=cwd, env=run_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return Result(p.returncode, p.stdout, time.monotonic() - t0, parse_jobs(p.stdout))


def dry_run(cwd: Path, targets=(), configfiles=("fast.yaml",), extra=(), timeout=120) -> Result:
    r = snakemake(cwd, targets, configfiles, ("-n", *extra), timeout)
    assert r.rc == 0, r.out[-4000:]
    check_job_stats(r)
    return r


def dry_run_with(cwd: Path, override: str, targets=(), extra=()) -> Result:
    """Dry run with one more configfile holding `override`, merged key by key over fast.yaml
    (nested --config values would arrive as strings, which the schema rejects)."""
    path = cwd / "override.yaml"
    path.write_text(override)
    try:
        return dry_run(cwd, targets, ("fast.yaml", path.name), extra)
    finally:
        path.unlink()


def parse_jobs(text: str) -> list:
    """One dict per job block: rule, and its indented fields (input, output, wildcards, reason...)."""
    jobs, cur = [], None
    for line in text.splitlines():
        m = _JOB.match(line)
        if m:
            cur = {"rule": m.group(1)}
            jobs.append(cur)
            continue
        f = _FIELD.match(line)
        if cur is not None and f:
            cur[f.group(1)] = f.group(2)
        elif not line.startswith("    "):
            cur = None
    return jobs


def job_stats(text: str) -> Counter | None:
    """The 'Job stats' table Snakemake prints (rule -> count), None if there is none."""
    lines = text.splitlines()
    try:
        i = lines.index("Job stats:")
    except ValueError:
        return None
    stats = Counter()
    for line in lines[i + 3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or parts[0] == "total":
            break
        stats[parts[0]] = int(parts[1])
    return stats


def check_job_stats(r: Result) -> None:
    """The parsed job blocks agree with Snakemake's own table (guards the parser)."""
    stats = job_stats(r.out)
    if stats is None:
        assert not r.jobs, r.out[-3000:]
        assert "Nothing to be done" in r.out, r.out[-3000:]
    else:
        assert stats == r.rules(), (stats, r.rules(), r.out[-3000:])


def mtimes(root: Path) -> dict:
    """mtime_ns of every file and directory of the tree, Snakemake's own .snakemake/ excluded."""
    out = {}
    for d, dirs, files in os.walk(root):
        if Path(d) == root and ".snakemake" in dirs:
            dirs.remove(".snakemake")
        for name in dirs + files:
            p = os.path.join(d, name)
            out[os.path.relpath(p, root)] = os.lstat(p).st_mtime_ns
    return out


def merged_config(root: Path, overrides=(FAST_YAML,)) -> dict:
    """root's config/config.yaml with override YAML texts merged over it, as Snakemake merges
    --configfile files (key by key, recursively: snakemake.utils.update_config)."""
    import yaml
    from snakemake.utils import update_config
    cfg = yaml.safe_load((root / "config/config.yaml").read_text())
    for text in overrides:
        update_config(cfg, yaml.safe_load(text))
    return cfg


def lora_adapters(cfg: dict) -> tuple:
    """(adapter names, the one merged into final.pt or None), read from the config itself."""
    lora = cfg.get("lora") or {}
    names = list(lora.get("adapters") or {"default": {}})
    return names, lora.get("final", names[0])
