"""LoRA adapters for SNAC-style models (Linear, Conv1d, ConvTranspose1d, fused-QKV attention).

Why our own module and not peft: tried with peft 0.21.2 on SNAC's layers (2026-11): a
weight-normed ConvTranspose1d is refused ("Target module ParametrizedConvTranspose1d ... is not
supported"), and SNAC's depthwise Conv1d (groups = channels) is refused unless the rank is a
multiple of the groups ("support is limited to conv layers where the rank is divisible by
groups"), i.e. rank >= 64 for snac_24khz's last blocks. Nor does it split a fused to_qkv into q/k/v
adapters. Those are the decoder's layers, so peft would adapt only a fraction of it. The module
here is small (one wrapper class, one fused-QKV class, a few functions); if peft gains these, the
decision can be revisited, and the file format (plain safetensors + string metadata) converts.

How it works
------------
`apply_lora(model, cfg)` replaces every matching module in its parent by a `LoRALayer` that
keeps the original module as `.base` (frozen, untouched: weight-normed bases keep their
`parametrizations.weight.original0/original1`) and holds, per named adapter,

    lora_A[name]: (groups * r, in_per_group * kernel)      kaiming-uniform init
    lora_B[name]: (out_channels, r)                        zeros (a fresh adapter is a no-op)

with r = min(cfg.rank, out_per_group, in_per_group * kernel) (a larger rank cannot add
expressivity; for the usual groups == 1 layers r is just cfg.rank). Scaling is the classic
LoRA one, fixed per adapter: `scaling = alpha / rank` with the *configured* rank, so

    delta_W = (alpha / rank) * B @ A      (block-diagonal per group, reshaped to base.weight's shape)
    forward(x) = base(x) + scaling * B-path(A-path(dropout(x)))

The A-path is a convolution (transposed convolution for ConvTranspose1d) with the base's
stride / padding / output_padding / dilation / groups producing groups*r channels, the B-path a
grouped 1x1 convolution back to out_channels; for Linear it is x A^T B^T. Grouped (including
depthwise) convs are supported: each group gets its own rank-r factors, so the delta keeps the
base's group structure. Changing alpha at fixed rank scales the update linearly; doubling the
rank at fixed alpha halves the per-component scale.

Fused QKV: a Linear named `to_qkv` (SNAC's local attention has one) whose out_features is divisible by 3 is
decomposed into three plain Linear projections q/k/v (copies of the weight slices taken when
`apply_lora` runs, so call it AFTER loading pretrained weights), each wrapped with its own
adapter. The forward computes the base part as one linear with the concatenated q/k/v weights
(bit-identical to the original fused layer) plus the concatenated adapter outputs, so the
module still returns the fused tensor.

Merging: `LoRALayer.merge()` adds the active adapter's delta to the base weight. For
weight-normed bases the merged weight is *assigned* (`base.weight = W`), which goes through
weight_norm's right_inverse and really updates original0/original1 (an in-place write into
`.weight` would be lost). `merge_lora(model)` bakes adapters in and (by default) removes the
wrappers, collapsing fused q/k/v back into one Linear, so the result has the original module
structure and state-dict keys. `merge_lora(model, remove_wrappers=False)` / `unmerge_lora`
toggle a merged state inside the wrappers instead (unmerge restores the exact pre-merge base
storage; switching adapter or disabling LoRA unmerges first). Merged output equals unmerged output up to
float rounding (and only in eval mode when dropout > 0).

Limitations: only nn.Linear (groups n/a), nn.Conv1d and nn.ConvTranspose1d are adaptable;
Conv2d etc. are not matched. While a layer is merged its LoRA parameters get no gradient.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..settings import TRAIN_DEFAULTS

FORMAT = "snac-lora/1"
SUPPORTED = (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)
_ADAPTER_RE = re.compile(r"^[A-Za-z0-9_-]+$")


_DEFAULTS = TRAIN_DEFAULTS["lora"]       # a phase's `lora` block in the schema: its one home


@dataclass
class LoRAConfig:
    rank: int = _DEFAULTS["rank"]
    alpha: float = _DEFAULTS["alpha"]
    dropout: float = _DEFAULTS["dropout"]
    targets: list[str] = field(default_factory=lambda: list(_DEFAULTS["targets"]))

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        self.targets = list(self.targets)
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoRA targets must not be empty")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _check_adapter_name(name: str) -> None:
    if not _ADAPTER_RE.match(name):
        raise ValueError(f"adapter name {name!r} must match [A-Za-z0-9_-]+")
    if hasattr(nn.ParameterDict(), name) or hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter name {name!r} clashes with a ParameterDict/ModuleDict attribute")


def _is_parametrized_weight(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight")


@torch.no_grad()
def _set_weight(module: nn.Module, weight: Tensor) -> None:
    """Set module.weight so it really changes, also for parametrized (weight_norm) weights."""
    if _is_parametrized_weight(module):
        module.weight = weight.to(module.weight.dtype)  # -> right_inverse -> original0/1
    else:
        module.weight.copy_(weight)


class LoRALayer(nn.Module):
    """Frozen `base` (Linear / Conv1d / ConvTranspose1d) plus named low-rank adapters."""

    def __init__(self, base: nn.Module):
        super().__init__()
        if not isinstance(base, SUPPORTED):
            raise TypeError(f"LoRALayer cannot wrap {type(base).__name__}")
        if isinstance(base, nn.ConvTranspose1d) and base.padding_mode != "zeros":
            raise ValueError("ConvTranspose1d only supports padding_mode='zeros'")
        self.base = base
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.enabled = True
        self.merged_adapter: str | None = None
        self._premerge: list[Tensor] | None = None  # exact base storage while merged

    # -- geometry --------------------------------------------------------------------------
    def _dims(self) -> tuple[int, int, int, int]:
        """(groups, in_per_group, out_channels, kernel)."""
        b = self.base
        if isinstance(b, nn.Linear):
            return 1, b.in_features, b.out_features, 1
        g = b.groups
        return g, b.in_channels // g, b.out_channels, b.kernel_size[0]

    # -- adapters --------------------------------------------------------------------------
    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0) -> None:
        _check_adapter_name(name)
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        g, in_g, out, k = self._dims()
        r = min(rank, out // g, in_g * k)
        w = self.base.weight
        self.lora_A[name] = nn.Parameter(torch.empty(g * r, in_g * k, device=w.device, dtype=w.dtype))
        self.lora_B[name] = nn.Parameter(torch.zeros(out, r, device=w.device, dtype=w.dtype))
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / rank
        self.reset_adapter(name)
        if self.active_adapter is None:
            self.active_adapter = name

    @torch.no_grad()
    def reset_adapter(self, name: str) -> None:
        nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name])

    def set_active(self, name: str | None) -> None:
        if name is not None and name not in self.lora_A:
            raise KeyError(f"adapter {name!r} not on this layer (has {list(self.lora_A)})")
        if self.merged_adapter is not None and self.merged_adapter != name:
            self.unmerge()
        self.active_adapter = name

    def set_enabled(self, enabled: bool) -> None:
        if not enabled and self.merged_adapter is not None:
            self.unmerge()
        self.enabled = enabled

    # -- delta weight ----------------------------------------------------------------------
    def delta_weight(self, name: str | None = None) -> Tensor:
        """scaling * B @ A (block-diagonal over groups), in base.weight's shape and layout."""
        name = name or self.active_adapter
        A, B = self.lora_A[name], self.lora_B[name]
        g, in_g, out, k = self._dims()
        r = B.shape[1]
        d = torch.bmm(B.view(g, out // g, r), A.view(g, r, in_g * k)) * self.scaling[name]
        if isinstance(self.base, nn.Linear):
            return d.view(out, in_g)
        if isinstance(self.base, nn.ConvTranspose1d):  # weight: (in, out/g, k)
            return d.view(g, out // g, in_g, k).permute(0, 2, 1, 3).reshape(g * in_g, out // g, k)
        return d.view(out, in_g, k)  # Conv1d weight: (out, in/g, k)

    # -- forward ---------------------------------------------------------------------------
    def lora_out(self, x: Tensor, output_size: list[int] | None = None) -> Tensor | None:
        """scaling * lora_path(x), or None when no adapter contributes (off/merged/none)."""
        name = self.active_adapter
        if not self.enabled or name is None or self.merged_adapter is not None:
            return None
        A, B = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x)
        b = self.base
        if isinstance(b, nn.Linear):
            return F.linear(F.linear(x, A), B) * self.scaling[name]
        g, in_g, out, k = self._dims()
        r = B.shape[1]
        if isinstance(b, nn.ConvTranspose1d):
            a = A.view(g, r, in_g, k).permute(0, 2, 1, 3).reshape(g * in_g, r, k)
            op = b._output_padding(x, output_size, b.stride, b.padding, b.kernel_size, 1, b.dilation)
            h = F.conv_transpose1d(x, a, None, b.stride, b.padding, op, g, b.dilation)
        else:
            a = A.view(g * r, in_g, k)
            if b.padding_mode != "zeros":
                x = F.pad(x, b._reversed_padding_repeated_twice, mode=b.padding_mode)
                h = F.conv1d(x, a, None, b.stride, 0, b.dilation, g)
            else:
                h = F.conv1d(x, a, None, b.stride, b.padding, b.dilation, g)
        return F.conv1d(h, B.view(out, r, 1), None, 1, 0, 1, g) * self.scaling[name]

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if isinstance(self.base, nn.ConvTranspose1d):
            y = self.base(x, output_size)
        else:
            y = self.base(x)
        d = self.lora_out(x, output_size)
        return y if d is None else y + d

    # -- merge -----------------------------------------------------------------------------
    def _weight_storage(self) -> list[Tensor]:
        """The tensors that really hold base.weight (weight_norm: original0/original1)."""
        if _is_parametrized_weight(self.base):
            return list(self.base.parametrizations.weight.parameters(recurse=False))
        return [self.base.weight]

    @torch.no_grad()
    def merge(self) -> None:
        """Add the active adapter's delta into base.weight (no-op if disabled/merged/none)."""
        if self.merged_adapter is not None or not self.enabled or self.active_adapter is None:
            return
        # Keep the exact pre-merge storage so unmerge restores it bit-exactly (weight_norm's
        # right_inverse round trip is only exact up to float rounding).
        self._premerge = [t.detach().clone() for t in self._weight_storage()]
        _set_weight(self.base, self.base.weight + self.delta_weight())
        self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_adapter is None:
            return
        stash, self._premerge = getattr(self, "_premerge", None), None
        storage = self._weight_storage()
        if stash is not None and [t.shape for t in stash] == [t.shape for t in storage]:
            for dst, src in zip(storage, stash):
                dst.copy_(src.to(dst.device, dst.dtype))
        else:
            _set_weight(self.base, self.base.weight - self.delta_weight(self.merged_adapter))
        self.merged_adapter = None

    def extra_repr(self) -> str:
        return (f"adapters={list(self.lora_A)}, active={self.active_adapter!r}, "
                f"enabled={self.enabled}, merged={self.merged_adapter!r}")


class FusedQKVLoRA(nn.Module):
    """A fused q|k|v Linear decomposed into three LoRA-wrapped Linears; outputs the fused tensor."""

    def __init__(self, fused: nn.Linear):
        super().__init__()
        if fused.out_features % 3:
            raise ValueError("fused QKV Linear needs out_features divisible by 3")
        d, w = fused.out_features // 3, fused.weight.detach()
        for i, part in enumerate("qkv"):
            lin = nn.Linear(fused.in_features, d, bias=fused.bias is not None,
                            device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w[i * d:(i + 1) * d])
                if fused.bias is not None:
                    lin.bias.copy_(fused.bias.detach()[i * d:(i + 1) * d])
            setattr(self, part, LoRALayer(lin))

    def parts(self) -> tuple[LoRALayer, LoRALayer, LoRALayer]:
        return self.q, self.k, self.v

    def forward(self, x: Tensor) -> Tensor:
        ps = self.parts()
        w = torch.cat([p.base.weight for p in ps])
        b = None if ps[0].base.bias is None else torch.cat([p.base.bias for p in ps])
        y = F.linear(x, w, b)  # bit-identical to the original fused layer
        deltas = [p.lora_out(x) for p in ps]
        if all(dl is None for dl in deltas):
            return y
        deltas = [torch.zeros_like(y[..., :p.base.out_features]) if dl is None else dl
                  for p, dl in zip(ps, deltas)]
        return y + torch.cat(deltas, dim=-1)

    def to_linear(self) -> nn.Linear:
        """Collapse back into one fused Linear with the current (possibly merged) weights."""
        ps = self.parts()
        w = torch.cat([p.base.weight.detach() for p in ps])
        has_bias = ps[0].base.bias is not None
        lin = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if has_bias:
                lin.bias.copy_(torch.cat([p.base.bias.detach() for p in ps]))
        lin.requires_grad_(ps[0].base.weight.requires_grad)
        return lin


# -- model traversal -------------------------------------------------------------------------
def _candidates(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
    """(qualified name, module, parent, attribute) for adaptable modules and existing wrappers.

    Does not descend into wrappers, so names stay those of the original model."""
    for attr, child in module.named_children():
        name = f"{prefix}.{attr}" if prefix else attr
        if isinstance(child, (LoRALayer, FusedQKVLoRA, *SUPPORTED)):
            yield name, child, module, attr
        else:
            yield from _candidates(child, name)


def _is_fused_qkv(attr: str, module: nn.Module) -> bool:
    return attr == "to_qkv" and isinstance(module, nn.Linear) and module.out_features % 3 == 0


def lora_layers(model: nn.Module) -> Iterator[LoRALayer]:
    for m in model.modules():
        if isinstance(m, LoRALayer):
            yield m


def _adapters(model: nn.Module) -> set[str]:
    return {n for layer in lora_layers(model) for n in layer.lora_A}


def _freeze_non_lora(model: nn.Module) -> None:
    lora_ids = {id(p) for layer in lora_layers(model)
                for pd in (layer.lora_A, layer.lora_B) for p in pd.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_ids)


# -- public API ------------------------------------------------------------------------------
def apply_lora(model: nn.Module, cfg: LoRAConfig, adapter: str = "default") -> list[str]:
    """Wrap modules matching cfg.targets (fnmatch on qualified names) with adapter `adapter`.

    Freezes every non-LoRA parameter of the model and returns the wrapped module names. A
    pattern that matches no Linear/Conv1d/ConvTranspose1d raises ValueError naming it. Calling
    again with another adapter name adds that adapter to the (already) wrapped layers."""
    _check_adapter_name(adapter)
    cands = list(_candidates(model))
    matched: list[tuple[str, nn.Module, nn.Module, str]] = []
    unmatched = []
    for pat in cfg.targets:
        hits = [c for c in cands if fnmatch.fnmatchcase(c[0], pat)]
        if not hits:
            unmatched.append(pat)
        matched += [c for c in hits if c not in matched]
    if unmatched:
        names = sorted((c[0] for c in cands), key=lambda n: not n.startswith("decoder"))   # this model's own
        raise ValueError(
            f"LoRA target pattern(s) {unmatched} match no Linear/Conv1d/ConvTranspose1d module "
            f"(patterns are fnmatch on qualified names, e.g. '{names[0].rsplit('.', 1)[0] if names else 'decoder'}.*'; "
            f"some candidates: {names[:5]})")
    wrapped = []
    for name, mod, parent, attr in matched:
        if isinstance(mod, (LoRALayer, FusedQKVLoRA)):
            wrapper = mod
        elif _is_fused_qkv(attr, mod):
            wrapper = FusedQKVLoRA(mod)
        else:
            wrapper = LoRALayer(mod)
        layers = wrapper.parts() if isinstance(wrapper, FusedQKVLoRA) else (wrapper,)
        for layer in layers:
            if adapter in layer.lora_A:
                raise ValueError(f"adapter {adapter!r} already applied to {name}")
        for layer in layers:
            if layer.merged_adapter is not None:
                layer.unmerge()
            layer.add_adapter(adapter, cfg.rank, cfg.alpha, cfg.dropout)
        if wrapper is not mod:
            setattr(parent, attr, wrapper)
        wrapped.append(name)
    _freeze_non_lora(model)
    return wrapped


def lora_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, Tensor]:
    """Adapter tensors only (keys `<module>.lora_A.<adapter>` / `.lora_B.<adapter>`)."""
    out = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B") and adapter in (None, parts[-1]):
            out[k] = v
    return out


def save_lora(model: nn.Module, path, cfg: LoRAConfig, adapter: str = "default",
              base_digest: str = "") -> None:
    """Write only `adapter`'s tensors (keys without the adapter suffix) + string metadata."""
    from safetensors.torch import save_file

    sd = lora_state_dict(model, adapter)
    if not sd:
        raise ValueError(f"model has no LoRA adapter {adapter!r} (has {sorted(_adapters(model))})")
    tensors = {k.rsplit(".", 1)[0]: v.detach().cpu().contiguous() for k, v in sd.items()}
    meta = {"format": FORMAT, "rank": str(cfg.rank), "alpha": repr(float(cfg.alpha)),
            "dropout": repr(float(cfg.dropout)), "targets": json.dumps(list(cfg.targets)),
            "adapter": adapter, "base_digest": base_digest or ""}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def read_lora_metadata(path) -> tuple[LoRAConfig, dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format={meta.get('format')!r})")
    cfg = LoRAConfig(rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                     dropout=float(meta["dropout"]), targets=json.loads(meta["targets"]))
    return cfg, meta


def load_lora(model: nn.Module, path, adapter: str | None = None,
              base_digest: str | None = None) -> tuple[list[str], list[str]]:
    """Load adapter tensors from `path`; returns (loaded keys, skipped keys) as named in the file.

    The adapter name defaults to the file's. If the model has no such adapter yet it is applied
    from the file's metadata (rank/alpha/dropout/targets). If `base_digest` is given and differs
    from the digest recorded in the file, a warning names both. Shape mismatches raise.
    Merged wrappers are unmerged first; the loaded adapter becomes the active one."""
    from safetensors.torch import load_file

    cfg, meta = read_lora_metadata(path)
    file_digest = meta.get("base_digest", "")
    if base_digest is not None and base_digest != file_digest:
        warnings.warn(
            f"LoRA file {path} was trained on base model digest {file_digest or '<none recorded>'!r}, "
            f"but the model's base digest is {base_digest!r}; the adapter may not fit this base",
            stacklevel=2)
    adapter = adapter or meta["adapter"]
    unmerge_lora(model)  # merged weights would go stale when the adapter tensors change
    if adapter not in _adapters(model):
        apply_lora(model, cfg, adapter)
    tensors = load_file(str(path))
    params = lora_state_dict(model, adapter)
    loaded, skipped = [], []
    with torch.no_grad():
        for key, t in tensors.items():
            p = params.get(f"{key}.{adapter}")
            if p is None:
                skipped.append(key)
                continue
            if p.shape != t.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, model expects {tuple(p.shape)}")
            p.copy_(t)
            loaded.append(key)
    missing = sorted(set(k.rsplit(".", 1)[0] for k in params) - set(loaded))
    if skipped:
        warnings.warn(f"{len(skipped)} LoRA tensors in {path} match no module: {skipped[:5]}", stacklevel=2)
    if missing:
        warnings.warn(f"{len(missing)} LoRA tensors of adapter {adapter!r} not in {path} "
                      f"(left at init): {missing[:5]}", stacklevel=2)
    set_active_adapter(model, adapter)      # the adapter just loaded is the one in use
    return loaded, skipped


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    for layer in lora_layers(model):
        layer.set_enabled(enabled)


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Switch every wrapped layer to adapter `name` (layers without it contribute nothing)."""
    if name not in _adapters(model):
        raise KeyError(f"no LoRA adapter {name!r} (have {sorted(_adapters(model))})")
    for layer in lora_layers(model):
        layer.set_active(name if name in layer.lora_A else None)


def unload_lora(model: nn.Module, adapter: str | None = None) -> None:
    """Reset adapter weights (all adapters, or one) so the model equals its base: B = 0."""
    for layer in lora_layers(model):
        layer.unmerge()
        for name in layer.lora_A:
            if adapter in (None, name):
                layer.reset_adapter(name)


def merge_lora(model: nn.Module, remove_wrappers: bool = True) -> nn.Module:
    """Merge the active adapter into the base weights.

    remove_wrappers=True (export): every LoRALayer is replaced by its base, fused q/k/v
    collapse back to one Linear, so the model has its original structure. False: wrappers
    stay, marked merged (undo with unmerge_lora). Returns the model."""
    for layer in lora_layers(model):
        layer.merge()
    if remove_wrappers:
        for _, mod, parent, attr in list(_candidates(model)):
            if isinstance(mod, FusedQKVLoRA):
                setattr(parent, attr, mod.to_linear())
            elif isinstance(mod, LoRALayer):
                setattr(parent, attr, mod.base)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract merged deltas again (only meaningful after merge_lora(remove_wrappers=False))."""
    for layer in lora_layers(model):
        layer.unmerge()
    return model


__all__ = ["LoRAConfig", "LoRALayer", "FusedQKVLoRA", "apply_lora", "lora_state_dict",
           "save_lora", "load_lora", "read_lora_metadata", "set_lora_enabled",
           "set_active_adapter", "unload_lora", "merge_lora", "unmerge_lora", "lora_layers"]
