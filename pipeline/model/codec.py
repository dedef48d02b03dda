"""The frozen codec: loading SNAC checkpoints, its geometry, its fingerprint.

Everything rate-like (hop, code strides, the 48 kHz hop) is derived here from the
loaded config; nothing else in the package hard-codes them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from snac import SNAC
from snac.layers import NoiseBlock
from snac.layers import Snake1d as SnacSnake

from .snake import use_snake

# The official SNAC models' shapes by name (hubertsiuzdak/snac_24khz, _32khz, _44khz), for
# benchmarks that need the real sizes without the weights.
OFFICIAL_CONFIGS = {
    "snac_24khz": dict(sampling_rate=24000, encoder_dim=48, encoder_rates=[2, 4, 8, 8], decoder_dim=1024,
                decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096, codebook_dim=8,
                vq_strides=[4, 2, 1], noise=True, depthwise=True),
    "snac_32khz": dict(sampling_rate=32000, encoder_dim=64, encoder_rates=[2, 3, 8, 8], decoder_dim=1536,
                decoder_rates=[8, 8, 3, 2], attn_window_size=32, codebook_size=4096, codebook_dim=8,
                vq_strides=[4, 2, 1], noise=True, depthwise=True),
    "snac_44khz": dict(sampling_rate=44100, encoder_dim=64, encoder_rates=[2, 4, 8, 8], decoder_dim=1536,
                decoder_rates=[8, 8, 4, 2], attn_window_size=32, codebook_size=4096, codebook_dim=8,
                vq_strides=[8, 4, 2, 1], noise=True, depthwise=True),
}

SNAC_KEYS = ("sampling_rate", "encoder_dim", "encoder_rates", "latent_dim", "decoder_dim",
             "decoder_rates", "attn_window_size", "codebook_size", "codebook_dim", "vq_strides",
             "noise", "depthwise")


@dataclass(frozen=True)
class Geometry:
    """Time geometry of a codec, all derived from its config.

    Code frame t of codebook i covers codec-rate samples [t*s_i*hop, (t+1)*s_i*hop) and
    target-rate samples [t*s_i*hop_target, (t+1)*s_i*hop_target)."""
    codec_rate: int
    target_rate: int
    hop: int            # codec-rate samples per finest code frame
    hop_target: int     # target-rate samples per finest code frame
    strides: tuple      # per codebook, in finest frames (SNAC's vq_strides)
    pad_to: int         # SNAC pads inputs to a multiple of this many codec-rate samples
    codebook_size: int
    attn_window: int    # SNAC's local-attention window in finest frames (1: no attention)

    @property
    def coarsest(self) -> int:
        return max(self.strides)

    @property
    def quantum(self) -> int:
        """Segments start at, and last, multiples of this many finest frames: whole codes of the
        coarsest codebook and whole windows of SNAC's local attention."""
        return math.lcm(self.coarsest, self.attn_window)

    @property
    def n_codebooks(self) -> int:
        return len(self.strides)

    def frames(self, n_codec_samples: int) -> int:
        """Finest-codebook frames SNAC produces for an input of this length."""
        return math.ceil(n_codec_samples / self.pad_to) * self.pad_to // self.hop


def geometry(model_or_config, target_rate: int) -> Geometry:
    cfg = model_or_config if isinstance(model_or_config, dict) else snac_config(model_or_config)
    rate = int(cfg["sampling_rate"])
    hop = int(np.prod(cfg["encoder_rates"]))
    strides = tuple(int(s) for s in cfg["vq_strides"])
    if (hop * target_rate) % rate:
        raise ValueError(f"target rate {target_rate} is not a whole number of samples per codec hop "
                         f"({hop} samples at {rate} Hz)")
    window = int(cfg.get("attn_window_size") or 1)
    pad_to = hop * math.lcm(strides[0], window)
    return Geometry(rate, int(target_rate), hop, hop * target_rate // rate, strides, pad_to,
                    int(cfg["codebook_size"]), window)


def snac_config(model: SNAC) -> dict:
    """The constructor kwargs of a SNAC instance (what goes into config.json)."""
    return {
        "sampling_rate": int(model.sampling_rate), "encoder_dim": int(model.encoder_dim),
        "encoder_rates": [int(r) for r in model.encoder_rates], "latent_dim": int(model.latent_dim),
        "decoder_dim": int(model.decoder_dim), "decoder_rates": [int(r) for r in model.decoder_rates],
        "attn_window_size": model.attn_window_size, "codebook_size": int(model.codebook_size),
        "codebook_dim": int(model.codebook_dim), "vq_strides": [int(s) for s in model.vq_strides],
        "noise": any(isinstance(m, NoiseBlock) for m in model.decoder.modules()),
        "depthwise": model.encoder.block[1].block[0].block[1].groups > 1,
    }


def state_digest(state_dict: dict) -> str:
    """sha256 over names, dtypes, shapes and bytes: the same for .bin and .safetensors copies."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_state_dict(folder: Path) -> dict:
    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file
        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin "
                            "(expected the official SNAC layout: config.json + pytorch_model.bin)")


def load_codec(folder, device="cpu") -> SNAC:
    """Load a SNAC checkpoint folder (official `config.json` + `pytorch_model.bin`, or
    `config.json` + `model.safetensors`), strictly, frozen, in eval mode."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"codec folder {folder} has no config.json")
    cfg = json.loads((folder / "config.json").read_text())
    unknown = set(cfg) - set(SNAC_KEYS)
    if unknown:
        raise ValueError(f"{folder}/config.json: keys SNAC does not take: {sorted(unknown)}")
    model = new_snac(cfg)
    model.load_state_dict(read_state_dict(folder), strict=True)
    return freeze(model).to(device)


def save_codec(model: SNAC, folder, official: bool = False) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(snac_config(model), indent=2) + "\n")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if official:
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file
        save_file(sd, folder / "model.safetensors")
    return folder


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_codec(config: dict, seed: int) -> SNAC:
    """A SNAC from constructor kwargs with a fixed seed (the demo codec's starting point)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return new_snac(config)


def new_snac(config: dict) -> SNAC:
    """SNAC(**config) with the project's Snake (pipeline.model.snake: the same numbers and
    state-dict keys, no TorchScript, so activation checkpointing and torch.compile work)."""
    return use_snake(SNAC(**config), SnacSnake)


def codec_digest(model: SNAC) -> str:
    return state_digest(model.state_dict())


@contextlib.contextmanager
def noise_disabled(model: torch.nn.Module):
    """Turn SNAC's NoiseBlocks into identities (deterministic decoding), restoring them after."""
    blocks = [m for m in model.modules() if isinstance(m, NoiseBlock)]
    for b in blocks:
        b.forward = lambda x: x
    try:
        yield model
    finally:
        for b in blocks:
            del b.forward


def geometry_of(fingerprint: dict) -> Geometry:
    """The Geometry a cache fingerprint records."""
    return Geometry(**{k: tuple(v) if k == "strides" else v for k, v in fingerprint.items()
                       if k in Geometry.__dataclass_fields__})


def fingerprint(model: SNAC, target_rate: int, cache_format: int) -> dict:
    g = geometry(model, target_rate)
    d = asdict(g)
    d["strides"] = list(g.strides)
    return {"cache_format": cache_format, "codec_digest": codec_digest(model), **d}


def pick_device(name: str = "auto") -> torch.device:
    """auto: CUDA when there is one, else the CPU; a CUDA device asked for where none is, refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is available")
    return dev


def convert_official(src, dst) -> dict:
    """Official SNAC folder (config.json + pytorch_model.bin) -> model.safetensors + config.json,
    verified by reloading the written file and comparing every tensor (dtype, shape, bytes)."""
    from safetensors.torch import load_file
    src, dst = Path(src), Path(dst)
    if not (src / "pytorch_model.bin").is_file():
        raise FileNotFoundError(f"{src}: no pytorch_model.bin (official SNAC layout expected)")
    model = load_codec(src)
    original = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    save_codec(model, dst)
    written = load_file(dst / "model.safetensors")
    bad = [k for k in original if k not in written or written[k].dtype != original[k].dtype
           or written[k].shape != original[k].shape or not torch.equal(written[k], original[k])]
    extra = sorted(set(written) - set(original))
    if bad or extra:
        raise RuntimeError(f"round trip failed: {len(bad)} tensors differ ({bad[:5]}), extra {extra[:5]}")
    return {"tensors": len(original), "digest": state_digest(original), "out": str(dst)}
