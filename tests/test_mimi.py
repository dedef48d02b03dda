"""Mimi through transformers: the folder, the geometry, encode/decode as transformers' own, and
Mimi48's smart init, on a tiny random Mimi with the real time geometry (24 kHz, ratios
[8, 6, 5, 4], 12.5 Hz frames, the 250-step sliding window) at toy width."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_MIMI as TINY
from test_train import cubic_interpolation, snr_db

from pipeline.model import codecs
from pipeline.model.codecs import family_of
from pipeline.model.codecs import mimi as M
from pipeline.model.codecs.base import state_digest
from pipeline.training.groups import param_groups

N_Q = 4


@pytest.fixture(scope="module")
def codec(mimi_dir):
    return M.load_codec(mimi_dir, N_Q)


def random_codes(batch, frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["codebook_size"], (batch, frames), generator=g) for _ in range(N_Q)]


def test_folder_loads_strictly_frozen_and_is_told_by_its_config(mimi_dir, codec, tmp_path):
    from safetensors.torch import load_file
    assert family_of(mimi_dir) == "mimi"
    assert state_digest(codec.state_dict()) == state_digest(load_file(mimi_dir / "model.safetensors"))
    assert not codec.training and not any(p.requires_grad for p in codec.parameters())
    fp = codec.fingerprint(48000, 7)
    assert fp["n_q"] == N_Q and fp["family"] == "mimi" and fp["strides"] == [1] * N_Q and fp["hop"] == 1920
    fewer = M.load_codec(mimi_dir, N_Q - 1).fingerprint(48000, 7)          # n_q is in it
    assert fewer["codec_digest"] == fp["codec_digest"]
    assert (fewer["n_q"], fewer["strides"]) == (N_Q - 1, [1] * (N_Q - 1))
    with pytest.raises(ValueError, match="n_q 7"):
        M.load_codec(mimi_dir, 7)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**json.loads((mimi_dir / "config.json").read_text()),
                                                 "model_type": "encodec"}))
    with pytest.raises(ValueError, match="model_type 'encodec'"):
        M.load_codec(bad)
    with pytest.raises(ValueError, match="not a codec"):
        family_of(bad)
    extra = load_file(mimi_dir / "model.safetensors")          # strict: an unknown tensor is refused
    extra["decoder.extra"] = torch.zeros(1)
    from safetensors.torch import save_file
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text((mimi_dir / "config.json").read_text())
    save_file(extra, tmp_path / "x" / "model.safetensors")
    with pytest.raises(RuntimeError, match="decoder.extra"):
        M.load_codec(tmp_path / "x")


def test_geometry_is_derived_from_the_config(codec):
    g = codec.geometry_at(48000)
    assert (g.codec_rate, g.hop, g.hop_target, g.strides, g.pad_to, g.quantum, g.codebook_size) == \
        (24000, 1920, 3840, (1,) * N_Q, 1920, 1, 64)
    assert [g.frames(n) for n in (1, 1920, 1921, 24000)] == [1, 1, 2, 13]
    real = transformers.MimiConfig.from_dict(M.KYUTAI_MIMI)
    assert M.geometry(real, 48000, 32).hop == 1920 and real.frame_rate == 12.5
    other = transformers.MimiConfig(**{**TINY, "upsampling_ratios": [8, 5, 4, 2]})   # 320 x 2 at 24 kHz: 37.5 Hz
    assert M.geometry(other, 48000, 2).hop == 640
    with pytest.raises(ValueError, match="whole number of samples"):
        M.geometry(real, 44101, 8)           # 0.08 s frames: 3528.08 samples
    with pytest.raises(ValueError, match="only the causal Mimi"):
        M.geometry(transformers.MimiConfig(**{**TINY, "use_causal_conv": False}), 48000, 2)


@torch.no_grad()
def test_encode_and_decode_are_transformers_own_and_causal(mimi_dir, codec):
    hf = transformers.MimiModel.from_pretrained(mimi_dir).eval()
    x = torch.randn(2, 1, 5 * 1920 + 700, generator=torch.Generator().manual_seed(1))
    codes = codec.encode(x)
    assert len(codes) == N_Q and codes[0].shape == (2, 6)            # ceil(T / hop): a partial last frame
    padded = torch.nn.functional.pad(x, (0, 1920 - 700))             # encoded as if padded with zeros
    want = hf.encode(padded, num_quantizers=N_Q, use_streaming=False).audio_codes
    assert torch.equal(torch.stack(codes, 1), want)
    assert torch.equal(torch.stack(codes, 1)[..., :5], hf.encode(x, num_quantizers=N_Q).audio_codes[..., :5])
    assert len({tuple(c.flatten().tolist()) for c in codes}) > 1 and codes[0].unique().numel() > 1
    y = codec.decode(codes)
    assert y.shape == (2, 1, 6 * 1920) and torch.equal(y, hf.decode(want).audio_values)
    # frame t is computed from samples < (t + 1) hop, and decodes to samples [t hop, (t + 1) hop)
    prefix = codec.encode(x[..., :3 * 1920])
    assert all(torch.equal(p, c[:, :3]) for p, c in zip(prefix, codes))
    tol = 1e-4 * float(y.abs().max())                               # float rounding of other lengths
    torch.testing.assert_close(codec.decode([c[:, :3] for c in codes]), y[..., :3 * 1920], rtol=0, atol=tol)
    with codec.noise_disabled():                                    # no noise blocks: a no-op
        assert torch.equal(codec.decode(codes), y)


@torch.no_grad()
def test_codebook_cache_follows_dtype_changes(mimi_dir):
    """transformers keeps each codebook's table as a plain attribute computed on first use; moved
    to another dtype (or device: the GPU case) it would stay behind. fresh_codebooks drops it."""
    codec = M.load_codec(mimi_dir, N_Q)
    codes = random_codes(1, 3)
    y = codec.decode(codes)
    y64 = codec.double().decode(codes)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y, rtol=0, atol=1e-5)


def mimi48(codec, init="smart", interpolator="cubic"):
    return M.from_codec(codec, 48000, init, seed=0, interpolator=interpolator).eval()


@torch.no_grad()
@pytest.mark.parametrize("interpolator", M.INTERPOLATORS)
def test_smart_init_starts_as_the_upsampled_24k_output(codec, monkeypatch, interpolator):
    """With the residual units' gain at 0 the new block is an exact hold, and the 48 kHz output is
    the 24 kHz decode interpolated, sample for sample in time: output r n is 24 kHz sample n (the
    cubic head looks 2r - 1 samples ahead for it; the hold head is causal). With the real gain
    (1e-4) the deviation is tiny: measured 87.5 dB (cubic) and 87.8 dB (hold); bound 60 dB."""
    codes = random_codes(2, 6)
    y24 = codec.decode(codes)[:, 0].double()
    r = 2
    want = cubic_interpolation(y24, r) if interpolator == "cubic" else y24.repeat_interleave(r, -1)
    inner = slice(8 * r, -8 * r)                   # the zero padding at the ends differs
    smart = mimi48(codec, interpolator=interpolator)
    assert smart.decoder.head == ({"kernel_size": 10, "padding": [6, 3]} if interpolator == "cubic" else
                                  {"kernel_size": 5, "padding": [4, 0]})
    assert snr_db(want[..., inner].numpy(), smart.decode(codes)[:, 0].double()[..., inner].numpy()) >= 60
    monkeypatch.setattr(M, "RESIDUAL_GAIN", 0.0)
    exact = mimi48(codec, interpolator=interpolator).decode(codes)[:, 0].double()
    torch.testing.assert_close(exact[..., inner], want[..., inner], rtol=0, atol=1e-5 * float(want.abs().max()))
    if interpolator == "cubic":                   # between the kept samples it interpolates, not holds
        assert (exact - y24.repeat_interleave(r, -1))[..., inner].abs().max() > 1e-2 * float(want.abs().max())


@torch.no_grad()
def test_smart_init_starts_closer_to_the_target_than_random(codec):
    """SNR against the cubic interpolation of the 24 kHz decode, edges included: measured smart
    50.3 dB, random -1.5 dB (its new block at PyTorch's default init, Mimi's own head)."""
    codes = random_codes(2, 6, seed=5)
    target = cubic_interpolation(codec.decode(codes)[:, 0].double(), 2).numpy()
    snr = {init: snr_db(target, mimi48(codec, init).decode(codes)[:, 0].double().numpy())
           for init in ("smart", "random")}
    assert snr["smart"] >= 40 and snr["random"] <= 0, snr


def test_smart_init_copies_the_last_block_and_keeps_pretrained_weights(codec):
    smart, plain = mimi48(codec), mimi48(codec, "random")
    up = smart.decoder.new_block[0].conv.weight
    want = torch.zeros_like(up)
    want[torch.arange(4), torch.arange(4), :2] = 1.0
    assert torch.equal(up, want) and not smart.decoder.new_block[0].conv.bias.any()
    src = [m for m in smart.decoder.layers if isinstance(m, M.MimiResnetBlock)][-1]
    for name, p in smart.decoder.new_block[1].named_parameters():
        factor = M.RESIDUAL_GAIN if name.startswith("block.3.") else 1.0
        torch.testing.assert_close(p, dict(src.named_parameters())[name] * factor, rtol=0, atol=0)
    pre = codec.decoder.layers[-1].conv
    assert plain.decoder.head is None and torch.equal(plain.decoder.layers[-1].conv.weight, pre.weight)
    assert torch.equal(smart.decoder.layers[-1].conv.bias, pre.bias)
    new = ("decoder.new_block.", "decoder.layers.14.")            # the new block and the widened head
    own = {k: v for k, v in smart.state_dict().items() if not k.startswith(new)}
    assert all(torch.equal(v, codec.state_dict()[k]) for k, v in own.items())
    frozen = {n.split(".")[0] for n, p in smart.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder", "encoder_transformer", "downsample", "quantizer"}


@torch.no_grad()
def test_mimi48_save_and_load(codec, tmp_path):
    codes = random_codes(1, 4, seed=2)
    for init, interpolator in (("smart", "cubic"), ("smart", "hold"), ("random", "cubic")):
        m, folder = mimi48(codec, init, interpolator), tmp_path / f"{init}-{interpolator}"
        codecs.save_model(m, folder, {"note": 1})
        back = codecs.load_model(folder)
        assert back.config == m.config and json.loads((folder / "config.json").read_text())["note"] == 1
        assert torch.equal(m.decode(codes), back.decode(codes))
        # the 24 kHz codec's own weights fit the model as smart init places them
        if init == "smart":
            adapted = m.adapt_head(codec.state_dict())
            for k, v in adapted.items():
                torch.testing.assert_close(v, m.state_dict()[k], rtol=1e-6, atol=1e-7)
    (tmp_path / "snac").mkdir()
    (tmp_path / "snac" / "config.json").write_text(json.dumps({"format": "phase11-snac48/0"}))
    (tmp_path / "snac" / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="not a 48 kHz model of this pipeline .format 'phase11-snac48/0'"):
        codecs.load_model(tmp_path / "snac")


def test_a_new_block_group_trains_the_new_block_only_and_stages_checkpoint(codec):
    from torch.utils.checkpoint import checkpoint
    model = mimi48(codec).train()
    groups, _ = param_groups(model, [{"pattern": "decoder.new_block"}], 1e-3)
    codes = random_codes(1, 3, seed=4)
    latents = model.latents(codes)
    plain = model(latents)
    x = latents
    for stage in model.stages():                   # block by block, activations recomputed
        x = checkpoint(stage.module, x, use_reentrant=False)
    assert torch.equal(x, plain)
    x.square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.decoder.new_block.named_parameters(prefix="decoder.new_block")}
    assert sum(len(g["params"]) for g in groups) == len(with_grad)
    assert [s.rate for s in model.stages()][-1] == 48000 and model.stages()[-2].name == "decoder.new_block"
    whole = param_groups(model, [{"pattern": p} for p in M.DECODER], 1e-3)[0]
    trained = {id(p) for g in whole for p in g["params"]}
    assert not any(id(p) in trained for part in model.frozen_parts() for p in part.parameters())
    assert all(n.startswith(model.FROZEN) for n, p in model.named_parameters() if id(p) not in trained)


def test_real_mimi_shapes_build_without_weights():
    """The published config builds Mimi48 on the meta device: what `bench memory` sizes."""
    config = transformers.MimiConfig.from_dict(M.KYUTAI_MIMI)
    with torch.device("meta"):
        model = M.Mimi48(config, 32, 48000)
    count = {part: sum(p.numel() for n, p in model.named_parameters() if n.startswith(part + "."))
             for part in ("encoder", "encoder_transformer", "downsample", "quantizer", "upsample",
                          "decoder_transformer", "decoder")}
    assert count["decoder_transformer"] == count["encoder_transformer"] > 20e6
    assert 0 < sum(p.numel() for p in model.decoder.new_block.parameters()) < 1e5
    assert np.isclose(sum(count.values()) / 1e6, 79.3, atol=0.5), count


@torch.no_grad()
def test_lora_wraps_and_merges_on_mimi48(codec):
    """LoRA on Mimi's decoder path: the transformer's separate q/k/v/o Linears and MLP, the SEANet
    Conv1d's inside MimiConv1d and the transposed convs: a fresh adapter changes nothing, a trained
    one changes the output, merged it gives the unmerged output, and the merged model has Mimi48's
    own modules and keys again."""
    from pipeline.model.lora import LoRAConfig, apply_lora, lora_layers, merge_lora
    model = mimi48(codec)
    keys, codes = set(model.state_dict()), random_codes(1, 4, seed=6)
    before = model.decode(codes)
    with pytest.raises(ValueError, match=r"e\.g\. 'decoder_transformer\.layers\.0\.self_attn\.\*'"):     # its example is this model's own
        apply_lora(model, LoRAConfig(targets=["decoder.model.*"]))                 # (a SNAC name)
    wrapped = apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=["upsample.*", "decoder_transformer.*", "decoder.*"]))
    names = set(wrapped)
    assert {f"decoder_transformer.layers.0.self_attn.{p}_proj" for p in "qkvo"} <= names
    assert {"upsample.conv", "decoder.new_block.0.conv", "decoder.layers.14.conv"} <= names     # convT, new block, head
    assert any(n.startswith("decoder.layers.") and n.endswith(".block.1.conv") for n in names)        # a residual unit's conv
    assert not any(n.startswith(("encoder", "quantizer", "downsample")) for n in names)
    assert torch.equal(model.decode(codes), before)                          # B = 0: a no-op
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if "lora_" in n}
    for layer in lora_layers(model):
        layer.lora_B["default"].normal_(0, 0.05)
    adapted = model.decode(codes)
    assert (adapted - before).abs().max() > 1e-3
    merge_lora(model)
    assert set(model.state_dict()) == keys and not list(lora_layers(model))
    torch.testing.assert_close(model.decode(codes), adapted, rtol=0, atol=1e-5 * float(adapted.abs().max()))
