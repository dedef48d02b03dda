"""The project's Snake: SNAC's numbers and state-dict keys, no TorchScript in the decoder's forward,
and activation checkpointing that gives the gradients of a plain backward for every decoder block
kind (TorchScript's re-specialisation broke exactly that: on CUDA always, on CPU at a process's
first checkpointed backward)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import snac.layers
import torch
from conftest import ROOT, TINY_24K, tiny_codec

from pipeline.model import codecs
from pipeline.model.codecs import snac as M
from pipeline.model.snake import Snake1d, script_calls, snake

ATTENTION = {**TINY_24K, "attn_window_size": 4, "decoder_dim": 64}   # the 32/44 kHz kind: LocalMHA (64-wide heads)


def test_snake_is_snacs_to_the_bit_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 257, generator=g, dtype=torch.float64).float() * 4
    alpha = (torch.rand(1, 16, 1, generator=g) * 3 + 1e-4).requires_grad_()
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    a1, a2 = alpha.detach().clone().requires_grad_(), alpha.detach().clone().requires_grad_()
    y1, y2 = snake(mine, a1), snac.layers.snake(theirs, a2)
    assert (y1 - y2).abs().max() <= 1e-6 * y2.abs().max()
    y1.square().sum().backward()
    y2.square().sum().backward()
    assert torch.allclose(mine.grad, theirs.grad, rtol=1e-6, atol=1e-6)
    assert torch.allclose(a1.grad, a2.grad, rtol=1e-5, atol=1e-5)


def test_official_layout_loads_unchanged_and_decodes_as_snac_does(tiny_codec_dir):
    """Same state-dict keys (`...alpha`), strict load of an official folder, the same audio as
    SNAC's own model from the same file (noise blocks off)."""
    ref = snac.SNAC.from_config(str(tiny_codec_dir / "config.json"))
    ref.load_state_dict(torch.load(tiny_codec_dir / "pytorch_model.bin", weights_only=True))
    ref.eval()
    mine = codecs.load(tiny_codec_dir)
    assert list(mine.state_dict()) == list(ref.state_dict())
    assert any(k.endswith(".alpha") for k in mine.state_dict())
    kinds = {type(m) for m in mine.modules()}
    assert Snake1d in kinds and snac.layers.Snake1d not in kinds
    x = torch.randn(1, 1, 4096, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.no_grad():
        for model in (ref, mine):
            for m in model.modules():
                if isinstance(m, snac.layers.NoiseBlock):
                    m.forward = lambda v: v
        codes_r, codes_m = ref.encode(x), mine.encode(x)
        assert all(torch.equal(a, b) for a, b in zip(codes_r, codes_m))
        a, b = ref.decode(codes_r), mine.decode(codes_m)
    assert (a - b).abs().max() <= 1e-6


def test_no_torchscript_in_the_models_forward(tmp_path):
    """Every module of the 48 kHz model (encoder, decoder, new block) and of a loaded codec: no
    TorchScript function in any forward. The detector sees SNAC's own Snake1d, so it can fail."""
    assert script_calls(snac.layers.Snake1d(4)) == ["Snake1d.forward -> snake"]
    codec = tiny_codec()
    model = M.from_codec(codec, 48000)
    codec.save(tmp_path / "c")
    for m in (*model.modules(), *codecs.load(tmp_path / "c").modules(), *codec.modules()):
        assert script_calls(m) == [], m


GRADS = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from pipeline.model import codecs
from pipeline.model.codecs import snac as M
from pipeline.training.device import set_precision
from pipeline.training.stages import DecoderRun
device = torch.device(sys.argv[3])
results = []
for cfg in json.loads(sys.argv[2]):
    torch.manual_seed(0)
    model = M.from_codec(codecs.build(cfg, 3), 48000, "smart").train().to(device)
    set_precision("fp32", device, model)
    for p in model.decoder.parameters():
        p.requires_grad_(True)
    dec = model.decoder
    kinds = {"input convs": [dec.model[0], dec.model[1]], "new block": [dec.new_block], "head": [dec.model[-2]],
             "decoder blocks": [m for m in dec.model if isinstance(m, M.DecoderBlock)]}
    if cfg.get("attn_window_size"):
        kinds["attention"] = [m for m in dec.model if type(m).__name__ == "LocalMHA"]
    g = model.geometry
    codes = [torch.randint(g.codebook_size, (2, 4 * g.quantum // s)).to(device) for s in g.strides]
    target = torch.randn(2, 1, 4 * g.quantum * g.hop_target).to(device) * 0.1
    grads = {}
    with model.noise_disabled():
        # checkpointed first: the process's first backward through Snake, where TorchScript's
        # profiling executor used to hand the recomputation other tensors than the forward saved
        for ck in (True, False):
            run = DecoderRun(model, checkpointing=ck)      # the trainer's decoder path
            model.zero_grad(set_to_none=True)
            (run(model.latents(codes)) - target).square().mean().backward()
            grads[ck] = {k: [p.grad.clone() for m in ms for p in m.parameters() if p.grad is not None]
                         for k, ms in kinds.items()}       # noise off: the noise projections get none
    out = {}
    for k in kinds:
        a, b = grads[True][k], grads[False][k]
        out[k] = {"params": len(a), "max_diff": max(float((x - y).abs().max()) for x, y in zip(a, b)),
                  "max_grad": max(float(y.abs().max()) for y in b)}
    results.append(out)
print(json.dumps(results))
"""


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_checkpointing_gives_the_plain_gradients_for_every_block_kind(device):
    """IEEE fp32, noise off: with and without activation checkpointing, the same gradients for the
    input convolutions, the attention (a codec with local attention), the pretrained
    DecoderBlocks, the new block and the head. In a fresh process: TorchScript's state is per
    process, and a process's first checkpointed backward is where it broke (on CUDA, always)."""
    cfgs = [TINY_24K, ATTENTION]
    r = subprocess.run([sys.executable, "-c", GRADS, str(ROOT), json.dumps(cfgs), device], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    tolerance = 1e-6 if device == "cpu" else 1e-4          # cuDNN may pick other kernels for a recomputation
    for cfg, out in zip(cfgs, json.loads(r.stdout.strip().splitlines()[-1])):
        kinds = {"input convs", "new block", "head", "decoder blocks"}
        assert set(out) == kinds | ({"attention"} if cfg["attn_window_size"] else set())
        for kind, v in out.items():
            assert v["params"] > 0 and v["max_grad"] > 0, kind
            assert v["max_diff"] <= tolerance * v["max_grad"], (kind, v)
