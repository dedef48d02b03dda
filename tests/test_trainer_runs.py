"""What a real training run survives: runtime knobs changed between kill and rerun, forced reruns,
non-finite steps, preemption signals, a second trainer, damaged checkpoints, a full disk, a
Snakemake that dies; and the precision split, schedules, accounting and target-rate checks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_24K, run, settings, speechlike, tiny_codec
from safetensors.torch import load_file

from pipeline.data.segments import SegmentBatches
from pipeline.model.codecs import snac as M
from pipeline.settings import RUNTIME_KEYS, run_settings
from pipeline.training import checkpoint as C
from pipeline.training import train as T
from pipeline.training.guards import Locked, PhaseLock
from pipeline.training.preflight import PreflightFailed
from pipeline.training.schedules import lr_lambda
from pipeline.training.stages import DecoderRun, bf16_split

_STRAIGHT = {}


def weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def straight(small_cache, tmp_path_factory, s):
    """Final weights of an uninterrupted run of `s` (memoised: several tests compare with it)."""
    key = json.dumps(s, sort_keys=True)
    if key not in _STRAIGHT:
        out = tmp_path_factory.mktemp("straight")
        run(small_cache, "warmup", s, out)
        _STRAIGHT[key] = weights(out)
    return _STRAIGHT[key]


def killed_at(small_cache, out, s, step, monkeypatch):
    """Run `s` into `out` and stop it like a kill right after the checkpoint of `step`."""
    real = T.save

    def save_then_die(t):
        real(t)
        if t.state["step"] == step:
            raise KeyboardInterrupt
    with monkeypatch.context() as mp:
        mp.setattr(T, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run(small_cache, "warmup", s, out)


# ---- run identity -----------------------------------------------------------------------------
def test_runtime_knobs_are_not_part_of_the_run():
    s = settings()
    knobs = dict(num_workers=1, preload=False, device="cpu", log_every=1, val_every=3, val_batches=2,
                 ckpt_every=3, keep_best=2, max_nonfinite=5, resume=False, activation_checkpointing=True,
                 deterministic=True, nproc_per_node=2, nnodes=2, compile=True)
    assert set(knobs) == RUNTIME_KEYS
    assert run_settings(s) == run_settings({**s, **knobs})
    assert run_settings(s) != run_settings({**s, "lr": 2e-3})


def test_killed_run_resumes_under_other_runtime_knobs(small_cache, tmp_path, tmp_path_factory, monkeypatch, capsys):
    """... torch.compile included: dynamo's eager backend runs the captured graphs op for op (the
    wiring of `compile: true`, cheaply; inductor's kernels are the GPU check's business)."""
    from pipeline.training import device as D
    s = settings()
    killed_at(small_cache, tmp_path, s, 4, monkeypatch)
    before = json.loads((tmp_path / "checkpoints/step_0000004/trainer_state.json").read_text())["run"]
    capsys.readouterr()
    knobs = dict(num_workers=1, log_every=1, ckpt_every=3, val_every=3, keep_best=2, activation_checkpointing=True,
                 compile=True)
    monkeypatch.setattr(D, "BACKEND", "eager")
    # in a Snakemake working directory compiled kernels go to .snakemake/, shared by its jobs and
    # kept across restarts (torch's default, /tmp, is the node's own); the user's choice wins
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.chdir(tmp_path_factory.mktemp("workdir"))
    Path(".snakemake").mkdir()
    state = run(small_cache, "warmup", {**s, **knobs}, tmp_path)
    out = capsys.readouterr().out
    assert "resuming warmup from" in out
    cache = str(Path(".snakemake/torchinductor").resolve())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == cache
    assert f"torch.compile (eager, kernels cached in {cache})" in (tmp_path / "preflight.json").read_text()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    assert D.compile_cache() == "/elsewhere"
    assert state["step"] == 8 and state["run"] == before
    assert same_weights(weights(tmp_path), straight(small_cache, tmp_path_factory, s))


def test_finished_run_asked_again_trains_from_step_0(small_cache, tmp_path, tmp_path_factory, capsys):
    """What Snakemake's --forcerun does: the job runs again although its run had finished."""
    s = settings()
    run(small_cache, "warmup", s, tmp_path)
    first = json.loads((tmp_path / "config.json").read_text())["run"]
    capsys.readouterr()
    run(small_cache, "warmup", s, tmp_path)
    out = capsys.readouterr().out
    assert "resuming" not in out and "forced rerun" in out and "from step 0" in out
    assert same_weights(weights(tmp_path), straight(small_cache, tmp_path_factory, s))
    assert list((tmp_path / "checkpoints/superseded").glob(f"{first}-*/step_0000008"))   # moved aside
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8


def test_adversarial_phase_resumes_exactly(small_cache, tmp_path, monkeypatch):
    """Discriminator weights, optimizer and scheduler are in every step checkpoint: killed at step
    4 (the discriminators joined at step 3) and resumed, the run ends where an uninterrupted one
    does, generator and discriminators alike (their windows too); every adversarial term is logged."""
    s = settings(adversarial={"enabled": True, "start_step": 2, "periods": [2], "period_channels": [4, 8],
                              "stft_n_ffts": [256], "stft_channels": 4, "crop_seconds": 0.1})
    run(small_cache, "warmup", s, tmp_path / "straight")
    killed_at(small_cache, tmp_path / "killed", s, 4, monkeypatch)
    run(small_cache, "warmup", s, tmp_path / "killed")
    assert same_weights(weights(tmp_path / "killed"), weights(tmp_path / "straight"))
    a, b = (C.read(d / "checkpoints/step_0000008").parts["adversarial"] for d in (tmp_path / "straight", tmp_path / "killed"))
    assert same_weights(a["discriminator"], b["discriminator"]) and a["scheduler"] == b["scheduler"]
    records = [json.loads(l) for l in (tmp_path / "killed/metrics.jsonl").read_text().splitlines()]
    assert "train/adv/d_loss" not in records[0] and records[0]["step"] == 2
    assert {"train/adv/d_loss", "train/adv/g_adversarial", "train/adv/g_feature_matching",
            "train/adv/d_new_band"} <= set(records[-1])


def test_output_chosen_by_rank_sum_and_samples_in_tensorboard(small_cache, tmp_path, monkeypatch):
    """select: rank_sum makes the phase's output the kept checkpoint with the best rank-sum over
    the evaluation's metrics on the validation segments; each validation writes audio and
    spectrograms to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from pipeline.training import metrics as E
    calls, real = [], E.segment_metrics

    def scored(*a, **kw):
        calls.append((kw["n_ffts"], kw["floor_db"]))
        return real(*a, **kw)
    monkeypatch.setattr(E, "segment_metrics", scored)
    s = settings(select="rank_sum", keep_best=2)
    assert run_settings(s)["keep_best"] == 2          # which checkpoints are kept now decides the output
    metrics = {"n_ffts": [128, 256], "lsd_floor_db": -40}          # the evaluation's, not the defaults
    run(small_cache, "warmup", s, tmp_path, metrics=metrics)
    chosen = json.loads((tmp_path / "config.json").read_text())["selected"]
    kept = {d.name for d in C.step_dirs(tmp_path / "checkpoints")}
    assert chosen["checkpoint"] in kept and {r["name"] for r in chosen["ranking"]} == kept
    assert chosen["ranking"][0]["name"] == chosen["checkpoint"] and "lsd_hi_db" in chosen["ranking"][0]["ranks"]
    assert same_weights(weights(tmp_path), C.read(tmp_path / "checkpoints" / chosen["checkpoint"]).weights)
    assert calls and all(c == ((128, 256), -40) for c in calls), calls   # scored with those settings
    tags = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Tags()
    assert any(t.endswith("/warmup") for t in tags["audio"]) and any("spectrogram" in t for t in tags["images"])


# ---- non-finite steps -------------------------------------------------------------------------
class InfGrad(torch.autograd.Function):
    """Identity forward, non-finite gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def with_faults(monkeypatch, nan_loss_at, nan_grad_at):
    """Micro-batch `nan_loss_at` gets a NaN target (non-finite loss); `nan_grad_at` a finite loss
    with non-finite gradients. Keyed by batch index k, so a resumed run meets the same faults."""
    real_item, real_loss = SegmentBatches.__getitem__, T.ReconstructionLoss.forward

    def item(self, k):
        codes, target, *rest = real_item(self, k)
        if k == nan_loss_at:
            target = target.clone()
            target[0, 0, 0] = float("nan")
        if k == nan_grad_at:
            target.fault = True
        return (codes, target, *rest)

    def loss(self, pred, target, *a):
        total, terms = real_loss(self, pred, target, *a)
        if getattr(target, "fault", False):
            total = total + 0.0 * InfGrad.apply(pred.sum())
        return total, terms
    monkeypatch.setattr(SegmentBatches, "__getitem__", item)
    monkeypatch.setattr(T.ReconstructionLoss, "forward", loss)


def test_nonfinite_steps_are_skipped_and_their_batches_consumed(small_cache, tmp_path, monkeypatch, capsys):
    """grad_accum 2: micro-batch 5 (step 3) has a NaN loss, micro-batch 12 (step 7) non-finite
    gradients. Both steps are skipped and counted; killed at step 4 and resumed, the run ends with
    the uninterrupted run's weights (batch k stays a function of (seed, k))."""
    s = settings(grad_accum=2)
    with_faults(monkeypatch, nan_loss_at=5, nan_grad_at=12)
    state = run(small_cache, "warmup", s, tmp_path / "straight")
    out = capsys.readouterr().out
    assert "step 3: non-finite loss, step skipped" in out and "step 7: non-finite gradient norm, step skipped" in out
    assert state["nonfinite_total"] == 2
    killed_at(small_cache, tmp_path / "killed", s, 4, monkeypatch)
    state = run(small_cache, "warmup", s, tmp_path / "killed")
    assert state["nonfinite_total"] == 2
    assert same_weights(weights(tmp_path / "killed"), weights(tmp_path / "straight"))


def test_nonfinite_steps_in_a_row_stop_the_job(small_cache, tmp_path, monkeypatch):
    real = SegmentBatches.__getitem__

    def all_nan_after_3(self, k):
        codes, target, *rest = real(self, k)
        return (codes, target * float("nan") if k >= 3 else target, *rest)
    monkeypatch.setattr(SegmentBatches, "__getitem__", all_nan_after_3)
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row at step 6"):
        run(small_cache, "warmup", settings(steps=20, max_nonfinite=3, val_every=100), tmp_path)


# ---- preemption, one writer, Snakemake's death -----------------------------------------------
def cli(small_cache, out, s, **popen):
    shards = sorted(str(p) for p in (small_cache / "cache").glob("*.zarr"))
    held = sorted(str(p) for p in (small_cache / "heldout").glob("*.zarr"))
    cmd = [sys.executable, "-m", "pipeline", "train", "--phase", "warmup", "--settings", json.dumps(s),
           "--codec", str(small_cache / "codec"), "--target-rate", "48000", "--cache", *shards,
           "--heldout", *held, "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[1], **popen)


def metric_steps(out):
    p = Path(out) / "metrics.jsonl"
    return [json.loads(l)["step"] for l in p.read_text().splitlines()] if p.exists() else []


def wait_for_step(p, out, step, timeout=300):
    deadline = time.monotonic() + timeout
    while not (metric_steps(out) and metric_steps(out)[-1] >= step):
        assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "training too slow to reach the step"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_the_rerun_loses_no_step(small_cache, tmp_path, tmp_path_factory, sig):
    s = settings(steps=30, ckpt_every=100, val_every=100, log_every=1, keep_best=1)
    p = cli(small_cache, tmp_path, s)
    wait_for_step(p, tmp_path, 3)
    p.send_signal(sig)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 128 + sig, out[-3000:]
    stopped = metric_steps(tmp_path)[-1]
    assert 3 <= stopped < 30 and f"stopped at step {stopped} ({signal.Signals(sig).name} received)" in out
    assert C.read(C.step_dir(tmp_path / "checkpoints", stopped)).state["step"] == stopped
    p = cli(small_cache, tmp_path, s)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
    assert f"resuming warmup from {C.step_dir(tmp_path / 'checkpoints', stopped)} (step {stopped} of 30)" in out
    assert metric_steps(tmp_path) == list(range(1, 31))          # 0 steps recomputed, none lost
    assert same_weights(weights(tmp_path), straight(small_cache, tmp_path_factory, s))


def test_second_trainer_fails_at_once_naming_the_holder(small_cache, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]);"
                               "from pipeline.training.guards import PhaseLock\n"
                               "with PhaseLock(sys.argv[1]): print('locked', flush=True); time.sleep(60)",
                               str(tmp_path), str(Path(__file__).resolve().parents[1])],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(Locked, match=f"another trainer is writing {tmp_path} \\(pid {holder.pid} on "):
            run(small_cache, "warmup", settings(), tmp_path)
        assert time.monotonic() - t0 < 5 and not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    with PhaseLock(tmp_path):       # released when its holder died
        pass


def test_trainer_does_not_outlive_the_snakemake_that_started_it(small_cache, tmp_path):
    """A stand-in `snakemake` process starts the trainer and is SIGKILLed: the trainer notices,
    writes a checkpoint and exits, instead of running on beside the user's rerun."""
    fake = tmp_path / "bin" / "snakemake"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport subprocess, sys, time\n"
                    f"p = subprocess.Popen(sys.argv[1:], stdout=open({str(tmp_path / 'log')!r}, 'w'))\n"
                    "print(p.pid, flush=True)\ntime.sleep(600)\n")
    fake.chmod(0o755)
    s = settings(steps=400, ckpt_every=1000, val_every=1000, log_every=1)
    shards = sorted(str(p) for p in (small_cache / "cache").glob("*.zarr"))
    held = sorted(str(p) for p in (small_cache / "heldout").glob("*.zarr"))
    out = tmp_path / "phase"
    sm = subprocess.Popen([str(fake), sys.executable, "-m", "pipeline", "train", "--phase", "warmup", "--settings",
                           json.dumps(s), "--codec", str(small_cache / "codec"), "--target-rate", "48000",
                           "--cache", *shards, "--heldout", *held, "--out", str(out)],
                          stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    trainer = int(sm.stdout.readline())
    wait_for_step(sm, out, 2)
    sm.kill()
    sm.wait()
    deadline = time.monotonic() + 60
    while Path(f"/proc/{trainer}").exists() and open(f"/proc/{trainer}/stat").read().split()[2] != "Z":
        assert time.monotonic() < deadline, "the trainer outlived Snakemake"
        time.sleep(0.1)
    newest = C.step_dirs(out / "checkpoints")[-1]
    assert C.step_of(newest) >= 2 and C.read(newest).state["step"] == C.step_of(newest)


# ---- checkpoints you can trust ------------------------------------------------------------------
@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"])
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(small_cache, tmp_path, tmp_path_factory,
                                                                monkeypatch, capsys, damaged):
    s = settings()          # checkpoints at 2, 4 (best, validation), 6; killed after 6
    killed_at(small_cache, tmp_path, s, 6, monkeypatch)
    newest = tmp_path / "checkpoints/step_0000006" / damaged
    newest.write_bytes(newest.read_bytes()[: max(1, newest.stat().st_size // 2)])
    capsys.readouterr()
    run(small_cache, "warmup", s, tmp_path)
    out = capsys.readouterr().out
    assert f"skipping checkpoint {tmp_path}/checkpoints/step_0000006: it does not read" in out
    assert f"resuming warmup from {tmp_path}/checkpoints/step_0000004 (step 4 of 8)" in out
    assert same_weights(weights(tmp_path), straight(small_cache, tmp_path_factory, s))


def test_full_disk_while_checkpointing_names_the_file(small_cache, tmp_path, monkeypatch):
    real = torch.save

    def full_at_step_4(obj, f, *a, **k):
        if "step_0000004" in str(f) and str(f).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 92480 vs 92368")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(C.torch, "save", full_at_step_4)
    with pytest.raises(C.DiskFull, match=r"disk full while writing .*step_0000004-\d+/optimizer\.pt \(checkpoint "
                                         r"of step 4\); earlier checkpoints are intact"):
        run(small_cache, "warmup", settings(), tmp_path)
    assert [C.step_of(d) for d in C.step_dirs(tmp_path / "checkpoints")] == [2]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    C.read(tmp_path / "checkpoints/step_0000002")


# ---- precision, schedules, accounting, rates --------------------------------------------------
def band_snr(ref, x, rate, lo, hi):
    R, X = np.fft.rfft(ref), np.fft.rfft(x)
    f = np.fft.rfftfreq(len(ref), 1 / rate)
    k = (f >= lo) & (f <= hi)
    return 10 * np.log10((abs(R[k]) ** 2).sum() / (abs(R[k] - X[k]) ** 2).sum())


@torch.no_grad()
def test_bf16_split_keeps_the_new_band_45_db_above_its_error():
    """CPU bf16 autocast stands in for CUDA's. The split the trainer uses keeps the 48 kHz output
    within 45 dB SNR of fp32, whole band and codec-Nyquist..target-Nyquist; bf16 over the whole
    pretrained decoder would not (which is why the split exists)."""
    model = M.from_codec(tiny_codec(), 48000, "smart").train()
    g = model.geometry
    codes = model.encode(torch.from_numpy(speechlike(1.0, g.codec_rate, 3))[None, None])
    pretrained = [s.name for s in model.stages()].index("decoder.new_block")     # the stages before the new block
    with model.noise_disabled():
        ref = model.decode(codes)[0, 0].numpy()
        assert bf16_split(model) == 3                 # the input convolutions and the first block (375 Hz)
        split = DecoderRun(model, bf16_split(model))(model.latents(codes))
        everything = DecoderRun(model, pretrained)(model.latents(codes))[0, 0].numpy()
    assert split.dtype == torch.float32
    split = split[0, 0].numpy()
    for lo in (0, g.codec_rate / 2):
        assert band_snr(ref, split, g.target_rate, lo, g.target_rate / 2) >= 45.0
    assert band_snr(ref, everything, g.target_rate, g.codec_rate / 2, g.target_rate / 2) < 45.0


def test_setup_in_named_steps_and_the_trainer_owns_precision_and_checkpointing(small_cache, tmp_path):
    """setup runs data, model, groups, run, optimizer, resume as named steps (its preflight lists
    them in that order); activation checkpointing and the bf16 split live on the trainer's decoder
    path (stages.DecoderRun), not on the model, whose own decode stays plain; the run computes
    what the model computes."""
    from pipeline.settings import complete
    from pipeline.training.distributed import Group
    shards = sorted(str(p) for p in (small_cache / "cache").glob("shard-*.zarr"))
    held = sorted(str(p) for p in (small_cache / "heldout").glob("shard-*.zarr"))
    s = complete(settings(activation_checkpointing=True), "train.warmup")
    t = T.setup("warmup", s, group=Group(), device=torch.device("cpu"), codec_dir=small_cache / "codec",
                target_rate=48000, cache_paths=shards, heldout_paths=held, out=tmp_path)
    items = [i["item"] for i in json.loads((tmp_path / "preflight.json").read_text())["items"]]
    order = ["cache = codec's, at codec.target_rate", "start weights", "trainable parameters", "device / precision",
             "schedule", "resume"]
    assert [i for i in items if i in order] == order
    assert isinstance(t.decoder, DecoderRun) and t.decoder.checkpointing and t.decoder.bf16 == 0
    poked = [n for n, m in t.model.named_modules() for a in ("checkpointing", "bf16", "precision") if a in vars(m)]
    assert not poked, poked
    codes = T.collate(t.val[:2])[0]
    t.model.eval()
    with t.model.noise_disabled(), torch.no_grad():
        assert torch.equal(t.decoder(t.model.latents(codes)), t.model.decode(codes))


def test_memory_estimate_counts_what_checkpointing_saves():
    """`bench memory` on the CPU: saved activations scale with the micro-batch, and activation
    checkpointing keeps only the blocks' inputs (plus the largest block's activations)."""
    from pipeline.training.memory import estimate_cpu
    s = settings(segment_seconds=0.5, groups=[{"pattern": "decoder"}])
    base = estimate_cpu(TINY_24K, 48000, s, probe_seconds=0.25)
    double = estimate_cpu(TINY_24K, 48000, {**s, "batch_size": 2 * s["batch_size"]}, probe_seconds=0.25)
    light = estimate_cpu(TINY_24K, 48000, {**s, "activation_checkpointing": True}, probe_seconds=0.25)
    assert double["activations_gib"] == pytest.approx(2 * base["activations_gib"])
    assert light["activations_gib"] < 0.7 * base["activations_gib"] and light["state_gib"] == base["state_gib"]
    # the discriminators' activations scale with what they see: half a segment, half of them
    adv = {"enabled": True, "periods": [2], "period_channels": [4, 8], "stft_n_ffts": [256], "stft_channels": 4}
    whole, half = (estimate_cpu(TINY_24K, 48000, settings(segment_seconds=0.5, groups=[{"pattern": "decoder"}],
                                                          adversarial={**adv, "crop_seconds": c}), probe_seconds=0.25)
                   for c in (None, 0.25))
    assert whole["activations_gib"] - base["activations_gib"] > 0
    assert half["activations_gib"] - base["activations_gib"] == pytest.approx(
        (whole["activations_gib"] - base["activations_gib"]) / 2, rel=0.05)


def test_schedules():
    cos = lr_lambda(settings(steps=100, warmup_steps=10, lr_min_ratio=0.1, schedule="cosine"))
    wsd = lr_lambda(settings(steps=100, warmup_steps=10, lr_min_ratio=0.1, schedule="wsd", decay_ratio=0.2))
    assert cos(0) == wsd(0) == pytest.approx(0.1) and cos(9) == wsd(9) == 1.0
    assert cos(55) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)
    assert [wsd(k) for k in (10, 50, 80)] == [1.0, 1.0, 1.0]                 # stable until the last 20 %
    assert wsd(90) == pytest.approx(0.55) and wsd(100) == pytest.approx(0.1)  # linear decay to the floor
    assert all(wsd(k) >= wsd(k + 1) for k in range(10, 100))


def test_data_seen_is_recorded(small_cache, tmp_path):
    s = settings(grad_accum=2)
    state = run(small_cache, "warmup", s, tmp_path)
    per_step = s["batch_size"] * s["grad_accum"]
    g = TINY_GEOMETRY
    seconds = T.segment_frames(s["segment_seconds"], g) * g.hop_target / g.target_rate * per_step
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r["segments_seen"] == r["step"] * per_step and r["seconds_seen"] == pytest.approx(r["step"] * seconds)
    ck = json.loads((tmp_path / "checkpoints/step_0000008/trainer_state.json").read_text())
    assert ck["segments_seen"] == state["segments_seen"] == 8 * per_step
    assert json.loads((tmp_path / "config.json").read_text())["seconds_seen"] == pytest.approx(8 * seconds)


def test_configured_target_rate_must_be_the_caches(small_cache, tmp_path):
    shards = sorted(str(p) for p in (small_cache / "cache").glob("*.zarr"))
    held = sorted(str(p) for p in (small_cache / "heldout").glob("*.zarr"))
    with pytest.raises(PreflightFailed, match=r"target_rate=48000 \(expected 96000\)"):
        T.train("warmup", settings(), small_cache / "codec", shards, held, None, tmp_path, target_rate=96000)


TINY_GEOMETRY = M.Snac48(TINY_24K, 48000).geometry
