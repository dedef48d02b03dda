"""The seam: what the pipeline asks of a codec family, and what every family shares.

A family module (snac.py, mimi.py) defines two classes and a few functions:

  the codec (frozen; `Codec` below is its mixin)
    loaded strictly from a folder recognised by its config.json; `sampling_rate`, `codebook_size`,
    `geometry_at(target_rate)` (pipeline.geometry.Geometry), `fingerprint(target_rate, format)`
    (what cached codes depend on), `encode(audio) -> codes` (frozen, inference mode),
    `latents(codes)` (the decoder path's input), `decode(codes)`, `noise_disabled()` (a nestable
    context: deterministic decoding), `context(side)` (how far the encoder or the decoder looks, in frames),
    `frozen_parts()` and FROZEN (parameter-name prefixes that never train: the codes keep their
    meaning), `save(folder)`;
  its 48 kHz model (a subclass; `Model48` below is its mixin)
    the codec's decoder path with one new upsampling block (`decoder.new_block`) before the
    output head, at `target_rate`; `geometry`, `stages()` (the decoder path as `Stage`s: what a
    trainer runs one by one, checkpointed or in bf16), `forward(latents)`, `config` (its
    config.json), `adapt_head(state_dict)` and `head_key` (smart init's wide head), LoRA at
    inference;
  functions: `load_codec(folder, n_q, device)`, `build_codec(config, seed, n_q)` (random weights of
    a config's shapes), `from_codec(codec, target_rate, init, seed, interpolator)` (the 48 kHz
    model, smart init), `model_from_config(config, target_rate, n_q)` (no weights: the meta device
    builds it for parse-time checks), `model_from_saved(config, state_dict)`,
    `geometry(config, target_rate, n_q)` and `SHAPES` (published configs by name, for benches).

pipeline/model/codecs/__init__.py tells the family from a folder or config and dispatches; the rest
of the package uses only the above. Shared here: Stage, the state digest, freezing, the measured
reach of a decoder (`decode_reach`), saving and reading a 48 kHz model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .heads import check_init


class Stage(NamedTuple):
    """One step of a decoder path: a module from (B, C, T) to (B, C', T'), the rate (steps per
    second) of its output, and whether it is an upsampling block (what activation checkpointing
    recomputes: most of the activations live there)."""
    name: str
    module: nn.Module
    rate: float
    block: bool = False


def state_digest(state_dict: dict) -> str:
    """sha256 over names, dtypes, shapes and bytes: the same for .bin and .safetensors copies."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# where every family puts the new upsampling block: the only parameters a 48 kHz model has beyond
# its codec's
NEW_BLOCK = "decoder.new_block"


def with_codec_weights(make, codec, init: str, seed: int, interpolator: str, smart_init) -> nn.Module:
    """`make()`'s 48 kHz model holding the codec's weights (only NEW_BLOCK is new), the new block
    initialised from `seed` without touching the global RNG (then `smart_init` when init is
    "smart"), the codec's frozen parts frozen, on the codec's device."""
    check_init(init, interpolator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
        missing, unexpected = model.load_state_dict(codec.state_dict(), strict=False)
        assert not unexpected and all(k.startswith(NEW_BLOCK + ".") for k in missing), (missing, unexpected)
        if init == "smart":
            smart_init(model, interpolator)
    for part in model.frozen_parts():
        freeze(part)
    return model.to(next(codec.parameters()).device)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Codec:
    """Mixin of a family's codec class (an nn.Module): what is the same in every family."""
    FROZEN: tuple = ()

    def identity(self) -> dict:
        """What the codes depend on besides the weights and the geometry (Mimi: family, n_q)."""
        return {}

    def fingerprint(self, target_rate: int, cache_format: int) -> dict:
        g = asdict(self.geometry_at(target_rate))
        g["strides"] = list(g["strides"])
        return {"cache_format": cache_format, **self.identity(), "codec_digest": state_digest(self.state_dict()), **g}

    def frozen_parts(self) -> list:
        return [getattr(self, p.rstrip(".")) for p in self.FROZEN]

    @contextlib.contextmanager
    def noise_disabled(self):
        """Deterministic decoding inside (a family without noise: nothing to switch)."""
        yield self


class Staged:
    """Mixin: forward is the decoder path, stage by stage (`stages()`), and decode is that path on
    the codes' latents. A 48 kHz model, and a codec whose own decoder is built that way (Mimi)."""

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> audio (B, 1, T) at the model's rate: the decoder path, the part that trains."""
        x = latents
        for stage in self.stages():
            x = stage.module(x)
        return x

    def decode(self, codes: list) -> torch.Tensor:
        return self(self.latents(codes))


class Model48(Staged):
    """Mixin of a family's 48 kHz model: the decoder path as stages, decode, LoRA at inference."""

    @property
    def geometry(self):
        return self.geometry_at(self.target_rate)

    # LoRA at inference: adapters hot-swap on the loaded base (see pipeline.model.lora)
    def load_lora(self, path, adapter: str | None = None):
        """-> (loaded, skipped) keys; warns if the adapter was trained on another base."""
        from .. import lora
        return lora.load_lora(self, path, adapter, base_digest=self.base_digest())

    def set_lora_enabled(self, enabled: bool) -> None:
        from .. import lora
        lora.set_lora_enabled(self, enabled)

    def set_active_adapter(self, name: str) -> None:
        from .. import lora
        lora.set_active_adapter(self, name)

    def unload_lora(self) -> None:
        from .. import lora
        lora.unload_lora(self)

    def get_lora_state_dict(self, adapter: str | None = None) -> dict:
        from .. import lora
        return lora.lora_state_dict(self, adapter)

    def base_digest(self) -> str:
        """Digest of the weights without adapters (what LoRA files record as their base), the same
        whether adapters are loaded or not: a fused to_qkv that LoRA split into q/k/v counts fused."""
        sd = {k.replace(".base.", "."): v for k, v in self.state_dict().items() if "lora_" not in k}
        split = {}
        for k in list(sd):
            m = re.fullmatch(r"(.*\.to_qkv)\.([qkv])\.(weight|bias)", k)
            if m:
                split.setdefault(f"{m[1]}.{m[3]}", {})[m[2]] = sd.pop(k)
        sd.update({k: torch.cat([parts[p] for p in "qkv"]) for k, parts in split.items()})
        return state_digest(sd)


# ---- reach: how far a model looks, measured ------------------------------------------------------
@torch.inference_mode()
def reach(fn, channels: int, per_frame: int, quantum: int, device) -> tuple[int, int]:
    """(left, right): finest frames of input before and after an output frame that `fn` (noise
    off) depends on, in whole quanta: the spread of a change to one aligned quantum block of a
    random input (B, channels, frames * per_frame) into the output. Two forward passes in one
    batch: no autograd graph."""
    def probe(frames, m, g):
        x = torch.randn(1, channels, frames * per_frame, generator=g)
        moved = x.clone()
        moved[..., m * per_frame:(m + quantum) * per_frame] += torch.randn(channels, quantum * per_frame, generator=g)
        return fn(torch.cat([x, moved]).to(device))
    return sides(probe, quantum)


@torch.inference_mode()
def decode_reach(decode, geo, device) -> tuple[int, int]:
    """(left, right): finest frames of codes before and after an output frame that its audio
    depends on, in whole quanta, measured through `decode` (noise off) as `reach` measures: new
    random codes in one aligned quantum block of random codes, and how far after the block (left
    context: what the decoder looks back) and before it (right context: what it looks ahead) the
    audio moves."""
    size, q = geo.codebook_size, geo.quantum

    def probe(frames, m, g):
        codes, moved = [], []
        for s in geo.strides:
            c = torch.randint(0, size, (1, frames // s), generator=g)
            d = c.clone()
            d[:, m // s:(m + q) // s] = (d[:, m // s:(m + q) // s]
                                        + torch.randint(1, size, (1, q // s), generator=g)) % size
            codes.append(c)
            moved.append(d)
        return decode([torch.cat(pair).to(device) for pair in zip(codes, moved)])
    return sides(probe, q)


def sides(probe, quantum: int, floor: float = 1e-6) -> tuple[int, int]:
    """(left, right): how many finest frames after and before a changed quantum block the output
    moves by more than `floor` times its largest change, rounded up to quanta. `probe(frames, m,
    generator)` returns the outputs (2, C, frames * samples_per_frame) of an input and of the same
    input changed in frames [m, m + quantum); the input doubles until the change stays inside it."""
    frames, g = 8 * quantum, torch.Generator().manual_seed(0)
    while frames <= 1024 * quantum:
        m = frames // 2 // quantum * quantum
        y = probe(frames, m, g).float().cpu()
        d = (y[0] - y[1]).abs().amax(0)
        hit = torch.nonzero(d > floor * d.max()).flatten() // (y.shape[-1] // frames)
        lo, hi = int(hit.min()), int(hit.max())
        if lo > 0 and hi < frames - 1:
            up = lambda n: math.ceil(max(n, 0) / quantum) * quantum
            return up(hi - (m + quantum - 1)), up(m - lo)
        frames *= 2                     # the change reached the edges: measure on a longer input
    raise RuntimeError(f"the model's receptive field exceeds {frames // 2} frames; cannot chunk it")


# ---- saving and reading a 48 kHz model -----------------------------------------------------------
def save_model(model: nn.Module, folder, extra_config: dict | None = None) -> Path:
    """model.safetensors + config.json (the model's config, `extra_config`, the weights' digest)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, folder / "model.safetensors", metadata={"format": model.config["format"]})
    cfg = {**model.config, **(extra_config or {}), "weights_digest": state_digest(sd)}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def read_saved(path) -> tuple[dict, dict]:
    """(config, state dict) of a saved model: a folder (config.json + model.safetensors) or a
    final.pt file (a torch.load(weights_only=True)-safe dict)."""
    path = Path(path)
    if path.is_dir():
        from safetensors.torch import load_file
        return json.loads((path / "config.json").read_text()), load_file(path / "model.safetensors")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob["config"], blob["state_dict"]
