"""Data-parallel training, on CPU with gloo: two processes end where one does, resume exactly
after a kill, agree on skipping a non-finite step, and rank 0 alone writes; plus the torchrun /
srun command a phase of several processes is launched with."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT, TINY_24K, run, settings, tiny_codec
from safetensors.torch import load_file

from pipeline.model.codecs import snac as M
from pipeline.settings import run_settings, runtime_settings
from pipeline.training import train as T
from pipeline.training.distributed import launch_command
from pipeline.model import codecs

# 1 process vs 2: the gradients are the same means summed in another order, equal to float
# rounding; Adam's normalisation turns a rounding difference in a near-zero gradient into up to a
# whole lr-sized step, so the bound is relative to how far training moved the weights.
TOLERANCE = 0.02          # of the largest change of any weight over the run


@pytest.fixture(scope="module")
def quiet_cache(tmp_path_factory):
    """A cache from a codec without noise blocks: with noise, the process count would change which
    random noise each segment's decoding draws."""
    from pipeline.data.demo import generate_demo
    from pipeline.data.precompute import run_shard
    d = tmp_path_factory.mktemp("ddp")
    generate_demo(d / "demo", seed=6, n_train=4, n_heldout=2, min_seconds=1.2, max_seconds=1.6)
    tiny_codec(config=dict(TINY_24K, noise=False)).save(d / "codec")
    run_shard(d / "demo/manifest.jsonl", 0, 1, codecs.load(d / "codec"), d / "cache/shard-000.zarr")
    run_shard(d / "demo/heldout.jsonl", 0, 1, codecs.load(d / "codec"), d / "heldout/shard-000.zarr")
    return d


SETTINGS = settings(steps=6, grad_accum=2, val_every=3, ckpt_every=2, log_every=1, val_batches=2)


def cli(d, out, nproc, s=SETTINGS):
    """`python -m pipeline train` as the rule runs it (the shell ignores SIGTERM, like the rule's trap)."""
    knobs = {**runtime_settings(s), "nproc_per_node": nproc}
    cmd = [sys.executable, "-m", "pipeline", "train", "--phase", "warmup", "--settings", json.dumps(run_settings(s)),
           "--runtime", json.dumps(knobs), "--codec", str(d / "codec"), "--target-rate", "48000",
           "--cache", str(d / "cache/shard-000.zarr"), "--heldout", str(d / "heldout/shard-000.zarr"), "--out", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))


def finished(p, timeout=600) -> str:
    out = p.communicate(timeout=timeout)[0]
    assert p.returncode == 0, out[-4000:]
    return out


def weights(out):
    return load_file(Path(out) / "model.safetensors")


def metric(out, key):
    p = Path(out) / "metrics.jsonl"
    return [json.loads(l).get(key) for l in p.read_text().splitlines()] if p.exists() else []


@pytest.mark.slow
def test_two_processes_end_where_one_does_and_resume_exactly_after_a_kill(quiet_cache, tmp_path):
    d = quiet_cache
    run(d, "warmup", SETTINGS, tmp_path / "one")
    finished(cli(d, tmp_path / "two", 2))                 # torchrun, started by `python -m pipeline train`
    items = {i["item"]: i["detail"] for i in json.loads((tmp_path / "two/preflight.json").read_text())["items"]}
    assert items["processes"] == "2 (batch 2: 1 segments per process)"
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    start = M.from_codec(codecs.load(d / "codec"), 48000, "smart", seed=0).state_dict()
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    differ = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"1 vs 2 processes: max |difference| {differ:.2e}, max |change| {moved:.2e}")
    assert differ <= TOLERANCE * moved
    assert any(not torch.equal(one[k], two[k]) for k in one if "new_block" in k)   # really two processes
    assert metric(tmp_path / "two", "step") == list(range(1, 7))                   # rank 0 alone writes
    assert len(list((tmp_path / "two/tensorboard").glob("events.*"))) == 1
    for a, b in zip(metric(tmp_path / "one", "val/loss"), metric(tmp_path / "two", "val/loss")):
        assert (a is None) == (b is None) and (a is None or abs(a - b) <= 1e-5 * abs(a))   # split, summed
    # the logged losses are the whole batch's, not rank 0's share: step 1 (same weights) to float
    # rounding, later steps as close as the weights are
    for key in ("train/loss", "train/l1", "train/stft", "train/mel"):
        a, b = metric(tmp_path / "one", key), metric(tmp_path / "two", key)
        assert len(a) == 6 and abs(a[0] - b[0]) <= 1e-5 * abs(a[0]), (key, a, b)
        assert all(abs(x - y) <= 1e-3 * abs(x) for x, y in zip(a, b)), (key, a, b)

    # SIGTERM to both processes (as SLURM signals every process of a job): they stop after the same
    # step with one checkpoint; two processes resume from it and end where the uninterrupted run ended
    # (both started alike here, in-process: torchrun's start differs from it in the last float bit)
    join(spawn(d, tmp_path / "straight"))
    straight = weights(tmp_path / "straight")
    ctx = spawn(d, tmp_path / "killed")
    deadline = time.monotonic() + 300
    while len(metric(tmp_path / "killed", "step")) < 2:
        assert all(p.is_alive() for p in ctx.processes) and time.monotonic() < deadline
        time.sleep(0.05)
    for p in ctx.processes:
        os.kill(p.pid, signal.SIGTERM)
    with pytest.raises(mp.ProcessRaisedException, match="stopped at step"):
        join(ctx)
    stopped = metric(tmp_path / "killed", "step")[-1]
    assert stopped < 6 and (tmp_path / f"killed/checkpoints/step_{stopped:07d}").is_dir()
    join(spawn(d, tmp_path / "killed"))
    resumed = weights(tmp_path / "killed")
    assert json.loads((tmp_path / "killed/preflight.json").read_text())["items"][-1]["detail"].endswith(
        f"(step {stopped} of 6)")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def _rank(rank, d, out, port, nan_at=None):
    """One of two processes of a phase; with nan_at, rank 1 meets a NaN target in that batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from pipeline.data.segments import SegmentBatches
    real = SegmentBatches.__getitem__

    def item(self, k):
        codes, target, mask = real(self, k)
        if k == nan_at and rank == 1:
            target = target * float("nan")
        return codes, target, mask
    SegmentBatches.__getitem__ = item
    return T.train("warmup", SETTINGS, d / "codec", [d / "cache/shard-000.zarr"], [d / "heldout/shard-000.zarr"],
                   None, out, target_rate=48000)


def spawn(d, out, nan_at=None):
    with socket.socket() as sock:                  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return mp.start_processes(_rank, args=(d, out, port, nan_at), nprocs=2, join=False, start_method="spawn")


def join(ctx, seconds=600):
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "a rank hangs"


def test_ranks_agree_on_skipping_a_nonfinite_step(quiet_cache, tmp_path):
    """Only rank 1's loss is NaN (micro-batch 3, step 2): both ranks skip step 2 and go on; none hangs."""
    join(spawn(quiet_cache, tmp_path / "out", nan_at=3))
    records = [json.loads(l) for l in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 3, 4, 5, 6]        # step 2 skipped
    assert records[-1]["nonfinite_total"] == 1


def _mean_terms(rank, port, out):
    import torch.distributed as dist
    from pipeline.training.distributed import Group
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # rank r's share: two micro-batches of losses (tensors) and a float term
        got = Group(rank, 2).mean_terms({"loss": [torch.tensor(1.0 + rank), torch.tensor(3.0 + rank)],
                                         "l1": 0.5 * rank})
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(got))


def test_logged_losses_are_the_whole_batchs(tmp_path):
    """Before: train/loss (and every train/* term) was rank 0's share of the batch only (step 61:
    3.6733 logged vs 3.9487 over the whole batch). mean_terms averages each term over the
    micro-batches, then over ranks, in one all_reduce; the 1-process run's logged losses equal
    the 2-process run's (test_two_processes_end_where_one_does_...)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    join(mp.start_processes(_mean_terms, args=(port, str(tmp_path)), nprocs=2, join=False, start_method="spawn"))
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"loss": 2.5, "l1": 0.25}          # (mean(1, 3) + mean(2, 4)) / 2, (0 + 0.5) / 2


def test_launch_commands():
    argv = ["train", "--phase", "full", "--out", "results/phase11/full"]
    assert launch_command(argv, 1, 1, env={}) is None
    assert launch_command(argv, 2, 1, env={"LOCAL_RANK": "0"}) is None          # already a rank
    assert launch_command(argv, 2, 1, env={}) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "--nnodes=1",
        "-m", "pipeline", *argv]
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    hosts = {"gpu[07-08]": ["gpu07", "gpu08"]}
    assert launch_command(argv, 8, 2, env=env, hostnames=hosts.get) == [
        "srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=8", "--nnodes=2",
        "--rdzv-backend=c10d", "--rdzv-endpoint=gpu07:29500", "--rdzv-id=4242", "-m", "pipeline", *argv]
    with pytest.raises(RuntimeError, match="nnodes 2 needs a SLURM allocation"):
        launch_command(argv, 8, 2, env={})
