"""Fast tests for pipeline.training.losses: losses, metrics, edge cases (short signals, autocast)."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.training.losses import (
    MelL1Loss,
    MultiResolutionSTFTLoss,
    ReconstructionLoss,
    evaluate_pair,
    log_spectral_distance,
    si_sdr,
)

SR = 48000
SMALL_FFTS = (256, 512, 1024)
LAMBDAS = {"l1": 1.0, "stft": 1.0, "mel": 1.0}


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


def test_identical_inputs_give_zero():
    x = broadband()
    assert MultiResolutionSTFTLoss(SMALL_FFTS)(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert MelL1Loss(SR)(x, x).item() == pytest.approx(0.0, abs=1e-6)
    total, terms = ReconstructionLoss(SR, LAMBDAS, n_ffts=SMALL_FFTS)(x, x)
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    assert set(terms) == {"l1", "stft", "mel"}
    assert all(v.item() == pytest.approx(0.0, abs=1e-6) for v in terms.values())
    assert log_spectral_distance(x, x, SR) == pytest.approx(0.0, abs=1e-6)
    assert log_spectral_distance(x, x, SR, band=(12000, 24000)) == pytest.approx(0.0, abs=1e-6)
    assert si_sdr(x, x) > 60


def test_scaled_copy_is_scale_invariant_but_l1_positive():
    x = broadband()
    y = 0.5 * x
    assert si_sdr(y, x) > 60
    _, terms = ReconstructionLoss(SR, {"l1": 1.0})(y, x)
    assert terms["l1"].item() > 0.01


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


def test_losses_are_differentiable():
    x = broadband()
    pred = (x + 0.05 * torch.randn_like(x)).requires_grad_(True)
    total, terms = ReconstructionLoss(SR, LAMBDAS, n_ffts=SMALL_FFTS)(pred, x)
    assert total.requires_grad and all(not v.requires_grad for v in terms.values())
    total.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_total_is_weighted_sum():
    x = broadband()
    y = x + 0.05 * torch.randn_like(x)
    lambdas = {"l1": 2.0, "stft": 0.5, "mel": 3.0}
    total, terms = ReconstructionLoss(SR, lambdas, n_ffts=SMALL_FFTS)(y, x)
    expected = sum(lambdas[k] * terms[k] for k in lambdas)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_zero_lambda_term_is_left_out():
    x = broadband()
    y = x + 0.05 * torch.randn_like(x)
    loss = ReconstructionLoss(SR, {"l1": 1.0, "stft": 0.0, "mel": 1.0}, n_ffts=SMALL_FFTS)
    assert loss.stft is None
    _, terms = loss(y, x)
    assert set(terms) == {"l1", "mel"}
    _, terms = ReconstructionLoss(SR, {"stft": 1.0}, n_ffts=SMALL_FFTS)(y, x)  # missing keys = 0
    assert set(terms) == {"stft"}


def test_bad_lambdas_raise():
    with pytest.raises(ValueError, match="spectral"):
        ReconstructionLoss(SR, {"l1": 1.0, "spectral": 1.0})
    with pytest.raises(ValueError, match="l1"):
        ReconstructionLoss(SR, {"l1": -1.0})
    with pytest.raises(ValueError, match="zero"):
        ReconstructionLoss(SR, {"l1": 0.0})


def test_n_fft_larger_than_signal():
    x = broadband(seconds=0.01)  # 480 samples, far below 8192
    y = x + 0.05 * torch.randn_like(x)
    loss = MultiResolutionSTFTLoss()(y, x)
    assert torch.isfinite(loss) and loss.item() > 0
    assert MultiResolutionSTFTLoss()(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(MelL1Loss(SR)(y[..., :300], x[..., :300]))
    m = evaluate_pair(y, x, SR)
    assert all(math.isfinite(v) for v in m.values())


def test_windows_are_non_persistent_buffers():
    loss = MultiResolutionSTFTLoss(SMALL_FFTS)
    names = {n for n, _ in loss.named_buffers()}
    assert names == {f"window_{n}" for n in SMALL_FFTS}
    assert loss.state_dict() == {}


def test_bf16_autocast_computes_in_float32():
    """Inside bf16 autocast the losses compute exactly what they compute outside it (without the
    guard, the mel filterbank's matmul would run in bf16 and the totals would differ)."""
    x = broadband(batch=1, seconds=0.1)
    pred = (x + 0.05 * torch.randn_like(x)).requires_grad_(True)
    loss_fn = ReconstructionLoss(SR, LAMBDAS, n_ffts=SMALL_FFTS)
    outside, _ = loss_fn(pred, x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside, _ = loss_fn(pred, x)
        from_bf16, _ = loss_fn(pred.bfloat16(), x.bfloat16())
    assert inside.dtype == from_bf16.dtype == torch.float32 and torch.equal(inside, outside)
    from_bf16.backward()
    assert torch.isfinite(pred.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = broadband(batch=1, seconds=0.1)
    y = x + 0.05 * torch.randn_like(x)
    loss_fn = ReconstructionLoss(SR, LAMBDAS, n_ffts=SMALL_FFTS)
    cpu, _ = loss_fn(y, x)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        gpu, _ = loss_fn.to("cuda")(y.cuda(), x.cuda())
    assert gpu.dtype == torch.float32
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-3)
    m = evaluate_pair(y.cuda(), x.cuda(), SR, n_ffts=SMALL_FFTS)
    assert all(math.isfinite(v) for v in m.values())
