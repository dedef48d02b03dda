"""Tests for pipeline.model.lora on tiny SNAC-style modules (fast, CPU, float32).

Tolerance for merged-vs-unmerged comparisons: atol 1e-5, rtol 1e-5 (float32); a fresh adapter
(B = 0) must reproduce the base output bit-exactly (torch.equal)."""
import copy

import pytest
import torch
from safetensors import safe_open
from snac.attention import LocalMHA
from snac.layers import DecoderBlock
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from pipeline.model.lora import (FusedQKVLoRA, LoRAConfig, LoRALayer, apply_lora, load_lora,
                           lora_layers, lora_state_dict, merge_lora, save_lora,
                           set_active_adapter, set_lora_enabled, unload_lora, unmerge_lora)

ATOL = RTOL = 1e-5


Seq = nn.Sequential  # layers get qualified names '0', '0.block.1', ...


def make(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    if kind == "conv":  # dilation + padding
        return Seq(weight_norm(nn.Conv1d(6, 5, 3, dilation=2, padding=3, stride=1))), torch.randn(2, 6, 17)
    if kind == "conv_strided_grouped":
        return Seq(weight_norm(nn.Conv1d(8, 12, 4, stride=2, padding=1, groups=4))), torch.randn(2, 8, 16)
    if kind == "conv_reflect":
        return Seq(weight_norm(nn.Conv1d(4, 5, 3, padding=2, dilation=2, padding_mode="reflect"))), torch.randn(2, 4, 11)
    if kind == "depthwise":
        return Seq(weight_norm(nn.Conv1d(8, 8, 7, dilation=3, padding=9, groups=8))), torch.randn(2, 8, 20)
    if kind == "convT":  # stride 2, padding, output_padding
        return Seq(weight_norm(nn.ConvTranspose1d(6, 4, 5, stride=2, padding=1, output_padding=1))), torch.randn(2, 6, 9)
    if kind == "convT_grouped":
        return Seq(weight_norm(nn.ConvTranspose1d(6, 9, 4, stride=3, padding=1, output_padding=2, groups=3))), torch.randn(2, 6, 7)
    if kind == "linear":
        return Seq(nn.Linear(7, 5)), torch.randn(3, 4, 7)
    if kind == "qkv":
        return Seq(LocalMHA(dim=16, window_size=4, dim_head=8)), torch.randn(2, 16, 12)
    if kind == "decoder":
        return Seq(DecoderBlock(16, 8, stride=2, noise=False, groups=1)), torch.randn(2, 16, 10)
    raise KeyError(kind)


KINDS = ["conv", "conv_reflect", "conv_strided_grouped", "depthwise", "convT", "convT_grouped", "linear", "qkv", "decoder"]


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model):
        for pd in (layer.lora_A, layer.lora_B):
            for p in pd.values():
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapter_is_exact_noop_and_merge_matches(kind):
    model, x = make(kind)
    model.eval()
    base = copy.deepcopy(model)
    with torch.no_grad():
        y0 = base(x)
        names = apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=["*"]))
        assert names
        assert torch.equal(model(x), y0)  # bit-exact before training
        randomize(model)
        y_lora = model(x)
        assert not torch.allclose(y_lora, y0, atol=1e-3)  # adapters do something
        set_lora_enabled(model, False)
        assert torch.equal(model(x), y0)
        set_lora_enabled(model, True)
        merged = merge_lora(copy.deepcopy(model))
        assert not any(isinstance(m, (LoRALayer, FusedQKVLoRA)) for m in merged.modules())
        assert merged.state_dict().keys() == base.state_dict().keys()
        torch.testing.assert_close(merged(x), y_lora, atol=ATOL, rtol=RTOL)


def test_fused_qkv_is_decomposed_and_collapses_back():
    model, x = make("qkv")
    names = apply_lora(model, LoRAConfig(rank=2, targets=["*.to_qkv"]))
    assert names == ["0.to_qkv"]
    fused = model[0].to_qkv
    assert isinstance(fused, FusedQKVLoRA)
    assert all(p.base.out_features == 16 for p in fused.parts())
    assert set(lora_state_dict(model)) == {f"0.to_qkv.{p}.lora_{ab}.default" for p in "qkv" for ab in "AB"}
    merged = merge_lora(model)
    assert isinstance(merged[0].to_qkv, nn.Linear) and merged[0].to_qkv.weight.shape == (48, 16)


def test_merge_really_changes_weight_normed_weights_and_unmerge_restores():
    model, x = make("convT")
    model.eval()
    conv = model[0]
    w0 = conv.weight.detach().clone()
    g0 = conv.parametrizations.weight.original0.detach().clone()
    v0 = conv.parametrizations.weight.original1.detach().clone()
    apply_lora(model, LoRAConfig(rank=3, targets=["*"]))
    randomize(model)
    layer = model[0]
    with torch.no_grad():
        y_lora = model(x)
        delta = layer.delta_weight()
        merge_lora(model, remove_wrappers=False)
        assert layer.merged_adapter == "default"
        torch.testing.assert_close(conv.weight, w0 + delta, atol=ATOL, rtol=RTOL)
        assert not torch.allclose(conv.parametrizations.weight.original0, g0)
        assert not torch.allclose(conv.parametrizations.weight.original1, v0)
        assert not conv.parametrizations.weight.original0.requires_grad  # stays frozen
        torch.testing.assert_close(model(x), y_lora, atol=ATOL, rtol=RTOL)
        unmerge_lora(model)
        assert layer.merged_adapter is None
        assert torch.equal(conv.parametrizations.weight.original0, g0)  # exact restore
        assert torch.equal(conv.parametrizations.weight.original1, v0)
        assert torch.equal(conv.weight, w0)
        assert torch.equal(model(x), y_lora)


def test_convtranspose_output_size_argument():
    torch.manual_seed(0)
    layer = LoRALayer(weight_norm(nn.ConvTranspose1d(4, 3, 4, stride=2, padding=1)))
    layer.add_adapter("default", rank=2, alpha=4.0)
    randomize(layer)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        y = layer(x, output_size=[17])
        assert y.shape[-1] == 17
        layer.merge()
        torch.testing.assert_close(layer(x, output_size=[17]), y, atol=ATOL, rtol=RTOL)


def test_only_lora_params_trainable_and_optimizer_step():
    model, x = make("decoder")
    apply_lora(model, LoRAConfig(rank=4, targets=["0.block.*"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert trainable == set(lora_state_dict(model))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        y0 = model(x)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(model(x), y0)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_pattern_matching_nothing_raises_naming_it():
    model, _ = make("decoder")
    with pytest.raises(ValueError, match=r"nope\.\*"):
        apply_lora(model, LoRAConfig(targets=["0.block.*", "nope.*"]))
    with pytest.raises(ValueError, match="Snake"):  # matches only a Snake1d, not adaptable
        apply_lora(model, LoRAConfig(targets=["0.block.0", "*Snake*"]))


def test_save_load_round_trip(tmp_path):
    cfg = LoRAConfig(rank=4, alpha=6.0, targets=["0.block.1", "0.block.2.block.*"])
    model, x = make("decoder", seed=0)
    model.eval()
    names = apply_lora(model, cfg)
    assert names == ["0.block.1", "0.block.2.block.1", "0.block.2.block.3"]
    randomize(model)
    path = tmp_path / "a.safetensors"
    save_lora(model, path, cfg, base_digest="abc123")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {k.rsplit(".", 1)[0] for k in lora_state_dict(model)}
    assert all(k.split(".")[-1] in ("lora_A", "lora_B") for k in keys)
    assert meta["rank"] == "4" and float(meta["alpha"]) == 6.0 and meta["base_digest"] == "abc123"
    assert meta["adapter"] == "default" and meta["targets"] == '["0.block.1", "0.block.2.block.*"]'

    fresh, _ = make("decoder", seed=0)  # same base weights, no LoRA yet
    fresh.eval()
    loaded, skipped = load_lora(fresh, path)
    assert sorted(loaded) == sorted(keys) and skipped == []
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # loading into a second adapter name of an already-wrapped model
    loaded2, _ = load_lora(fresh, path, adapter="second")
    assert sorted(loaded2) == sorted(keys)
    with pytest.raises(ValueError, match="clashes"):
        load_lora(fresh, path, adapter="copy")  # ParameterDict method name


def test_base_digest_mismatch_warns(tmp_path):
    cfg = LoRAConfig(rank=2, targets=["*"])
    model, _ = make("linear")
    apply_lora(model, cfg)
    path = tmp_path / "a.safetensors"
    save_lora(model, path, cfg, base_digest="digest-A")
    with pytest.warns(UserWarning, match=r"digest-A.*digest-B"):
        load_lora(make("linear")[0], path, base_digest="digest-B")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_lora(make("linear")[0], path, base_digest="digest-A")


def test_two_named_adapters_hot_swap_and_unload():
    model, x = make("decoder")
    model.eval()
    with torch.no_grad():
        y0 = model(x)
        apply_lora(model, LoRAConfig(rank=2, targets=["*"]), adapter="a")
        randomize(model, seed=1)
        apply_lora(model, LoRAConfig(rank=2, targets=["*"]), adapter="b")
        for layer in lora_layers(model):  # only adapter b gets new random values
            layer.lora_B["b"].copy_(torch.randn_like(layer.lora_B["b"]) * 0.1)
        ya = model(x)  # 'a' stays active after adding 'b'
        set_active_adapter(model, "b")
        yb = model(x)
        assert not torch.allclose(ya, yb, atol=1e-4)
        set_active_adapter(model, "a")
        assert torch.equal(model(x), ya)
        # merged hot swap: switching unmerges first
        merge_lora(model, remove_wrappers=False)
        torch.testing.assert_close(model(x), ya, atol=ATOL, rtol=RTOL)
        set_active_adapter(model, "b")  # unmerge restores the exact base storage
        assert torch.equal(model(x), yb)
        with pytest.raises(KeyError):
            set_active_adapter(model, "missing")
        unload_lora(model)
        torch.testing.assert_close(model(x), y0, atol=ATOL, rtol=RTOL)
