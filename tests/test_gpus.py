"""GPU jobs on one machine never share a GPU (pipeline/gpus.py), shown with fake GPUs on CPU:
PHASE11_GPUS stands in for the machine's GPU count, PHASE11_GPU_LOCKS keeps each test's locks apart.

Claims are made by real processes (a lock belongs to a process and dies with it): concurrent claims
get distinct devices, a claim that finds none free waits and gets the one freed, a killed holder
frees its device, and the `python -m pipeline` commands that use a GPU claim one and print it.
"""
from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import gpus

ROOT = Path(__file__).resolve().parents[1]
HEADER = re.compile(r"^pipeline (\S+) on (\S+): SLURM_JOB_ID=(\S+) CUDA_VISIBLE_DEVICES=(\S*)$", re.M)

# A process that claims n GPUs, prints what it got, then holds them until its stdin closes.
HOLDER = """
import sys
from pipeline import gpus
got = gpus.claim(int(sys.argv[1]), poll=0.05)
print("got", ",".join(got) if got is not None else "none", flush=True)
sys.stdin.read()
"""


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", gpus.CLAIMED, "LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    env.update({"PHASE11_GPU_LOCKS": str(tmp_path / "locks"), "PYTHONPATH": str(ROOT), **extra})
    return env


class Holder:
    def __init__(self, env, n=1):
        self.p = subprocess.Popen([sys.executable, "-c", HOLDER, str(n)], env=env, cwd=ROOT, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def got(self, timeout=60) -> str:
        """The devices it claimed; waits until it has them."""
        line = _readline(self.p.stdout, timeout)
        assert line.startswith("got "), (line, self.p.stderr.read() if self.p.poll() is not None else "")
        return line[4:].strip()

    def release(self):
        self.p.stdin.close()
        self.p.wait(timeout=30)

    def kill(self):
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(timeout=30)


def _readline(stream, timeout):
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    assert sel.select(timeout), f"nothing within {timeout} s"
    return stream.readline()


def _blocked(h: Holder, seconds=1.5) -> bool:
    """True if h is still waiting for a device after `seconds` (and says so on stderr)."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(h.p.stdout, selectors.EVENT_READ)
    return not sel.select(seconds) and h.p.poll() is None


@pytest.fixture
def holders():
    made = []
    yield lambda env, n=1: made.append(Holder(env, n)) or made[-1]
    for h in made:
        if h.p.poll() is None:
            h.kill()


def test_concurrent_claims_get_distinct_devices_and_wait_when_none_is_free(tmp_path, holders):
    env = _env(tmp_path, PHASE11_GPUS="3")
    first = [holders(env) for _ in range(3)]
    got = [h.got() for h in first]
    assert sorted(got) == ["0", "1", "2"], got                 # three jobs, three devices

    late = holders(env)
    assert _blocked(late), "a fourth claim on 3 GPUs did not wait"
    first[1].release()                                        # a job ends: its device is free again
    assert late.got() == got[1]
    first[2].kill()                                           # SIGKILL: the kernel releases the lock
    assert holders(env).got() == got[2]
    late.release()
    assert "waiting for 1 free GPU(s) of 3" in late.p.stderr.read()


def test_a_multi_gpu_claim_takes_all_or_nothing(tmp_path, holders):
    """A 2-GPU job waiting behind a 1-GPU job holds nothing meanwhile: two 2-GPU jobs can never
    each hold one device and wait for the other forever."""
    env = _env(tmp_path, PHASE11_GPUS="2")
    a = holders(env)
    assert a.got() == "0"
    big = holders(env, 2)
    assert _blocked(big)
    assert holders(env).got() == "1"                          # free, though `big` waits for two
    with pytest.raises(RuntimeError, match="needs 3 GPUs but the machine offers 2"):
        gpus.claim(3, env=_env(tmp_path, PHASE11_GPUS="2"))


def test_which_devices_and_when_nothing_is_claimed(tmp_path):
    assert gpus.devices({"CUDA_VISIBLE_DEVICES": "2,3", "PHASE11_GPUS": "8"}) == ["2", "3"]
    assert gpus.devices({"CUDA_VISIBLE_DEVICES": "GPU-1a2b,GPU-3c4d"}) == ["GPU-1a2b", "GPU-3c4d"]
    assert gpus.devices({"CUDA_VISIBLE_DEVICES": ""}) == [] == gpus.devices({"CUDA_VISIBLE_DEVICES": "-1"})
    assert gpus.devices({"PHASE11_GPUS": "2"}) == ["0", "1"]
    assert gpus.lock_dir({"PHASE11_GPU_LOCKS": "/x"}) == Path("/x")
    assert gpus.lock_dir({"PHASE11_GPU_LOCKS": "/x", "SLURM_JOB_ID": "17"}) == Path("/x/slurm-17")

    # a user's CUDA_VISIBLE_DEVICES is the set to claim from
    env = _env(tmp_path, CUDA_VISIBLE_DEVICES="5,7")
    assert gpus.claim(1, env=env) == ["5"] and env["CUDA_VISIBLE_DEVICES"] == "5"
    assert gpus.claim(1, env=_env(tmp_path, CUDA_VISIBLE_DEVICES="5,7")) == ["7"]
    # nothing to claim: no GPU, zero asked, a child of a claimer (would wait on its own parent), a torchrun rank
    for extra in ({}, {"PHASE11_GPUS": "0"}, {"PHASE11_GPUS": "2", gpus.CLAIMED: "1"},
                  {"PHASE11_GPUS": "2", "LOCAL_RANK": "0"}):
        env = _env(tmp_path, **extra)
        if not extra:
            env.pop("PHASE11_GPUS", None)
            if os.path.isdir("/proc/driver/nvidia/gpus"):
                continue                                     # a real GPU machine: there is one
        assert gpus.claim(1, env=env) is None and "CUDA_VISIBLE_DEVICES" not in env, extra
    assert gpus.claim(0, env=_env(tmp_path, PHASE11_GPUS="2")) is None


@pytest.mark.slow
def test_gpu_commands_claim_a_device_and_print_where_they_run(tmp_path):
    """`python -m pipeline evaluate` (like train and precompute-shard) claims a free GPU before
    anything else; its first line says which. A CPU command claims nothing."""
    env = _env(tmp_path, PHASE11_GPUS="2", SLURM_JOB_ID="4242")
    locks = gpus.lock_dir(env)
    locks.mkdir(parents=True)
    fd = os.open(locks / "gpu-0.lock", os.O_RDWR | os.O_CREAT)   # another job holds GPU 0
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        r = subprocess.run([sys.executable, "-m", "pipeline", "evaluate", "--codec", str(tmp_path / "none"),
                            "--heldout", "x", "--out", str(tmp_path / "e.json")],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        os.close(fd)
    # it got past the claim to its first check (the held-out cache: its fingerprint says the n_q the
    # codec is loaded with)
    assert r.returncode == 1 and "x: shard folder missing" in " ".join(r.stdout.split()), r.stdout + r.stderr
    assert HEADER.findall(r.stderr) == [("evaluate", os.uname().nodename, "4242", "1")], r.stderr
    # the demo codec trains on a GPU of its own too (GPU 0 is free again)
    r = subprocess.run([sys.executable, "-m", "pipeline", "demo-codec", "--manifest", str(tmp_path / "none.jsonl"),
                        "--out", str(tmp_path / "codec"), "--settings", "{}"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert HEADER.findall(r.stderr) == [("demo-codec", os.uname().nodename, "4242", "0")], r.stderr

    # a CPU command, or a GPU command told to run on the CPU, claims nothing
    env = _env(tmp_path, PHASE11_GPUS="2", PHASE11_GPU_LOCKS=str(tmp_path / "other"))
    r = subprocess.run([sys.executable, "-m", "pipeline", "cache-info", str(tmp_path)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert HEADER.findall(r.stderr) == [("cache-info", os.uname().nodename, "-", "-")], r.stderr
    r = subprocess.run([sys.executable, "-m", "pipeline", "evaluate", "--codec", str(tmp_path / "none"),
                        "--heldout", "x", "--out", str(tmp_path / "e.json"), "--settings", '{"device": "cpu"}'],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert HEADER.findall(r.stderr) == [("evaluate", os.uname().nodename, "-", "-")], r.stderr
    assert not (tmp_path / "other").exists()


# ---- the default profile: Snakemake limits GPU jobs, each job claims its own GPU -----------------
GPU_RULES = {"precompute_shard", "train", "train_lora", "evaluate"}
PROFILE = "workflow/profiles/default/config.yaml"
# Named explicitly: Snakemake looks for profiles/default/ beside the Snakefile or in the working
# directory, not in workflow/profiles/default/, so with the Snakefile at the top level it is not
# picked up by itself.
USE_PROFILE = ("--workflow-profile", "workflow/profiles/default")


def test_default_profile_declares_the_gpus_and_the_gpu_rules_ask_for_one(built, tmp_path):
    from workflow_util import clone_tree, dry_run
    root = clone_tree(built[0], tmp_path / "t")
    r = dry_run(root, extra=("--forceall", *USE_PROFILE))
    seen = set()
    for j in r.jobs:
        if j["rule"] == "all":
            continue
        seen.add(j["rule"])
        asks = re.search(r"\bgpu=(\d+)", j.get("resources", ""))
        assert (asks and asks.group(1)) == ("1" if j["rule"] in GPU_RULES else None), j
    assert GPU_RULES <= seen


def test_concurrent_gpu_jobs_get_their_own_gpu(built, tmp_path):
    """The profile's line changed to 2 GPUs (faked by PHASE11_GPUS=2): the two LoRA adapter jobs
    run at once, each on its own device, and say which in their logs."""
    from workflow_util import clone_tree, lora_adapters, merged_config, snakemake
    root = clone_tree(built[0], tmp_path / "t")
    adapters, _ = lora_adapters(merged_config(root))
    assert len(adapters) >= 2
    prof = root / PROFILE
    text, n = re.subn(r"(?m)^(resources:\n  gpu:) 1\b", r"\1 2", prof.read_text())
    assert n == 1, "the default profile no longer declares `resources: gpu: 1`"
    prof.write_text(text)
    targets = [f"results/phase11/lora/{a}/model.safetensors" for a in adapters[:2]]
    with pytest.MonkeyPatch.context() as mp:                  # run_env() copies os.environ
        mp.setenv("PHASE11_GPUS", "2")
        mp.setenv("PHASE11_GPU_LOCKS", str(tmp_path / "locks"))
        r = snakemake(root, targets, extra=("--cores", "4", *USE_PROFILE, "--forcerun", "train_lora"),
                      timeout=600)
    assert r.rc == 0, r.out[-4000:]
    assert re.search(r'Provided resources: gpu=(Resource\("gpu", )?2\b', r.out), r.out[:3000]   # the changed line
    devices = []
    for a in adapters[:2]:
        heads = HEADER.findall((root / f"results/logs/train/lora-{a}.log").read_text())
        assert len(heads) == 1 and heads[0][0] == "train", heads
        devices.append(heads[0][3])
    # each claims the lowest free device: had they not overlapped, both would have had GPU 0
    assert sorted(devices) == ["0", "1"], devices
