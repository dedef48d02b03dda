"""The SLURM profile (workflow/profiles/slurm) on a real SLURM: a single node on 127.0.0.1 with two
fake GPUs, started by tests/cluster/slurm.sh (.ci/run starts and stops it).

The profile runs as a user runs it, `--workflow-profile workflow/profiles/slurm`, after the edits a
user makes (OVERRIDE: the partitions; no account, as this cluster has none) and what a 2-CPU node
allows (runtime, memory, CPUs), plus two settings that only make the test faster (SPEED). One run
takes the tiny demo (tests/workflow_util.py's FAST config) to results/phase11/final.pt and shows
  - every rule's job became a SLURM job: the plugin's sbatch call, and the job's own first log line
    `pipeline <command> on <host>: SLURM_JOB_ID=... CUDA_VISIBLE_DEVICES=...`;
  - the GPU rules asked for a GPU (--gpus=1, no --ntasks: see test_plugin_version) and saw
    CUDA_VISIBLE_DEVICES set by SLURM; the CPU rules asked for none and saw none;
  - its outputs equal the same demo run locally (the `built` fixture of conftest.py), exactly.
On a copy of that tree a longer warmup phase is cancelled (`scancel`) mid-run and the user's rerun
resumes from its last step checkpoint; that job is then requeued (`scontrol requeue`: what SLURM
does to a `--requeue` job it preempts) and comes back to resume where SIGTERM stopped it.

The tests marked `slurm` skip, saying why, where no such cluster answers. Time on 2 shared cores
(2026-12-03): 2.6 min for the demo run (the local one it is compared with, 1.7 min, is shared with
test_workflow.py), 0.9 min for the cancel/requeue run; with the plugin's own status polling (+10 s
per check while nothing ends, see SNAKEMAKE) they took 3.8 and 1.4 min in a CI run an hour before.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from workflow_util import REPO, Result, clone_tree, job_stats, make_tree, parse_jobs, run_env

PROFILE = "workflow/profiles/slurm"
PARTITION = "debug"                                 # what tests/cluster/slurm.sh creates
# What a user edits (the EDIT_ME values; None: the line deleted) and what this node allows
# (2 CPUs, a small share of the RAM).
OVERRIDE = {"slurm_partition": PARTITION, "slurm_account": None, "runtime": 15, "mem_mb": 1000,
            "cpus_per_task": 1}
# Speed only: 3 jobs at once, and the first status check 2 s after a job ends instead of 40.
SPEED = {"jobs": 3, "slurm-init-seconds-before-status-checks": 2}
# Speed only, too: the plugin waits 10 s longer after every status check in which no job ended (up
# to 180 s), so on this queue a job was seen done up to 30 s after it ended, over a minute lost
# per demo run. The tests' Snakemake caps that wait at SPEED's 2 s; a user's keeps the plugin's.
SNAKEMAKE = """import sys, snakemake.cli, snakemake_executor_plugin_slurm as plugin
wait = plugin.Executor.next_seconds_between_status_checks
assert isinstance(wait, property), "the SLURM plugin no longer has next_seconds_between_status_checks"
plugin.Executor.next_seconds_between_status_checks = property(wait.fget, lambda self, s: wait.fset(self, min(s, 2)))
sys.exit(snakemake.cli.main())"""
# The rules whose command runs on a GPU when there is one (pipeline/__main__.py GPU_COMMANDS).
GPU_RULES = {"precompute_shard", "train", "train_lora", "evaluate"}
CPU_RULES = {"demo_data", "demo_codec", "precompute_summary", "export_final", "report_items"}
HEADER = re.compile(r"^pipeline (\S+) on (\S+): SLURM_JOB_ID=(\S+) CUDA_VISIBLE_DEVICES=(\S*)$", re.M)
SUBMITTED = re.compile(r"^Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)/\d+\.log\)", re.M)
SBATCH = re.compile(r"^sbatch call: (sbatch .*? --output (\S+)/%j\.log .*?) --wrap=", re.M)
RUN_ID = re.compile(r"^SLURM run ID: (\S+)$", re.M)


def _cluster_problem() -> str | None:
    """Why no SLURM is usable here, or None."""
    start = "as root: tests/cluster/slurm.sh install && tests/cluster/slurm.sh start (.ci/run does)"
    if not shutil.which("sbatch"):
        return f"no SLURM client (sbatch) on PATH; {start}"
    try:
        p = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%T %G"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer in 20 s; {start}"
    if p.returncode != 0:
        return f"no SLURM controller answers ({p.stderr.strip()}); {start}"
    if not re.search(r"^(idle|mixed|allocated|completing)", p.stdout, re.M):
        return f"partition {PARTITION!r} has no usable node ({p.stdout.split()}); {start}"
    if "gpu:2" not in p.stdout:
        return f"partition {PARTITION!r} has no node with two (fake) GPUs ({p.stdout.split()}); {start}"
    return None


PROBLEM = _cluster_problem()
needs_slurm = pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))


# ---- the profile itself (no cluster needed) ----------------------------------------------------
def _rule_names() -> set:
    names = set()
    for smk in (REPO / "workflow/rules").glob("*.smk"):
        text = smk.read_text()
        names |= set(re.findall(r"^(?:rule|checkpoint) (\w+):", text, re.M))
        names |= set(re.findall(r"^use rule \w+ as (\w+)", text, re.M))
    return names


def test_plugin_version():
    """Behaviour relied on: from 2.7.1 (PR #464) the plugin adds --ntasks-per-gpu only when a rule
    sets tasks/tasks_per_gpu; up to 2.7.0 every GPU job got --ntasks-per-gpu=1, so a `gpu: 2` job
    ran its command twice (issues #316, #459). The SLURM run below checks the sbatch calls too."""
    v = version("snakemake-executor-plugin-slurm")
    assert tuple(int(x) for x in re.findall(r"\d+", v)[:3]) >= (2, 7, 1), \
        f"snakemake-executor-plugin-slurm {v}: GPU jobs would get --ntasks-per-gpu=1; pyproject.toml asks >= 2.7.1"


def test_slurm_profile_is_what_a_user_copies():
    prof = yaml.safe_load((REPO / PROFILE / "config.yaml").read_text())
    assert prof["executor"] == "slurm" and prof["slurm-requeue"] is True
    assert prof["slurm-status-command"] == "squeue"     # sacct: a scancel'ed job is never seen to end
    default, per_rule = prof["default-resources"], prof["set-resources"]
    assert set(per_rule) <= _rule_names(), f"set-resources names no rule: {set(per_rule) - _rule_names()}"
    assert set(per_rule) == GPU_RULES
    # placeholders nobody can miss: sbatch and the plugin reject them, naming them
    assert default["slurm_partition"].startswith("EDIT_ME") and default["slurm_account"].startswith("EDIT_ME")
    for rule, res in per_rule.items():
        # training rules take gpu = the phase's nproc_per_node from the rule itself
        assert res["slurm_partition"].startswith("EDIT_ME") and res.get("gpu", 1) == 1, rule
        assert ("gpu" in res) == (rule not in ("train", "train_lora")), rule
        assert not {"tasks", "tasks_per_gpu", "gres"} & set(res), f"{rule}: tasks on a GPU rule"
        assert res["runtime"] > 0 and res["mem_mb"] > 0, rule
    assert "gpu" not in default and "tasks" not in default
    # sized for config/snac_24khz.yaml: the loader workers and the trainer each get a CPU
    real = yaml.safe_load((REPO / "config/snac_24khz.yaml").read_text())["train"]["defaults"]
    for rule in ("train", "train_lora"):
        assert per_rule[rule]["cpus_per_task"] >= real["num_workers"] + 1, rule
        assert per_rule[rule]["mem_mb"] >= 32000, rule


def test_a_command_outlives_its_log_pipe():
    """SLURM sends SIGTERM to every process of a cancelled or preempted job at once, so the rule's
    `| tee {log}` dies while a trainer still checkpoints; its prints must not kill it. A pipe whose
    reader is gone, written through pipeline.__main__'s stdout wrapper: no BrokenPipeError."""
    import os
    from pipeline.__main__ import _OutlivesItsReader
    r, w = os.pipe()
    os.close(r)                                        # tee is gone
    raw = os.fdopen(w, "w")
    with pytest.raises(BrokenPipeError):               # what a bare stdout does
        raw.write("x" * 100_000)
        raw.flush()
    try:
        raw.close()
    except BrokenPipeError:
        pass
    r, w = os.pipe()
    os.close(r)
    out = _OutlivesItsReader(os.fdopen(w, "w"))
    for _ in range(3):
        out.write("checkpoint written\n" * 10_000)
        out.flush()
    assert os.path.samestat(os.fstat(out.fileno()), os.stat(os.devnull))
    out.close()


def _test_profile(root: Path, **speed) -> dict:
    """The tree's copy of the profile with OVERRIDE applied wherever the profile sets those keys,
    and nothing else changed."""
    path = root / PROFILE / "config.yaml"
    prof = yaml.safe_load(path.read_text())
    before = json.loads(json.dumps(prof))
    for res in (prof["default-resources"], *prof["set-resources"].values()):
        for k, v in OVERRIDE.items():
            if k in res and v is None:
                del res[k]
            elif k in res:
                res[k] = v
    prof.update(SPEED, **speed)
    path.write_text("# tests/test_slurm.py: workflow/profiles/slurm with OVERRIDE and SPEED\n"
                    + yaml.safe_dump(prof, sort_keys=False))
    for rule, res in prof["set-resources"].items():        # the GPU requests stay as the user has them
        assert {k: v for k, v in res.items() if k not in OVERRIDE} == \
               {k: v for k, v in before["set-resources"][rule].items() if k not in OVERRIDE}
    return prof


# ---- running Snakemake against the cluster -----------------------------------------------------
def _cmd(targets=(), configfiles=("fast.yaml",), extra=()):
    # --verbose: the plugin then logs every sbatch call
    return [sys.executable, "-c", SNAKEMAKE, *targets, "--workflow-profile", PROFILE,
            "--configfile", *configfiles, "--verbose", *extra]


def _scancel_run(out: str) -> None:
    """Cancel whatever a run left in the queue (only that run's jobs: they carry its run ID)."""
    for run_id in RUN_ID.findall(out):
        subprocess.run(["scancel", f"--name={run_id}"], capture_output=True, timeout=60)


class Run:
    """One `snakemake` against the cluster in the background, output to a file; always cleaned up."""

    def __init__(self, root: Path, log: Path, timeout: int, **kw):
        self.root, self.log = root, log
        self.t0 = time.monotonic()
        with open(log, "w") as f:
            self.p = subprocess.Popen(["timeout", "-k", "30", str(timeout), *_cmd(**kw)], cwd=root, env=run_env(),
                                      stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def out(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self) -> Result:
        try:
            rc = self.p.wait()
        finally:
            self.stop()
        out = self.out()
        return Result(rc, out, time.monotonic() - self.t0, parse_jobs(out))

    def stop(self):
        if self.p.poll() is None:                  # Snakemake ignores SIGTERM; Ctrl-C cancels its jobs
            os.killpg(self.p.pid, signal.SIGINT)
            try:
                self.p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        _scancel_run(self.out())


def _headers(root: Path, log: str) -> list:
    return HEADER.findall((root / log).read_text(errors="replace"))


# ---- 1. the demo through SLURM --------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm_built(tmp_path_factory):
    root = make_tree(tmp_path_factory.mktemp("slurm") / "tree")
    _test_profile(root)
    r = Run(root, root.parent / "snakemake.out", timeout=1500).wait()
    assert r.rc == 0, r.out[-8000:]
    return root, r


@pytest.mark.slurm
@needs_slurm
def test_every_rule_is_a_slurm_job_and_gpu_rules_get_a_gpu(slurm_built):
    root, r = slurm_built
    stats = job_stats(r.out)
    assert stats is not None, r.out[-4000:]
    jobs = {j["jobid"]: j for j in r.jobs if "jobid" in j}
    submitted = {jid: (slurm_id, logdir) for jid, slurm_id, logdir in SUBMITTED.findall(r.out)}
    sbatch = dict((logdir, call) for call, logdir in SBATCH.findall(r.out))   # one log folder per job

    # every job but the local `all` went to SLURM, once (and the run succeeding means SLURM said
    # COMPLETED for each)
    remote = {jid: j for jid, j in jobs.items() if j["rule"] != "all"}
    assert set(submitted) == set(remote), (sorted(submitted), sorted(remote))
    assert sum(stats.values()) - stats.get("all", 0) == len(submitted) == len({i for i, _ in submitted.values()})
    assert len(SBATCH.findall(r.out)) == len(sbatch) == len(submitted)

    by_rule = {}
    for jid, (slurm_id, logdir) in submitted.items():
        job = remote[jid]
        rule = job["rule"]
        by_rule.setdefault(rule, 0)
        by_rule[rule] += 1
        call = sbatch[logdir]
        assert f"--comment rule_{rule}" in call, (rule, call)
        # the job's own first line: exactly one (the command ran once), inside this SLURM job
        heads = _headers(root, job["log"])
        assert len(heads) == 1, (job["log"], heads)
        _command, host, job_id, cvd = heads[0]
        assert job_id == slurm_id, (job["log"], heads, slurm_id)
        if rule in GPU_RULES:
            assert "--gpus=1" in call and "--ntasks" not in call, call
            assert cvd in ("0", "1"), (job["log"], heads)          # the node's two fake GPUs
        else:
            assert rule in CPU_RULES, rule
            assert "--gpus" not in call and "--ntasks=1" in call, call
            assert cvd == "-", (job["log"], heads)
    assert set(by_rule) == GPU_RULES | CPU_RULES, by_rule


@pytest.mark.slurm
@needs_slurm
@pytest.mark.filterwarnings("ignore:Object at .snakemake_timestamp")     # zarr, on Snakemake's marker file
def test_slurm_outputs_equal_the_local_run(slurm_built, built):
    """Same config, same code, same machine, same threads (2) per job: every tensor of final.pt and
    of each phase's model, every cache shard's codes and targets, and eval.json are equal, exactly
    (tolerance 0: the runs are deterministic)."""
    a, b = slurm_built[0] / "results", built[0] / "results"
    pa = torch.load(a / "phase11/final.pt", map_location="cpu", weights_only=True)
    pb = torch.load(b / "phase11/final.pt", map_location="cpu", weights_only=True)
    assert pa["config"] == pb["config"]
    assert set(pa["state_dict"]) == set(pb["state_dict"])
    differ = [k for k, v in pa["state_dict"].items() if not torch.equal(v, pb["state_dict"][k])]
    assert not differ, differ
    models = sorted(p.relative_to(b) for p in (b / "phase11").rglob("model.safetensors") if "checkpoints" not in p.parts)
    assert len(models) >= 4 and models == sorted(p.relative_to(a) for p in (a / "phase11").rglob("model.safetensors")
                                                 if "checkpoints" not in p.parts)
    for m in models:
        x, y = load_file(a / m), load_file(b / m)
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), m

    import numpy as np
    import zarr
    for cache in ("cache", "cache_heldout"):
        shards = sorted(p.name for p in (b / cache).glob("shard-*.zarr"))
        assert shards and shards == sorted(p.name for p in (a / cache).glob("shard-*.zarr"))
        for s in shards:
            x, y = (zarr.open_group(r / cache / s, mode="r") for r in (a, b))
            names = sorted(x.array_keys())
            assert names == sorted(y.array_keys()) and any(n.startswith("codes_") for n in names), s
            for n in names:                                  # codes, 48 kHz targets, offsets, table
                assert np.array_equal(x[n][:], y[n][:]), (s, n)
            for k in ("fingerprint", "ids", "rejects"):
                assert x.attrs[k] == y.attrs[k], (s, k)

    ea, eb = (json.loads((r / "phase11/eval.json").read_text()) for r in (a, b))
    assert ea["models"] == eb["models"] and all(math.isfinite(v) for m in ea["models"].values() for v in m.values())
    for split in ("precompute", "precompute/heldout"):
        sa, sb = (json.loads((r / split / "summary.json").read_text()) for r in (a, b))
        assert {k: v for k, v in sa.items() if "second" not in k} == {k: v for k, v in sb.items() if "second" not in k}


# ---- 2. scancel, the user's rerun, then preemption ------------------------------------------------
# A warmup phase long enough to be interrupted twice; every step logged, a checkpoint every 10.
STEPS, CKPT = 50, 10
RESUME_YAML = f"train: {{warmup: {{steps: {STEPS}, ckpt_every: {CKPT}, val_every: {STEPS}, log_every: 1}}}}\n"
WARMUP = "results/phase11/warmup/model.safetensors"
TRAIN_JOB = re.compile(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_train/")
RESUMING = re.compile(r"resuming\s+warmup\s+from\s+(\S+)\s+\(step\s+(\d+)\s+of\s+(\d+)\)")


def _step_dirs(ck: Path) -> list:
    return sorted(int(d.name[5:]) for d in ck.glob("step_*")) if ck.is_dir() else []


def _logged_steps(metrics: Path) -> list:
    if not metrics.is_file():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        try:
            out.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass                                    # a line being written
    return out


def _until(run: Run, what: str, check, seconds=600, every=0.05):
    """Poll check() until it returns something truthy, while the run is alive."""
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if got:
            return got
        assert run.p.poll() is None, f"the run ended before {what}:\n{run.out()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} within {seconds} s:\n{run.out()[-4000:]}"
        time.sleep(every)


def _state(job: str) -> str:
    p = subprocess.run(["squeue", "-h", "-j", job, "--states=all", "-o", "%T"], capture_output=True, text=True, timeout=60)
    return p.stdout.strip()


@pytest.mark.slurm
@needs_slurm
def test_scancel_then_rerun_resumes_and_requeue_loses_no_step(slurm_built, tmp_path):
    root = clone_tree(slurm_built[0], tmp_path / "resume")
    shutil.rmtree(root / "results/phase11")
    (root / "resume.yaml").write_text(RESUME_YAML)
    cfgs = ("fast.yaml", "resume.yaml")
    out = root / "results/phase11/warmup"
    ck, metrics, log = out / "checkpoints", out / "metrics.jsonl", root / "results/logs/train/warmup.log"

    # 1. the user cancels the running training job: the run fails, naming it
    run = Run(root, tmp_path / "run1.out", timeout=900, targets=[WARMUP], configfiles=cfgs)
    try:
        job = _until(run, "a training job", lambda: TRAIN_JOB.findall(run.out()), every=0.5)[0]
        _until(run, f"a step checkpoint >= {CKPT}", lambda: _step_dirs(ck) and _step_dirs(ck)[-1] >= CKPT)
        subprocess.run(["scancel", job], check=True, timeout=60)
        r = run.wait()
    finally:
        run.stop()
    assert r.rc != 0 and f"SLURM-job '{job}' failed" in r.out and "CANCELLED" in r.out, r.out[-4000:]
    cancelled_at = _step_dirs(ck)[-1]
    assert CKPT <= cancelled_at < STEPS and not (root / WARMUP).exists()

    # 2. the user's rerun (same command) resumes from the last checkpoint, in a new SLURM job ...
    run = Run(root, tmp_path / "run2.out", timeout=900, targets=[WARMUP], configfiles=cfgs)
    try:
        job2 = _until(run, "a training job", lambda: TRAIN_JOB.findall(run.out()), every=0.5)[0]
        m = _until(run, "the resume line", lambda: log.is_file() and RESUMING.search(log.read_text(errors="replace")))
        assert m.group(1).endswith(f"step_{cancelled_at:07d}") and int(m.group(2)) == cancelled_at, m.group(0)
        assert int(m.group(3)) == STEPS
        head = _headers(root, log.relative_to(root))
        assert job2 != job and len(head) == 1 and head[0][2] == job2 and head[0][3] in ("0", "1"), head

        # 3. ... which SLURM then preempts: requeue (the profile submits with --requeue) sends it
        # SIGTERM, the trainer checkpoints the step it is on and exits; the job waits in the queue.
        # Requeued just after a periodic checkpoint: 9 steps before the next one, only a SIGTERM
        # checkpoint loses nothing.
        _until(run, "more steps", lambda: (lambda s: s and s[-1] > cancelled_at + 5 and s[-1] % CKPT == 1)(
            _logged_steps(metrics)), seconds=300)
        subprocess.run(["scontrol", "requeue", job2], check=True, timeout=60)
        _until(run, "the requeued job back in the queue", lambda: _state(job2) == "PENDING", seconds=120)
        last_logged, on_disk = _logged_steps(metrics)[-1], _step_dirs(ck)
        # SLURM holds a requeued job ~2 minutes before it may start again; the test does not wait
        subprocess.run(["scontrol", "update", f"JobId={job2}", "StartTime=now"], check=True, timeout=60)
        r = run.wait()
    finally:
        run.stop()
    assert r.rc == 0, r.out[-4000:]
    assert all("--requeue" in call for call, _ in SBATCH.findall(r.out)), "the profile's slurm-requeue is off"
    # the same SLURM job came back and resumed from a checkpoint of the last step it had computed
    heads = _headers(root, log.relative_to(root))
    assert [h[2] for h in heads] == [job2], heads
    m = RESUMING.search(log.read_text(errors="replace"))
    assert m, log.read_text()[-3000:]
    resumed = int(m.group(2))
    assert on_disk and on_disk[-1] >= last_logged, (
        f"preempted after step {last_logged} but the newest checkpoint is step {on_disk[-1] if on_disk else None}: "
        "the trainer must checkpoint on SIGTERM (finish the step, write step_NNNNNNN, exit non-zero)")
    assert resumed == on_disk[-1] and m.group(1).endswith(f"step_{resumed:07d}"), (m.group(0), on_disk)
    steps = _logged_steps(metrics)
    assert steps == list(range(1, STEPS + 1)), steps   # every step logged once
    assert (root / WARMUP).is_file()
