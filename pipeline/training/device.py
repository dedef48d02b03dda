"""How a training step uses its device: precision, torch.compile, host-to-device copies.

Precision (`precision`, a run setting: it changes the numbers):
  * tf32 (the default): TF32 in the matmuls and convolutions of CUDA (tensor cores); storage
    stays fp32.
  * fp32: IEEE fp32 in every matmul and convolution. PyTorch's own default lets cuDNN run fp32
    convolutions in TF32 (10-bit mantissa); here it does not, so fp32 means fp32.
  * bf16: bf16 autocast over the low-rate start of the decoder path (stages.bf16_split, applied by
    stages.DecoderRun), IEEE fp32 everywhere else.
  On CPU all three compute in IEEE fp32. The default is the fastest precision that keeps the
  48 kHz output >= 45 dB SNR against fp32 in 12-24 kHz, as `python -m pipeline gpu-check`
  measured it on one H200 (BENCHMARKS.md, "GPU"): tf32 1.27x fp32's step in warmup and lora and
  2.75x in full (the discriminators' 2-D convolutions), 48.3-49.3 dB; the bf16 split 1.01-1.04x
  at 47.4 dB, so it buys nothing.

torch.compile (`compile`, a runtime knob: how a step runs, not what it computes): the decoder's
training forward (a compiled wrapper; validation and saving use the plain module) and the
discriminators (compiled in place: their state-dict keys stay). auto: on CUDA, not on CPU
(measured on the H200: warmup's step 1.40x faster). BACKEND is torch.compile's backend
(tests set a cheap one on CPU). Compiled kernels are cached on disk (`compile_cache`): in a
Snakemake working directory under .snakemake/torchinductor, on the filesystem the workflow shares,
so a restarted or preempted job on another node reuses them (torch's own default is the node's
/tmp; 2 CPU cores: a 52-59 s first compiled step of the test decoder took 5.6 s with a warm cache).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

PRECISIONS = ("fp32", "tf32", "bf16")
BACKEND = "inductor"


def set_precision(precision: str, device: torch.device, model=None) -> tuple[int, str]:
    """Apply `precision` to this process's math; -> (how many leading stages of `model`'s decoder
    path run in bf16: DecoderRun's `bf16`, a description)."""
    from .stages import bf16_split
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type == "cuda":
        mode = "tf32" if precision == "tf32" else "ieee"
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    low = bf16_split(model) if precision == "bf16" and device.type == "cuda" and model is not None else 0
    if device.type != "cuda":
        return low, "fp32 (on CPU every precision computes in fp32)"
    if precision == "tf32":
        return low, "TF32 matmuls and convolutions, fp32 storage"
    if precision == "bf16":
        return low, f"bf16 for the first {low} decoder stages, IEEE fp32 for the rest and every loss"
    return low, "IEEE fp32 (no TF32)"


@contextlib.contextmanager
def fp32_math(device: torch.device):
    """IEEE fp32 matmuls and convolutions inside (validation; the evaluation may use it), whatever the
    precision outside."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def use_compile(setting, device: torch.device) -> bool:
    """`compile` (auto, true, false) -> whether to compile on this device."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_cache() -> str:
    """Where torch.compile keeps what it compiled (TORCHINDUCTOR_CACHE_DIR; Triton's kernels go
    there too): the user's setting, else .snakemake/torchinductor when this is a Snakemake working
    directory (shared by the workflow's jobs, kept across restarts), else torch's own default."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ and Path(".snakemake").is_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(".snakemake/torchinductor").resolve())
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default, the node's temporary folder")


def compiled(module: torch.nn.Module) -> torch.nn.Module:
    """A compiled wrapper around `module` (same parameters; its state dict stays the module's)."""
    return torch.compile(module, backend=BACKEND, dynamic=False)


def compile_in_place(module: torch.nn.Module) -> torch.nn.Module:
    """Compile `module`'s forward in place: callers and state-dict keys stay as they were."""
    module.compile(backend=BACKEND, dynamic=False)
    return module


def copy_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without waiting: non-blocking from pinned memory (the loader pins on CUDA)."""
    return x.to(device, non_blocking=device.type == "cuda" and x.is_pinned())
