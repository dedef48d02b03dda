"""Fine-tuning features around the model: SNAC architecture families through the real loading
path, the official-checkpoint converter, LoRA hot-swap on a loaded 48 kHz model."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY_24K, speechlike, tiny_codec

from pipeline.model import snac48 as M
from pipeline.model.codec import convert_official, load_codec, noise_disabled, save_codec, state_digest
from pipeline.model.lora import LoRAConfig, apply_lora, save_lora

# the three SNAC families at toy width: 24 kHz (no attention, 3 codebooks), 32 kHz and 44 kHz
# (local attention with a fused to_qkv, their own hops and strides)
FAMILIES = {
    "24khz": TINY_24K,
    "32khz": dict(TINY_24K, sampling_rate=32000, encoder_rates=[2, 3, 8, 8], decoder_rates=[8, 8, 3, 2],
                  attn_window_size=4, decoder_dim=64),
    "44khz": dict(TINY_24K, sampling_rate=44100, encoder_rates=[2, 3, 8, 8], decoder_rates=[8, 8, 3, 2],
                  attn_window_size=4, vq_strides=[8, 4, 2, 1], decoder_dim=64),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_architecture_families_load_train_and_adapt(family, tmp_path):
    cfg = FAMILIES[family]
    save_codec(tiny_codec(config=cfg), tmp_path, official=True)
    codec = load_codec(tmp_path)
    rate = cfg["sampling_rate"]
    model = M.from_codec(codec, 2 * rate)
    g = model.geometry
    assert g.hop == int(torch.tensor(cfg["encoder_rates"]).prod()) and g.strides == tuple(cfg["vq_strides"])
    x = torch.from_numpy(speechlike(0.6, rate, 1))[None, None]
    with torch.no_grad(), noise_disabled(model):
        codes = model.encode(x)
        assert [c.shape[-1] * s for c, s in zip(codes, g.strides)] == [codes[-1].shape[-1]] * len(codes)
        y = model.decode(codes)
        assert y.shape[-1] == codes[-1].shape[-1] * g.hop_target
        for c, ref in zip(codes, codec.encode(x)):       # same codes as the frozen codec
            assert torch.equal(c, ref)
        wrapped = apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=["decoder.*"]))
        if cfg["attn_window_size"]:
            assert any(n.endswith("to_qkv") for n in wrapped)
        assert torch.allclose(model.decode(codes), y, atol=1e-6)      # fresh adapters: no-op


def test_converter_round_trip(tiny_codec_dir, tmp_path):
    r = convert_official(tiny_codec_dir, tmp_path / "conv")
    assert r["tensors"] == len(torch.load(tiny_codec_dir / "pytorch_model.bin", weights_only=True))
    assert state_digest(load_codec(tmp_path / "conv").state_dict()) == r["digest"]
    p = subprocess.run([sys.executable, "-m", "pipeline", "convert-snac", str(tiny_codec_dir), str(tmp_path / "c2")],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "verified" in p.stdout
    p = subprocess.run([sys.executable, "-m", "pipeline", "convert-snac", str(tmp_path), str(tmp_path / "c3")],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "pytorch_model.bin" in p.stdout + p.stderr


def _trained_adapter(model, name, seed):
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=["decoder.model.*"]), adapter=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{name}" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_lora_hot_swap_on_a_loaded_model(tmp_path):
    base = M.from_codec(tiny_codec(), 48000)
    M.save_model(base, tmp_path / "base")
    digest = base.base_digest()
    codes = base.encode(torch.from_numpy(speechlike(0.5, 24000, 2))[None, None])
    for name, seed in (("a", 1), ("b", 2)):
        m = M.load_model(tmp_path / "base")
        _trained_adapter(m, name, seed)
        save_lora(m, tmp_path / f"{name}.safetensors", LoRAConfig(rank=2, alpha=4.0, targets=["decoder.model.*"]),
                  adapter=name, base_digest=digest)
    model = M.load_model(tmp_path / "base")
    with torch.no_grad(), noise_disabled(model):
        y0 = model.decode(codes)
        loaded, skipped = model.load_lora(tmp_path / "a.safetensors")
        assert loaded and not skipped
        ya = model.decode(codes)
        model.load_lora(tmp_path / "b.safetensors")
        yb = model.decode(codes)
        model.set_active_adapter("a")
        assert torch.equal(model.decode(codes), ya) and not torch.allclose(ya, yb)
        model.set_lora_enabled(False)
        assert torch.allclose(model.decode(codes), y0, atol=1e-6)
        model.set_lora_enabled(True)
        assert set(k.rsplit(".", 1)[-1] for k in model.get_lora_state_dict()) == {"a", "b"}
        model.unload_lora()
        assert torch.allclose(model.decode(codes), y0, atol=1e-6)
    other = M.from_codec(tiny_codec(seed=3), 48000)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        other.load_lora(tmp_path / "a.safetensors")
    assert any("digest" in str(x.message) for x in w)


def test_config_diff_marks_what_each_phase_changes(tmp_path):
    import json
    from conftest import ROOT
    run = lambda *a: subprocess.run([sys.executable, "-m", "pipeline", "config-diff", *a], cwd=ROOT,
                                    capture_output=True, text=True)
    r = run("--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) == {"warmup", "full", "lora"}
    assert d["warmup"]["groups"]["status"] == "changed" and d["lora"]["lora.enabled"]["status"] == "changed"
    assert d["warmup"]["betas"]["status"] == "default"
    other = tmp_path / "other.yaml"
    other.write_text("train:\n  full:\n    lr: 0.5\n")
    d = json.loads(run("--json", "--against", str(other)).stdout)
    assert d["full"]["lr"] == {"value": 3.0e-4, "reference": 0.5, "status": "changed"}
    assert d["warmup"]["lr"]["status"] in ("same", "default")
    assert "changed" in run().stdout


def test_resynth_with_a_lora_adapter(tmp_path):
    import soundfile as sf
    base = M.from_codec(tiny_codec(), 48000)
    M.save_model(base, tmp_path / "base")
    m = M.load_model(tmp_path / "base")
    _trained_adapter(m, "x", 5)
    save_lora(m, tmp_path / "x.safetensors", LoRAConfig(rank=2, alpha=4.0, targets=["decoder.model.*"]),
              adapter="x", base_digest=base.base_digest())
    sf.write(tmp_path / "in.wav", speechlike(0.5, 48000, 1), 48000)
    outs = {}
    for name, extra in (("plain", []), ("lora", ["--lora", str(tmp_path / "x.safetensors")])):
        r = subprocess.run([sys.executable, "-m", "pipeline", "resynth", "--model", str(tmp_path / "base"),
                            *extra, str(tmp_path / "in.wav"), str(tmp_path / f"{name}.wav")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        outs[name] = sf.read(tmp_path / f"{name}.wav")[0]
    assert "LoRA" in r.stdout and not np.allclose(outs["plain"], outs["lora"])
