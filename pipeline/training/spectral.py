"""Spectral building blocks shared by the training losses (losses.py), the metrics (metrics.py)
and the discriminators (discriminators.py): shapes, STFT magnitude and power, the mel transform,
band splits. No sample rate is hard-coded: every rate-dependent piece takes it.

Conventions: audio is ``(B, 1, T)``, ``(B, T)`` or ``(T,)`` (`as_batch` makes it ``(B, T)``);
spectral work runs in float32 with autocast off (`no_autocast`), so it is safe inside a bf16
region; an STFT size larger than the signal is clamped to the largest power of two that fits
(`fit_n_fft`).
"""
from __future__ import annotations

import torch
import torchaudio


def as_batch(x, name: str) -> torch.Tensor:
    """``x`` as a ``(B, T)`` tensor; accepts ``(B, 1, T)``, ``(B, T)`` or ``(T,)``."""
    x = torch.as_tensor(x)
    if x.dim() == 1:
        return x.unsqueeze(0)
    if x.dim() == 2:
        return x
    if x.dim() == 3 and x.shape[1] == 1:
        return x[:, 0, :]
    raise ValueError(f"{name}: expected shape (B, 1, T), (B, T) or (T,), got {tuple(x.shape)}")


def pair(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as ``(B, T)``, checked to match."""
    p, t = as_batch(pred, "pred"), as_batch(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    if p.shape[-1] < 1:
        raise ValueError("empty signal (T = 0)")
    return p, t


def no_autocast(x: torch.Tensor):
    """A context that turns autocast off on ``x``'s device type."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def fit_n_fft(n_fft: int, length: int) -> int:
    """``n_fft`` if the signal is long enough, else the largest power of two <= ``length``.

    torch.stft with ``center=True`` reflect-pads ``n_fft // 2`` samples on each side, which needs
    ``n_fft // 2 < length``; clamping to ``<= length`` guarantees that and keeps the frame a
    power of two. On very short signals several resolutions may clamp to the same size; they
    are then simply counted more than once in a mean over resolutions.
    """
    if n_fft <= length:
        return n_fft
    return 1 << (int(length).bit_length() - 1)


def reflect_pad(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """``F.pad(x, (left, right), mode="reflect")`` along the last dimension, made of slices, flips
    and a concatenation. The same numbers, but its backward is deterministic on CUDA, where
    reflection_pad's backward adds with atomics and `torch.use_deterministic_algorithms(True)`
    (``deterministic: true``) refuses it. Every reflect pad that training differentiates (STFT
    and mel centring, the period discriminators) goes through here; ``left, right < T``."""
    if not left and not right:
        return x
    if max(left, right) >= x.shape[-1]:
        raise ValueError(f"reflect padding ({left}, {right}) needs more than {max(left, right)} samples, "
                         f"got {x.shape[-1]}")
    return torch.cat([x[..., 1:left + 1].flip(-1), x, x[..., x.shape[-1] - right - 1:-1].flip(-1)], -1)


def stft(x: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor) -> torch.Tensor:
    """Complex STFT of ``(B, T)`` audio, centred as ``torch.stft(center=True, pad_mode="reflect")``
    centres it, through `reflect_pad` (deterministic on CUDA)."""
    return torch.stft(reflect_pad(x, n_fft // 2, n_fft // 2), n_fft=n_fft, hop_length=hop, win_length=n_fft,
                      window=window, center=False, return_complex=True)


def power(x: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor) -> torch.Tensor:
    """Power STFT ``(B, F, frames)`` of float32 ``(B, T)`` audio (Hann ``window`` of ``n_fft``,
    centred by reflection: `stft`)."""
    spec = stft(x, n_fft, hop, window)
    return spec.real.square() + spec.imag.square()


def magnitude(x: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor, eps: float) -> torch.Tensor:
    """Magnitude STFT ``(B, F, frames)`` of float32 ``(B, T)`` audio, floored at ``sqrt(eps)``."""
    return torch.sqrt(torch.clamp(power(x, n_fft, hop, window), min=eps))


def mel(sample_rate: int, n_fft: int, hop: int, n_mels: int, f_min: float = 0.0,
        f_max: float | None = None) -> torchaudio.transforms.MelSpectrogram:
    """The magnitude mel transform (``power=1``), Hann window, HTK mel scale, no filter
    normalisation; ``f_max`` defaults to ``sample_rate / 2``. It does not centre: give it
    ``reflect_pad(x, n_fft // 2, n_fft // 2)`` for what ``center=True`` gives (deterministic on
    CUDA)."""
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels, f_min=f_min, f_max=f_max,
        power=1.0, window_fn=torch.hann_window, center=False)


def band_mask(n_bins: int, sample_rate: int, n_fft: int, band: tuple, device=None) -> torch.Tensor:
    """The STFT bins whose frequency ``k * sample_rate / n_fft`` lies in ``band = [lo, hi)`` Hz
    (``hi`` at or above Nyquist includes the Nyquist bin); a band that holds no bin raises."""
    lo, hi = float(band[0]), float(band[1])
    freqs = torch.arange(n_bins, device=device, dtype=torch.float64) * (sample_rate / n_fft)
    keep = (freqs >= lo) & ((freqs < hi) | (hi >= sample_rate / 2))
    if not bool(keep.any()):
        raise ValueError(f"band {band} Hz contains no STFT bin (sample_rate={sample_rate}, n_fft={n_fft})")
    return keep


def band_bins(n_fft: int, geometry, band_edges) -> list:
    """[(first bin, end bin)] per band at the target rate: 0, the codec band split at band_edges
    (fractions of the codec Nyquist), codec Nyquist, target Nyquist (its bin included)."""
    nyquist = geometry.codec_rate / 2
    cuts = [round(f * n_fft / geometry.target_rate) for f in (0, *(e * nyquist for e in band_edges), nyquist)]
    bins = list(zip(cuts, cuts[1:] + [n_fft // 2 + 1]))
    if any(lo >= hi for lo, hi in bins):
        raise ValueError(f"STFT size {n_fft} is too small for the bands at {[e * nyquist for e in band_edges]} Hz "
                         f"and {nyquist:g} Hz: a band would have no bin")
    return bins
