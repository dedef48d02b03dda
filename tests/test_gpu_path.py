"""The GPU path, seen from a CPU: no host synchronisation per micro-batch, the precision settings
(what fp32, tf32 and bf16 set), the logged rate since the last log line, and `gpu-check` on a
machine without CUDA. The GPU itself is `python -m pipeline gpu-check`'s business."""
from __future__ import annotations

import inspect
import types
from pathlib import Path

import pytest
import torch
from conftest import settings, tiny_codec

from pipeline.model.codecs import snac as M

from pipeline.training import train as T
from pipeline.training.distributed import Group

PIPELINE = str(Path(T.__file__).resolve().parents[1])
# what CUDA's sync debug mode warns at each host wait (c10/cuda); the first set_sync_debug_mode of
# a process also warns, once, "... does not yet detect all synchronizing operations", which the
# H200 run counted as a third wait when the filter was "synchroniz"
SYNC_WARNING = "called a synchronizing CUDA operation"
# Tensor -> Python (each a wait for the GPU on a CUDA tensor), and ops whose result size or value
# the host must read
TENSOR_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "nonzero", "unique", "numpy")
TORCH_READS = ("equal", "nonzero", "unique", "is_nonzero")


def count_host_reads(monkeypatch) -> list:
    """Record every read above called directly from pipeline code, except while next_batch
    prepares a micro-batch on the CPU (before its copy to the device): [(file:function)]."""
    seen = []

    def wrap(owner, name):
        real = getattr(owner, name)

        def counted(*a, **k):
            caller = inspect.currentframe().f_back
            if caller.f_code.co_filename.startswith(PIPELINE):
                f = caller
                while f is not None and f.f_code.co_name != "next_batch":
                    f = f.f_back
                if f is None:
                    seen.append(f"{Path(caller.f_code.co_filename).name}:{caller.f_code.co_name}:{name}")
            return real(*a, **k)
        monkeypatch.setattr(owner, name, counted)
    for name in TENSOR_READS:
        wrap(torch.Tensor, name)
    for name in TORCH_READS:
        wrap(torch, name)
    return seen


def trainer(small_cache, out, device="cpu", **over):
    s = settings(device=device, **over)
    shards = sorted(str(p) for p in (small_cache / "cache").glob("shard-*.zarr"))
    held = sorted(str(p) for p in (small_cache / "heldout").glob("shard-*.zarr"))
    return T.setup("warmup", s, group=Group(), device=torch.device(device), codec_dir=small_cache / "codec",
                   target_rate=48000, cache_paths=shards, heldout_paths=held, out=out)


ADVERSARIAL = {"enabled": True, "start_step": 0, "periods": [2], "period_channels": [4, 4], "stft_n_ffts": [256],
               "stft_channels": 4}


def test_a_training_step_reads_device_values_once_per_step_not_per_micro_batch(small_cache, tmp_path, monkeypatch):
    """On CUDA each float(), bool(), .item() of a device tensor (and torch.equal, nonzero, unique)
    stops the host until the GPU has caught up. A step may do that once, for the gradient norm's
    finiteness (and the discriminators once for theirs); the mask is read on the CPU, before the
    copy. Counted by call site on CPU over a step of 2 micro-batches (a read per micro-batch would
    count twice), padded segments and discriminators included: none in the losses or the loop."""
    pads = []
    real_padding = T.Padding
    monkeypatch.setattr(T, "Padding", lambda mask: pads.append(real_padding(mask)) or pads[-1])
    # 1.5 s segments: the demo clips (1.2-2 s) give padded and unpadded items
    t = trainer(small_cache, tmp_path, grad_accum=2, log_every=10 ** 6, segment_seconds=1.5, adversarial=ADVERSARIAL,
                steps=4)
    with monkeypatch.context() as mp:
        seen = count_host_reads(mp)
        T.train_step(t, 1)
    assert len(pads) == 2 and any(len(p.groups("cpu")) > 1 for p in pads), "no padded batch: the mask went unread"
    assert sorted(seen) == ["discriminators.py:discriminator_step:__bool__", "train.py:train_step:__bool__"], seen


def test_log_steps_read_every_term_in_one_transfer(small_cache, tmp_path, monkeypatch):
    t = trainer(small_cache, tmp_path, log_every=1)
    with monkeypatch.context() as mp:
        seen = count_host_reads(mp)
        record = T.train_step(t, 1)
    assert sorted(seen) == ["distributed.py:mean_terms:tolist", "train.py:train_step:__bool__"]
    assert {"train/loss", "train/l1", "train/stft", "train/mel", "grad_norm"} <= set(record)
    assert all(isinstance(record[k], float) for k in ("train/loss", "grad_norm", "segments_per_s"))


def test_the_logged_rate_is_the_rate_since_the_last_log_line(monkeypatch):
    """segments_per_s: segments since the last log line over the time since then, validation
    excluded; set-up time and earlier windows do not count."""
    clock = iter([110.0, 130.0])
    monkeypatch.setattr(T.time, "perf_counter", lambda: next(clock))
    t = types.SimpleNamespace(timer={"t0": 100.0, "segments": 80, "wait": 2.0, "paused": 2.0})
    assert T.rates(t) == {"segments_per_s": 10.0, "loader_wait": 0.25}
    t.timer["segments"] = 40
    assert T.rates(t)["segments_per_s"] == 2.0            # 40 in the 20 s since the last line
    assert t.timer["t0"] == 130.0 and t.timer["segments"] == 0


@pytest.mark.parametrize("precision, mode, layers", [("fp32", "ieee", False), ("tf32", "tf32", False),
                                                     ("bf16", "ieee", True)])
def test_precision_sets_what_cuda_computes_with(precision, mode, layers):
    """fp32 is IEEE fp32 in cuDNN's convolutions too (PyTorch's default lets them use TF32); tf32
    turns TF32 on for matmuls and convolutions; bf16 is the split, IEEE elsewhere. On CPU nothing
    is switched and the decoder has no bf16 layers. (The flags are settable without a GPU.)"""
    from conftest import tiny_codec

    from pipeline.model.codecs.snac import from_codec
    from pipeline.training.device import fp32_math, set_precision
    model = from_codec(tiny_codec(), 48000)
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        low, _ = set_precision(precision, torch.device("cuda"), model)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == (mode, mode)
        assert (low > 0) == layers
        with fp32_math(torch.device("cuda")):              # validation: IEEE whatever the precision
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == mode
        assert set_precision(precision, torch.device("cpu"), model)[0] == 0
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def test_the_sync_counter_matches_torchs_sync_warning_and_nothing_else():
    """The counter below looks for SYNC_WARNING in what torch's native code warns: the text is
    there (c10's CUDA library), and the once-per-process notice that set_sync_debug_mode prints
    (torch's Python bindings) does not contain it (it was counted as a wait on the H200)."""
    lib = Path(torch.__file__).parent / "lib"
    if not (lib / "libc10_cuda.so").exists():
        pytest.skip("a torch build without CUDA")
    assert SYNC_WARNING.encode() in (lib / "libc10_cuda.so").read_bytes()
    python = (lib / "libtorch_python.so").read_bytes()
    at = python.find(b"Synchronization debug mode is a prototype feature")
    assert at >= 0 and SYNC_WARNING.encode() not in python[at:python.index(b"\0", at)]


@pytest.mark.cuda
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_cuda_training_step_synchronises_twice_with_discriminators(small_cache, tmp_path, compile):
    """On the GPU itself: CUDA's sync debug mode warns at every call that makes the host wait. A
    step of 2 micro-batches with discriminators waits twice: the finiteness of the generator's and
    of the discriminators' gradient norms."""
    import traceback
    import warnings
    t = trainer(small_cache, tmp_path, "cuda", grad_accum=2, log_every=10 ** 6, segment_seconds=1.5,
                adversarial=ADVERSARIAL, compile=compile, steps=4)
    T.train_step(t, 1)                   # compilation, cuDNN's kernel choice, the allocator's first blocks
    torch.cuda.synchronize()
    syncs = []

    def seen(message, category, filename, lineno, *rest):
        if SYNC_WARNING in str(message):        # where, and the pipeline frames that led there
            syncs.append(f"{Path(filename).name}:{lineno} via " + " < ".join(
                f"{Path(f.filename).name}:{f.lineno}" for f in reversed(traceback.extract_stack())
                if f.filename.startswith(PIPELINE)))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = seen
        torch.cuda.set_sync_debug_mode("warn")
        try:
            T.train_step(t, 2)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert len(syncs) == 2, syncs


# backward nodes for which torch.use_deterministic_algorithms(True) raises on CUDA (the list in its
# docstring, torch 2.11), by class-name prefix
NO_DETERMINISTIC_CUDA_BACKWARD = (
    "ReflectionPad", "UpsampleLinear", "UpsampleBilinear", "UpsampleBicubic", "UpsampleTrilinear", "AvgPool3D",
    "AdaptiveAvgPool2D", "AdaptiveAvgPool3D", "MaxPool3D", "AdaptiveMaxPool2D", "FractionalMaxPool", "MaxUnpool",
    "NllLoss", "CtcLoss", "EmbeddingBag", "GridSampler", "Cumsum", "Put")


def test_every_training_backward_has_a_deterministic_cuda_kernel(small_cache, tmp_path, monkeypatch):
    """`deterministic: true` stopped at the first backward on CUDA (the GPU check on one H200:
    reflection_pad1d_backward_out_cuda has no deterministic implementation; the STFT and mel
    losses centre their frames with a reflect pad, and so do the discriminators). No CPU kernel
    refuses, so the cause is looked for here: every node of every backward graph of a training
    step with the discriminators on (checkpointing off, so that the graph holds every op)."""
    seen, real = set(), torch.autograd.backward

    def walk(tensors, *a, **k):
        stack, visited = [t.grad_fn for t in (tensors if isinstance(tensors, (list, tuple)) else [tensors])], {}
        while stack:
            node = stack.pop()
            if node is None or id(node) in visited:
                continue
            visited[id(node)] = node            # held: a freed node's id would be reused
            seen.add(type(node).__name__)
            stack += [f for f, _ in node.next_functions]
        return real(tensors, *a, **k)
    monkeypatch.setattr(torch.autograd, "backward", walk)
    t = trainer(small_cache, tmp_path, grad_accum=1, log_every=10 ** 6, segment_seconds=0.5, adversarial=ADVERSARIAL,
                activation_checkpointing=False, compile=False, steps=2)
    T.train_step(t, 1)
    assert {"ConvolutionBackward0", "FftR2CBackward0"} <= seen, sorted(seen)   # decoder, losses, discriminators
    assert not [n for n in seen if n.startswith(NO_DETERMINISTIC_CUDA_BACKWARD)], sorted(seen)


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True], ids=["default kernels", "deterministic"])
def test_a_killed_cuda_run_resumes_where_an_uninterrupted_one_ends(small_cache, tmp_path, monkeypatch, deterministic):
    """A warmup run on CUDA killed after its step-4 checkpoint and rerun ends where the run that
    was never killed ends: bit for bit with deterministic kernels; otherwise within 2 % of how far
    the weights moved (CUDA's atomics add in any order)."""
    from conftest import run
    from safetensors.torch import load_file
    from test_trainer_runs import killed_at
    s = settings(device="cuda", deterministic=deterministic, activation_checkpointing=True, compile=False)
    run(small_cache, "warmup", s, tmp_path / "straight")
    killed_at(small_cache, tmp_path / "resumed", s, 4, monkeypatch)
    state = run(small_cache, "warmup", s, tmp_path / "resumed")
    assert state["step"] == 8
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("straight", "resumed"))
    start = M.from_codec(tiny_codec(), 48000).state_dict()
    key = [k for k in a if k.startswith("decoder.new_block")]
    moved = torch.cat([(a[k] - start[k]).flatten() for k in key]).norm()
    apart = torch.cat([(a[k] - b[k]).flatten() for k in key]).norm()
    assert moved > 0
    assert (apart == 0) if deterministic else (apart <= 0.02 * moved), (float(apart), float(moved))


def test_gpu_check_without_cuda_says_so_and_exits_0(monkeypatch, capsys, tmp_path):
    """On a machine without CUDA the check checks nothing, says why, and succeeds (CI runs there)."""
    from pipeline import __main__ as cli
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["gpu-check"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "gpu-check needs a CUDA device" in out and "nothing was checked" in out
    assert not (tmp_path / "results").exists()


def test_bench_discriminators_measures_each_lever_alone(tmp_path):
    """`bench discriminators` (a gpu-check step) on the check's toy sizes: per phase with
    discriminators, the two-pass whole-segment step, then one lever at a time (one pass; windows
    shorter than a segment only), the preset's own variant marked. Figures, no timing asserted."""
    from pipeline import bench, gpucheck
    from pipeline.training.discriminators import Adversarial
    rows = bench.discriminators(**gpucheck._preset_args(tmp_path, cpu=True), steps=1, rounds=1, cache_hours=0.01,
                                work=tmp_path / "bench", crops=(0.25, 30.0))
    assert [r["variant"] for r in rows] == ["two passes, whole segments", "one pass, whole segments",
                                            "two passes, 0.25 s windows"] and not Adversarial.joint
    assert {r["phase"] for r in rows} == {"full"} and rows[0]["vs_two_passes"] == 1.0
    assert [r["preset"] for r in rows] == [True, False, False]        # toy segments: 0.5 s, no shorter than the preset's window
    assert all(r["audio_s_per_s"] > 0 for r in rows)
