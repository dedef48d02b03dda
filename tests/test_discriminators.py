"""Adversarial fine-tuning with a tiny SNAC 48 kHz model and tiny discriminators: alternating steps train both,
every term is finite and logged, start_step withholds the discriminators, padding stays out,
losses run in fp32 under autocast, the new band has its own critic, save/load resumes exactly."""
from __future__ import annotations

import copy
import io
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import ROOT, speechlike, tiny_codec

from pipeline.model.codecs import snac as M
from pipeline.training.discriminators import Adversarial, Discriminators
from pipeline.training.spectral import band_bins
from pipeline.training.losses import ReconstructionLoss

SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
BLOCK = SCHEMA["$defs"]["phase"]["properties"]["adversarial"]


def leaf_defaults(node: dict) -> dict:
    return {k: leaf_defaults(v) if v.get("type") == "object" else v["default"] for k, v in node["properties"].items()}


def settings(**over) -> dict:
    """The schema's defaults, with tiny discriminators, enabled."""
    tiny = {"enabled": True, "periods": [2, 3], "period_channels": [4, 8], "stft_n_ffts": [256, 128],
            "stft_channels": 4, "lr": 1e-3}
    return {**leaf_defaults(BLOCK), **tiny, **over}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions: one thread is several times faster than two fighting a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def batch():
    """Codes of two 24 kHz clips and 48 kHz 'real' audio of the decoded length (4096 samples)."""
    codec = tiny_codec()
    x = torch.stack([torch.from_numpy(speechlike(0.2, 24000, seed=s)[:2048]) for s in (1, 2)])[:, None]
    real = torch.stack([torch.from_numpy(speechlike(0.2, 48000, seed=s)[:4096]) for s in (1, 2)])[:, None]
    with torch.no_grad():
        codes = codec.encode(x)
    return codec, codes, real


class Loop:
    """The trainer's step as the module docstring shows it: regression, then (when active) one
    discriminator step on the detached prediction and the generator's adversarial loss."""

    def __init__(self, codec, adv: Adversarial | None):
        self.model = M.from_codec(codec, 48000, "smart", seed=0).train()
        self.model.decoder.model.requires_grad_(False)              # the new block and head train:
        self.model.decoder.model[-3:].requires_grad_(True)          # fast, and enough to show it
        self.params = [p for p in self.model.decoder.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-3)
        self.recon = ReconstructionLoss(48000, {"l1": 1, "mel": 1}, n_mels=32)
        self.adv, self.log = adv, []

    def step(self, step, codes, real, mask=None):
        pred = self.model.decode(codes)
        loss, terms = self.recon(pred, real)
        if self.adv is not None and self.adv.active(step):
            terms |= self.adv.discriminator_step(real, pred.detach(), mask)
            g, g_terms = self.adv.generator_loss(real, pred, mask)
            loss, terms = loss + g, terms | g_terms
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.log.append({k: float(v) for k, v in terms.items()})

    def state(self):
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "rng": torch.get_rng_state(),
                "adv": self.adv.state_dict()}

    def load(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.adv.load_state_dict(state["adv"])
        torch.set_rng_state(state["rng"])


def d_weights(adv):
    return {k: v.clone() for k, v in adv.discriminator.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss", ["least_squares", "hinge"])
def test_alternating_steps_train_both_and_log_every_term(batch, loss):
    codec, codes, real = batch
    torch.manual_seed(0)
    loop = Loop(codec, Adversarial(settings(loss=loss), M.from_codec(codec, 48000).geometry))
    d0, g0 = d_weights(loop.adv), copy.deepcopy(loop.model.decoder.state_dict())
    for step in range(1, 4):
        loop.step(step, codes, real)
    want = {"l1", "mel", "adv/d_loss", "adv/d_new_band", "adv/d_grad_norm", "adv/d_lr", "adv/g_adversarial",
            "adv/g_feature_matching", "adv/g_new_band"}
    for record in loop.log:
        assert set(record) == want and all(torch.isfinite(torch.tensor(v)) for v in record.values()), record
    d1 = d_weights(loop.adv)
    assert all(not torch.equal(d0[k], d1[k]) for k in d0 if k.endswith(("original0", "original1", "bias")))
    assert not same(g0, loop.model.decoder.state_dict())
    # the generator's loss reaches the prediction only: the discriminators' gradients stay as they were
    grads = [p.grad.clone() for p in loop.adv.params]
    pred = loop.model.decode(codes)
    g, _ = loop.adv.generator_loss(real, pred)
    g.backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, loop.adv.params))
    assert all(p.requires_grad for p in loop.adv.params)


def test_start_step_withholds_the_discriminators(batch):
    codec, codes, real = batch
    geometry = M.from_codec(codec, 48000).geometry
    torch.manual_seed(0)
    plain = Loop(codec, None)
    for step in (1, 2):
        plain.step(step, codes, real)
    torch.manual_seed(0)
    gan = Loop(codec, Adversarial(settings(start_step=2), geometry, seed=3))
    d0 = d_weights(gan.adv)
    assert [gan.adv.active(k) for k in range(1, 5)] == [False, False, True, True]
    for step in (1, 2):
        gan.step(step, codes, real)
    # regression-only so far, bit for bit as if the block were off (the discriminators' init
    # does not touch the global RNG), and the discriminators have not moved
    assert same(plain.model.state_dict(), gan.model.state_dict()) and same(d0, d_weights(gan.adv))
    assert not any(k.startswith("adv/") for r in gan.log for k in r)
    gan.step(3, codes, real)
    assert "adv/d_loss" in gan.log[-1] and not same(d0, d_weights(gan.adv))
    off = Adversarial(settings(enabled=False), geometry)
    assert not any(off.active(k) for k in range(1, 100))


def test_save_load_midway_resumes_bit_identically(batch):
    codec, codes, real = batch
    geometry = M.from_codec(codec, 48000).geometry
    torch.manual_seed(0)
    whole = Loop(codec, Adversarial(settings(lr_decay=0.9), geometry))
    for step in range(1, 5):
        whole.step(step, codes, real)
    torch.manual_seed(0)
    first = Loop(codec, Adversarial(settings(lr_decay=0.9), geometry))
    for step in (1, 2):
        first.step(step, codes, real)
    buf = io.BytesIO()
    torch.save(first.state(), buf)
    buf.seek(0)
    torch.manual_seed(123)                                  # a fresh process: other RNG, other init
    second = Loop(codec, Adversarial(settings(lr_decay=0.9), geometry, seed=7))
    second.load(torch.load(buf, weights_only=True))
    for step in (3, 4):
        second.step(step, codes, real)
    assert same(d_weights(whole.adv), d_weights(second.adv))
    assert same(whole.adv.opt.state_dict()["state"][0], second.adv.opt.state_dict()["state"][0])
    assert whole.adv.sched.state_dict() == second.adv.sched.state_dict()
    assert same(whole.model.state_dict(), second.model.state_dict())
    assert whole.log[2:] == second.log


def test_padding_stays_out_of_every_term(batch):
    codec, codes, real = batch
    geometry = M.from_codec(codec, 48000).geometry
    with torch.no_grad():
        fake = M.from_codec(codec, 48000).decode(codes)
    mask = torch.ones_like(real, dtype=torch.bool)
    mask[1, :, 3000:] = False
    junk = torch.randn_like(real)
    a, b = Adversarial(settings(), geometry), Adversarial(settings(), geometry)
    ta = a.discriminator_step(real, fake, mask)
    tb = b.discriminator_step(torch.where(mask, real, junk), torch.where(mask, fake, -junk), mask)
    assert {k: float(v) for k, v in ta.items()} == {k: float(v) for k, v in tb.items()}
    assert same(d_weights(a), d_weights(b))
    fa, fb = fake.clone().requires_grad_(), torch.where(mask, fake, junk).requires_grad_()
    (ga, _), (gb, _) = a.generator_loss(real, fa, mask), a.generator_loss(torch.where(mask, real, -junk), fb, mask)
    assert torch.equal(ga, gb)
    ga.backward()
    assert fa.grad[~mask].abs().max() == 0 and fa.grad[mask].abs().max() > 0
    with pytest.raises(ValueError, match="BoolTensor"):
        a.generator_loss(real, fake, mask.float())


def test_losses_run_in_fp32_under_autocast(batch):
    codec, codes, real = batch
    adv = Adversarial(settings(), M.from_codec(codec, 48000).geometry)
    fake = real.flip(-1) * 0.5
    plain, _ = adv.generator_loss(real.bfloat16().float(), fake.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.conv2d(real[:, None], torch.ones(1, 1, 1, 3)).dtype == torch.bfloat16
        auto, terms = adv.generator_loss(real.bfloat16(), fake.bfloat16())
        d_terms = adv.discriminator_step(real.bfloat16(), fake.bfloat16())
    assert auto.dtype == torch.float32 and torch.equal(auto, plain) and torch.isfinite(auto)
    assert all(v.dtype == torch.float32 for v in (*terms.values(), d_terms["adv/d_loss"]))


def test_the_new_band_has_its_own_critic(batch):
    codec, codes, real = batch
    geometry = M.from_codec(codec, 48000).geometry
    # band edges from the geometry: the new band is codec Nyquist .. target Nyquist, whatever the rates
    for codec_rate, target_rate, n_fft in ((24000, 48000, 256), (16000, 48000, 1536), (22050, 44100, 2048)):
        g = SimpleNamespace(codec_rate=codec_rate, target_rate=target_rate)
        bins = band_bins(n_fft, g, [0.2, 0.5])
        assert len(bins) == 4 and bins[0][0] == 0 and all(a[1] == b[0] for a, b in zip(bins, bins[1:]))
        assert bins[-1] == (n_fft * codec_rate // (2 * target_rate), n_fft // 2 + 1)
        assert bins[1][0] == round(0.2 * codec_rate / 2 * n_fft / target_rate)
    with pytest.raises(ValueError, match="no bin"):
        band_bins(16, geometry, [0.01, 0.5])
    # content added only inside the new band (away from its edges: 14-22 kHz here) moves the new
    # band's logits, while the codec-band critics, away from the signal's ends, see nothing
    adv = Adversarial(settings(periods=[]), geometry)
    spec = torch.fft.rfft(torch.randn(real.shape[0], 1, real.shape[-1]))
    f = torch.fft.rfftfreq(real.shape[-1], 1 / geometry.target_rate)
    lo, hi = geometry.codec_rate / 2 * 7 / 6, geometry.target_rate / 2 * 11 / 12
    hf = torch.fft.irfft(spec * ((f > lo) & (f < hi)), n=real.shape[-1])
    with torch.no_grad():
        for (_, la), (_, lb) in zip(adv.discriminator(real), adv.discriminator(real + hf)):
            low = max(float((a - b)[..., 12:-12, :].abs().max()) for a, b in zip(la[:-1], lb[:-1]))
            new = float((la[-1] - lb[-1]).abs().max())
            assert new > 1e-3 and low < new * 1e-3, (low, new)


def test_settings_are_checked_and_the_preset_validates():
    import jsonschema
    geometry = SimpleNamespace(codec_rate=24000, target_rate=48000)
    with pytest.raises(ValueError, match="unknown keys"):
        Adversarial({**settings(), "gamma": 1}, geometry)
    with pytest.raises(ValueError, match="no discriminator"):
        Adversarial(settings(periods=[], stft_n_ffts=[]), geometry)
    with pytest.raises(ValueError, match="band_edges"):
        Adversarial(settings(band_edges=[0.5, 0.2]), geometry)
    preset = yaml.safe_load((ROOT / "config/snac_24khz.yaml").read_text())
    jsonschema.validate(preset, SCHEMA)
    full = {**leaf_defaults(BLOCK), **preset["train"]["full"]["adversarial"]}
    full["lambdas"] = {**leaf_defaults(BLOCK)["lambdas"], **full["lambdas"]}
    assert full["enabled"] and set(full) == set(leaf_defaults(BLOCK))
    with torch.device("meta"):                     # the real sizes construct (no memory: meta tensors)
        d = Discriminators(full, geometry)
    assert sum(p.numel() for p in d.parameters()) > 1e6


def test_one_pass_over_real_and_fake_is_the_two_passes(batch):
    """The discriminators' step may score real and fake in one pass over both batches (a lever
    for the GPU): the same terms and the same updated weights as a pass each (no layer mixes the
    items of a batch)."""
    codec, codes, real = batch
    geometry = M.from_codec(codec, 48000).geometry
    fake = real.flip(-1) * 0.5 + 0.01 * torch.randn_like(real)
    mask = torch.ones_like(real, dtype=torch.bool)
    mask[1, :, 3000:] = False
    one, two = Adversarial(settings(), geometry), Adversarial(settings(), geometry)
    one.joint, two.joint = True, False
    t1, t2 = one.discriminator_step(real, fake, mask), two.discriminator_step(real, fake, mask)
    for k in t1:
        assert torch.allclose(torch.as_tensor(t1[k]), torch.as_tensor(t2[k]), rtol=1e-5, atol=1e-7), k
    w1, w2 = d_weights(one), d_weights(two)
    assert all(torch.allclose(w1[k], w2[k], rtol=1e-5, atol=1e-7) for k in w1)
    assert not same(w1, d_weights(Adversarial(settings(), geometry)))        # and they did learn


def test_the_discriminators_see_windows_where_the_audio_is_real(batch):
    """crop_seconds: one window per item, the same in real and fake, inside the item's real
    samples, drawn from (seed, key) alone; the losses are those of the windows, and the generator's
    gradient reaches the prediction inside its windows only."""
    codec, codes, real = batch
    geometry = M.from_codec(codec, 48000).geometry
    fake = (real.flip(-1) * 0.5).requires_grad_()
    adv = Adversarial(settings(crop_seconds=1024 / 48000), geometry, seed=5)
    mask = torch.ones_like(real, dtype=torch.bool)
    mask[1, :, 1500:] = False
    r, f, m = adv.crop(real, fake, mask, [4096, 1500], key=(3, 0, 0))
    assert r.shape == f.shape == m.shape == (2, 1, 1024) and bool(m.all())
    starts = [next(o for o in range(4096 - 1023) if torch.equal(real[b, :, o:o + 1024], r[b])) for b in (0, 1)]
    assert starts[1] + 1024 <= 1500 and all(torch.equal(f[b], fake[b, :, o:o + 1024]) for b, o in enumerate(starts))
    again = adv.crop(real, fake, mask, [4096, 1500], key=(3, 0, 0))[0]
    assert torch.equal(again, r)                                             # a resumed run draws the same
    draws = {tuple(adv.crop(real, fake, None, None, key=(k, 0, 0))[0][:, 0, 0].tolist()) for k in range(8)}
    assert len(draws) > 4                                                    # and each step elsewhere
    g, _ = adv.generator_loss(r, f, m)
    g.backward()
    inside = torch.zeros_like(real, dtype=torch.bool)
    for b, o in enumerate(starts):
        inside[b, :, o:o + 1024] = True
    assert fake.grad[~inside].abs().max() == 0 and fake.grad[inside].abs().max() > 0
    # no window (null, or one no shorter than the segment): what goes in comes out
    for whole in (Adversarial(settings(), geometry), Adversarial(settings(crop_seconds=1.0), geometry)):
        assert all(a is b for a, b in zip(whole.crop(real, fake, mask, [4096, 1500], key=(1,)), (real, fake, mask)))
    with pytest.raises(ValueError, match="adversarial.crop_seconds"):
        Adversarial(settings(crop_seconds=128 / 48000), geometry)         # shorter than its 256-point STFT


def test_a_window_too_short_for_the_stft_sizes_is_a_config_error():
    from pipeline.settings import TRAIN_DEFAULTS, check_segment
    geometry = SimpleNamespace(target_rate=48000, hop_target=1024, quantum=4)
    s = {**TRAIN_DEFAULTS, "segment_seconds": 1.0,
         "adversarial": {**leaf_defaults(BLOCK), "enabled": True, "stft_n_ffts": [2048, 512]}}
    check_segment(s, geometry, "train.full")
    with pytest.raises(ValueError, match=r"train.full.adversarial.stft_n_ffts: 2048 exceeds the 1920 samples"):
        check_segment({**s, "adversarial": {**s["adversarial"], "crop_seconds": 0.04}}, geometry, "train.full")
    with pytest.raises(ValueError, match=r"train.full.adversarial.stft_n_ffts: 4096000 exceeds"):
        check_segment({**s, "adversarial": {**s["adversarial"], "stft_n_ffts": [4096000]}}, geometry, "train.full")
