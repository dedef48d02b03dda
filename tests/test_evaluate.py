"""Tests for pipeline.evaluation.metrics."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.evaluation.metrics import evaluate_pair, log_spectral_distance, si_sdr

SR = 48000
SMALL_FFTS = (256, 512, 1024)


def broadband(batch=2, seconds=0.5, sr=SR, seed=0):
    """(B, 1, T) signal with energy across the whole band: tones plus white noise."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * sr)
    t = torch.arange(n) / sr
    tones = sum(torch.sin(2 * math.pi * f * t) for f in (220.0, 1500.0, 7000.0, 15000.0, 20000.0))
    x = 0.1 * tones + 0.05 * torch.randn(batch, n, generator=g)
    return x.unsqueeze(1).float()


def lowpass_fft(x, sr, cutoff):
    """Zero every FFT bin above ``cutoff`` Hz."""
    spec = torch.fft.rfft(x, dim=-1)
    freqs = torch.fft.rfftfreq(x.shape[-1], d=1.0 / sr)
    spec[..., freqs > cutoff] = 0
    return torch.fft.irfft(spec, n=x.shape[-1], dim=-1)


def test_identical_inputs_give_zero_distance():
    x = broadband()
    assert log_spectral_distance(x, x, SR) == pytest.approx(0.0, abs=1e-6)
    assert log_spectral_distance(x, x, SR, band=(12000, 24000)) == pytest.approx(0.0, abs=1e-6)
    assert si_sdr(x, x) > 60
    assert si_sdr(0.5 * x, x) > 60          # scale-invariant


def test_n_fft_larger_than_signal():
    x = broadband(seconds=0.01)  # 480 samples, far below 8192
    y = x + 0.05 * torch.randn_like(x)
    m = evaluate_pair(y, x, SR)
    assert all(math.isfinite(v) for v in m.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_metrics_are_finite():
    x = broadband(batch=1, seconds=0.1)
    y = x + 0.05 * torch.randn_like(x)
    m = evaluate_pair(y.cuda(), x.cuda(), SR, n_ffts=SMALL_FFTS)
    assert all(math.isfinite(v) for v in m.values())


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
def test_si_sdr_matches_known_snr(snr_db):
    x = broadband(batch=3)[:, 0]
    x = x - x.mean(-1, keepdim=True)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    noise = noise - noise.mean(-1, keepdim=True)
    # Remove the noise's projection onto x so the SNR is exact, then scale to the target SNR.
    noise = noise - (noise * x).sum(-1, keepdim=True) / x.square().sum(-1, keepdim=True) * x
    scale = torch.sqrt(x.square().sum(-1, keepdim=True) / noise.square().sum(-1, keepdim=True) / 10 ** (snr_db / 10))
    assert si_sdr(x + scale * noise, x) == pytest.approx(snr_db, abs=1.0)


def test_shapes_are_interchangeable():
    x = broadband(batch=1)
    y = x + 0.01 * torch.randn_like(x)
    a = si_sdr(y, x)
    assert si_sdr(y[:, 0], x[:, 0]) == pytest.approx(a)
    assert si_sdr(y[0, 0], x[0, 0]) == pytest.approx(a)
    with pytest.raises(ValueError):
        si_sdr(y, x[..., :-1])


def test_lowpassed_signal_shows_in_lsd_hf():
    x = broadband()
    lp = lowpass_fft(x, SR, 12000.0)
    m = evaluate_pair(lp, x, SR, n_ffts=SMALL_FFTS)
    assert set(m) == {"mrstft", "mel_l1", "lsd_db", "lsd_hf_db", "si_sdr_db"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    same = evaluate_pair(x, x, SR, n_ffts=SMALL_FFTS)
    assert same["lsd_hf_db"] == pytest.approx(0.0, abs=1e-6)
    assert m["lsd_hf_db"] > 10.0
    # The low half of the bins is intact, so whole-band LSD is about lsd_hf / sqrt(2).
    assert m["lsd_hf_db"] > 1.3 * m["lsd_db"]
    assert m["mrstft"] > same["mrstft"]
    assert m["mel_l1"] > same["mel_l1"]


def test_hf_band_is_clipped_to_nyquist():
    x = broadband(sr=24000, seconds=0.25)
    y = x + 0.01 * torch.randn_like(x)
    m = evaluate_pair(y, x, 24000, n_ffts=SMALL_FFTS, hf_band=(8000.0, 24000.0))
    assert math.isfinite(m["lsd_hf_db"])
    m = evaluate_pair(y, x, 24000, n_ffts=SMALL_FFTS, hf_band=(13000.0, 24000.0))  # above Nyquist
    assert math.isnan(m["lsd_hf_db"])
