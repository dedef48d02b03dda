"""Fine-tuning features around the model: SNAC architecture families through the real loading
path, the official-checkpoint converter, LoRA hot-swap on a loaded 48 kHz model."""
from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY_24K, speechlike, tiny_codec

from pipeline.model.codecs import snac as M
from pipeline.model.codecs.snac import convert_official
from pipeline.model.codecs.base import state_digest
from pipeline.model.lora import LoRAConfig, apply_lora, save_lora
from pipeline.model import codecs

# SNAC's 32 kHz and 44 kHz families at toy width: local attention over the real window of 32
# frames with a fused to_qkv, their own hops and strides (the 24 kHz family is TINY_24K)
FAMILIES = {
    "32khz": dict(TINY_24K, sampling_rate=32000, encoder_rates=[2, 3, 8, 8], decoder_rates=[8, 8, 3, 2],
                  attn_window_size=32, decoder_dim=64),
    "44khz": dict(TINY_24K, sampling_rate=44100, encoder_rates=[2, 4, 8, 8], decoder_rates=[8, 8, 4, 2],
                  attn_window_size=32, vq_strides=[8, 4, 2, 1], decoder_dim=64),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_families_train_every_phase_resume_and_evaluate(family, tmp_path, monkeypatch):
    """Through the real loading path (official checkpoint layout -> precompute -> train each phase
    -> resume -> evaluate): segments of whole attention windows, as SNAC's LocalMHA needs."""
    from conftest import settings, write_audio, write_manifest
    from pipeline.data.precompute import run_shard
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.training import train as T
    cfg = FAMILIES[family]
    target = 2 * cfg["sampling_rate"]
    tiny_codec(config=cfg).save(tmp_path / "codec", official=True)
    for split, n in (("train", 3), ("heldout", 1)):
        rows = [{"audio": str(write_audio(tmp_path / f"{split}{i}.wav", speechlike(1.6, target, 10 * n + i), target)),
                 "id": f"{split}{i}"} for i in range(n)]
        write_manifest(tmp_path / f"{split}.jsonl", rows)
        run_shard(tmp_path / f"{split}.jsonl", 0, 1, codecs.load(tmp_path / "codec"), tmp_path / split / "shard-000.zarr",
                  {"target_rate": target})

    def train(phase, s, init=None, **kw):
        return T.train(phase, s, tmp_path / "codec", [tmp_path / "train/shard-000.zarr"],
                       [tmp_path / "heldout/shard-000.zarr"], init, tmp_path / phase, target_rate=target, **kw)
    base = settings(steps=4, segment_seconds=0.3, val_every=2, ckpt_every=2)
    real_save = T.save

    def die_at_2(t):
        real_save(t)
        if t.state["step"] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(T, "save", die_at_2)
    with pytest.raises(KeyboardInterrupt):
        train("warmup", base)
    monkeypatch.setattr(T, "save", real_save)
    state = train("warmup", base)
    assert state["step"] == 4 and (tmp_path / "warmup/checkpoints/step_0000004").is_dir()
    full = dict(base, groups=[{"pattern": "decoder", "trainable": True, "lr_factor": 1.0}])
    train("full", full, tmp_path / "warmup")
    lora = {"enabled": True, "rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["decoder.*"]}
    for name in ("a", "b"):
        train("lora", settings(**dict(base, lora=lora, lr=1e-2, groups=[{"pattern": "*.lora_*"}])), tmp_path / "full",
              adapter=name)
        (tmp_path / "lora").rename(tmp_path / f"lora_{name}")
    model = codecs.load_model(tmp_path / "full")
    g = model.geometry
    assert g.attn_window == 32 and g.quantum == math.lcm(max(cfg["vq_strides"]), 32)
    f = codecs.load_model(tmp_path / "full").state_dict()
    w = codecs.load_model(tmp_path / "warmup").state_dict()
    assert any(not torch.equal(f[k], w[k]) for k in w if k.startswith("decoder.model."))    # full trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a second adapter on the split to_qkv: same base, no warning
        for name in ("a", "b"):
            loaded, skipped = model.load_lora(tmp_path / f"lora_{name}/lora_weights.safetensors")
            assert loaded and not skipped
    assert any(n.endswith("to_qkv.q.lora_A.a") for n, _ in model.named_parameters())
    result = evaluate(tmp_path / "codec", [tmp_path / "heldout/shard-000.zarr"],
                      {"warmup": tmp_path / "warmup", "full": tmp_path / "full", "lora": tmp_path / "lora_a"},
                      tmp_path / "eval.json", {"n_ffts": [256, 512]})
    assert set(result["models"]) == {"baseline", "warmup", "full", "lora"}
    assert all(math.isfinite(v) for m in result["models"].values() for v in m.values())


def test_converter_round_trip(tiny_codec_dir, tmp_path):
    r = convert_official(tiny_codec_dir, tmp_path / "conv")
    assert r["tensors"] == len(torch.load(tiny_codec_dir / "pytorch_model.bin", weights_only=True))
    assert state_digest(codecs.load(tmp_path / "conv").state_dict()) == r["digest"]
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
    codecs.save_model(base, tmp_path / "base")
    digest = base.base_digest()
    codes = base.encode(torch.from_numpy(speechlike(0.5, 24000, 2))[None, None])
    for name, seed in (("a", 1), ("b", 2)):
        m = codecs.load_model(tmp_path / "base")
        _trained_adapter(m, name, seed)
        save_lora(m, tmp_path / f"{name}.safetensors", LoRAConfig(rank=2, alpha=4.0, targets=["decoder.model.*"]),
                  adapter=name, base_digest=digest)
    model = codecs.load_model(tmp_path / "base")
    with torch.no_grad(), model.noise_disabled():
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
    # every key is in the reference: what complete() fills in (source_weights, group defaults) too
    assert not [(p, k) for p in d for k, r in d[p].items() if r["status"] == "new"]
    assert d["full"]["source_weights"]["status"] == "default"
    other = tmp_path / "other.yaml"
    other.write_text("train:\n  full:\n    lr: 0.5\n")
    d = json.loads(run("--json", "--against", str(other)).stdout)
    assert d["full"]["lr"] == {"value": 3.0e-4, "reference": 0.5, "status": "changed"}
    assert d["warmup"]["lr"]["status"] in ("same", "default")
    assert "changed" in run().stdout


def test_resynth_with_a_lora_adapter(tmp_path):
    import soundfile as sf
    base = M.from_codec(tiny_codec(), 48000)
    codecs.save_model(base, tmp_path / "base")
    m = codecs.load_model(tmp_path / "base")
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
