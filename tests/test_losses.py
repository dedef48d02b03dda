"""Fast tests for pipeline.training.losses: losses, edge cases (short signals, autocast).
The metric tests are in test_evaluate.py."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.training.losses import MelL1Loss, MultiResolutionSTFTLoss, ReconstructionLoss

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


def test_identical_inputs_give_zero():
    x = broadband()
    assert MultiResolutionSTFTLoss(SMALL_FFTS)(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert MelL1Loss(SR)(x, x).item() == pytest.approx(0.0, abs=1e-6)
    total, terms = ReconstructionLoss(SR, LAMBDAS, n_ffts=SMALL_FFTS)(x, x)
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    assert set(terms) == {"l1", "stft", "mel"}
    assert all(v.item() == pytest.approx(0.0, abs=1e-6) for v in terms.values())


def test_scaled_copy_gives_positive_l1():
    x = broadband()
    y = 0.5 * x
    _, terms = ReconstructionLoss(SR, {"l1": 1.0})(y, x)
    assert terms["l1"].item() > 0.01


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


@pytest.mark.cuda
def test_cuda_matches_cpu():
    x = broadband(batch=1, seconds=0.1)
    y = x + 0.05 * torch.randn_like(x)
    loss_fn = ReconstructionLoss(SR, LAMBDAS, n_ffts=SMALL_FFTS)
    cpu, _ = loss_fn(y, x)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        gpu, _ = loss_fn.to("cuda")(y.cuda(), x.cuda())
    assert gpu.dtype == torch.float32
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-3)


@pytest.mark.parametrize("left, right", [(0, 0), (3, 3), (0, 5), (7, 1)])
def test_reflect_pad_is_torchs_reflect_pad(left, right):
    """The pad the STFT, mel and period discriminators use instead of F.pad(mode="reflect") (whose
    CUDA backward `deterministic: true` refuses): the same values, the same gradients."""
    from pipeline.training.spectral import reflect_pad
    x = torch.randn(2, 1, 12, dtype=torch.float64, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    ours, theirs = reflect_pad(x, left, right), torch.nn.functional.pad(y, (left, right), mode="reflect")
    assert torch.equal(ours, theirs)
    g = torch.randn_like(ours)
    ours.backward(g), theirs.backward(g)
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="needs more than 12 samples"):
        reflect_pad(x, 12, 0)


def test_centred_stft_and_mel_equal_torchs_center_true():
    """The losses' STFT and mel, padded by reflect_pad with center=False, give what torch.stft and
    torchaudio give with center=True (reflect)."""
    import torchaudio

    from pipeline.training.spectral import stft
    x = torch.randn(2, 4000)
    w = torch.hann_window(512)
    ref = torch.stft(x, 512, 128, window=w, center=True, pad_mode="reflect", return_complex=True)
    torch.testing.assert_close(stft(x, 512, 128, w), ref, rtol=0, atol=1e-5)
    mel = MelL1Loss(16000, n_fft=512, n_mels=40)
    ref_mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=512, hop_length=128, n_mels=40, power=1.0,
                                                   center=True, pad_mode="reflect")
    torch.testing.assert_close(mel.mel(torch.nn.functional.pad(x, (256, 256), mode="reflect")), ref_mel(x),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mel._log_mel(x), torch.log10(ref_mel(x) + mel.eps), rtol=1e-5, atol=1e-5)
