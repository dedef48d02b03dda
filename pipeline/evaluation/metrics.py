"""Evaluation metrics for the 48 kHz decoder (plain functions, run without gradients, return
python floats averaged over the batch):

* `si_sdr` -- scale-invariant SDR in dB.
* `log_spectral_distance` -- LSD in dB, optionally restricted to a frequency band.
* `evaluate_pair` -- all of the above in one dict, the row the evaluate stage writes.

Shapes and float32 conventions are those of `pipeline.training.losses`, whose STFT and mel
losses two of the metrics reuse.
"""
from __future__ import annotations

import torch

from ..training.losses import MelL1Loss, MultiResolutionSTFTLoss, _fit_n_fft, _no_autocast, _pair

__all__ = ["si_sdr", "log_spectral_distance", "evaluate_pair"]


@torch.no_grad()
def si_sdr(pred, target, eps: float = 1e-8) -> float:
    """Scale-invariant SDR in dB (Le Roux et al. 2019), mean over the batch.

    Both signals are made zero-mean, then ``s = <p,t>/(<t,t>+eps) * t``, ``e = p - s`` and
    ``SI-SDR = 10 log10((||s||^2 + eps) / (||e||^2 + eps))``. Computed in float64, so identical
    inputs score well above 100 dB and a scaled copy scores the same.
    """
    p, t = _pair(pred, target)
    p = p.double() - p.double().mean(-1, keepdim=True)
    t = t.double() - t.double().mean(-1, keepdim=True)
    alpha = (p * t).sum(-1, keepdim=True) / (t.square().sum(-1, keepdim=True) + eps)
    s = alpha * t
    e = p - s
    ratio = (s.square().sum(-1) + eps) / (e.square().sum(-1) + eps)
    return float((10.0 * torch.log10(ratio)).mean())


@torch.no_grad()
def log_spectral_distance(pred, target, sample_rate: int, band: tuple[float, float] | None = None,
                          n_fft: int = 2048, hop: int = 512, eps: float = 1e-10) -> float:
    """Log-spectral distance in dB, mean over frames and then over the batch.

    Power spectra ``P = |STFT|^2`` (Hann window, ``center=True``); per frame
    ``sqrt(mean_k (10 log10(P_pred[k] + eps) - 10 log10(P_tgt[k] + eps))^2)`` over the bins ``k``
    whose centre frequency ``k * sample_rate / n_fft`` lies in ``band = (lo, hi)`` Hz, inclusive
    (``None`` = all bins, 0 .. Nyquist). ``band=(12000, 24000)`` at 48 kHz gives "lsd_hf".
    ``n_fft`` larger than the signal is clamped like the STFT loss. A band that contains no bin
    raises ``ValueError``.
    """
    p, t = _pair(pred, target)
    with _no_autocast(p):
        p, t = p.float(), t.float()
        n = _fit_n_fft(int(n_fft), p.shape[-1])
        window = torch.hann_window(n, device=p.device)

        def power_db(x):
            spec = torch.stft(x, n_fft=n, hop_length=max(1, int(hop)), win_length=n, window=window,
                              center=True, pad_mode="reflect", return_complex=True)
            return 10.0 * torch.log10(spec.real.square() + spec.imag.square() + eps)

        diff = power_db(p) - power_db(t)  # (B, F, frames)
        if band is not None:
            lo, hi = float(band[0]), float(band[1])
            freqs = torch.arange(diff.shape[1], device=diff.device, dtype=torch.float64) * (sample_rate / n)
            keep = (freqs >= lo) & (freqs <= hi)
            if not bool(keep.any()):
                raise ValueError(f"band {band} Hz contains no STFT bin (sample_rate={sample_rate}, n_fft={n})")
            diff = diff[:, keep, :]
        lsd = torch.sqrt(diff.square().mean(dim=1))  # (B, frames)
        return float(lsd.mean(dim=-1).mean())


@torch.no_grad()
def evaluate_pair(pred, target, sample_rate: int, n_ffts=(1024, 2048, 4096, 8192),
                  hf_band=(12000.0, 24000.0)) -> dict:
    """All evaluation metrics for one (batch of) prediction/target pair(s), as python floats.

    Returns ``{"mrstft", "mel_l1", "lsd_db", "lsd_hf_db", "si_sdr_db"}``: `MultiResolutionSTFTLoss`
    over ``n_ffts``, `MelL1Loss` at ``sample_rate`` (defaults), whole-band and ``hf_band`` LSD
    (default n_fft/hop), and `si_sdr`. The upper edge of ``hf_band`` is clipped to
    ``sample_rate / 2``; if the clipped band holds no STFT bin (e.g. a band above Nyquist)
    ``lsd_hf_db`` is NaN. ``mrstft``'s spectral convergence is pooled over the batch; the other
    metrics are per-item means.
    """
    p, t = _pair(pred, target)
    device = p.device
    mrstft = MultiResolutionSTFTLoss(n_ffts).to(device)(p, t)
    mel = MelL1Loss(sample_rate).to(device)(p, t)
    lo, hi = float(hf_band[0]), min(float(hf_band[1]), sample_rate / 2)
    try:
        lsd_hf = log_spectral_distance(p, t, sample_rate, band=(lo, hi)) if lo <= hi else float("nan")
    except ValueError:
        lsd_hf = float("nan")
    return {
        "mrstft": float(mrstft),
        "mel_l1": float(mel),
        "lsd_db": log_spectral_distance(p, t, sample_rate),
        "lsd_hf_db": lsd_hf,
        "si_sdr_db": si_sdr(p, t),
    }
