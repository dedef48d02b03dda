"""Codec families behind one seam: one module per family (snac.py, mimi.py), the interface in
base.py. This module tells a folder's (or a config's) family and dispatches to it; the rest of the
package goes through these functions and the objects they return, never a family's internals.

Which family a codec folder holds is told by its config.json: transformers' `model_type` (Mimi:
"mimi"), or SNAC's constructor keys (SNAC's own config.json has no model_type). Importing this
package stays cheap: a family's module (and its dependency: transformers for Mimi, seconds to
import) is imported only when a codec of that family is used.

`n_q`: the number of codebooks used, the first n_q (Mimi: up to its 32, the TTS systems emit 8 to
32; SNAC: all of them, None or their number). It is part of the geometry and the fingerprint.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from ...settings import TRAIN_DEFAULTS

FAMILIES = ("snac", "mimi")


def family(name: str):
    """The family module by name (imported on first use)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown codec family {name!r} (known: {', '.join(FAMILIES)})")
    return importlib.import_module(f".{name}", __name__)


def family_of_config(cfg: dict) -> str:
    """'mimi' or 'snac', from a codec's config.json contents; a clear error for anything else."""
    kind = cfg.get("model_type")
    if kind == "mimi":
        return "mimi"
    if kind is None and {"sampling_rate", "encoder_rates", "vq_strides"} <= set(cfg):
        return "snac"
    raise ValueError(f"not a codec this pipeline knows (model_type {kind!r}; known: 'mimi', or a SNAC config "
                     "without model_type)")


def read_config(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"codec folder {folder} has no config.json")
    return json.loads(path.read_text())


def family_of(folder) -> str:
    """'mimi' or 'snac', from the folder's config.json."""
    try:
        return family_of_config(read_config(folder))
    except ValueError as e:
        raise ValueError(f"{Path(folder) / 'config.json'}: {e}") from None


def load(folder, n_q: int | None = None, device="cpu"):
    """The frozen codec in a folder, strictly loaded, in eval mode, on `device`."""
    return family(family_of(folder)).load_codec(folder, n_q, device)


def build(config: dict, seed: int = 0, n_q: int | None = None):
    """A codec of a config's shapes with weights from a fixed seed (demo codec, benches)."""
    return family(family_of_config(config)).build_codec(config, seed, n_q)


def shapes(name: str) -> dict:
    """A published codec's config by name (snac_24khz, snac_32khz, snac_44khz, kyutai_mimi), for
    benchmarks that need the real sizes without the weights."""
    for f in FAMILIES:
        known = family(f).SHAPES
        if name in known:
            return dict(known[name])
    raise KeyError(name)


def shape_names() -> list:
    return [n for f in FAMILIES for n in family(f).SHAPES]


def geometry(config: dict, target_rate: int, n_q: int | None = None):
    """The Geometry of a codec config at target_rate (no weights)."""
    return family(family_of_config(config)).geometry(config, target_rate, n_q)


def from_codec(codec, target_rate: int, init: str = TRAIN_DEFAULTS["init"], seed: int = TRAIN_DEFAULTS["seed"],
               interpolator: str = TRAIN_DEFAULTS["interpolator"]):
    """The 48 kHz model of a loaded codec: its weights, a new block (smart or random init)."""
    return family(codec.FAMILY).from_codec(codec, target_rate, init, seed, interpolator)


def model_from_config(config: dict, target_rate: int, n_q: int | None = None):
    """The 48 kHz model of a codec config without chosen weights (build it under
    `torch.device("meta")` for its parameter names alone)."""
    return family(family_of_config(config)).model_from_config(config, target_rate, n_q)


def load_model(path, device="cpu"):
    """A trained 48 kHz model: a folder (config.json + model.safetensors) or a final.pt file,
    strictly, frozen parts frozen, in eval mode, on `device`."""
    from .base import freeze, read_saved
    cfg, sd = read_saved(path)
    try:                        # the family from the codec config it records: only its module imported
        fam = family(family_of_config(cfg.get("codec") or {}))
    except ValueError:
        fam = None
    if fam is None or cfg.get("format") != fam.FORMAT:
        raise ValueError(f"{path}: not a 48 kHz model of this pipeline (format {cfg.get('format')!r})")
    model = fam.model_from_saved(cfg, sd)
    model.eval()
    for part in model.frozen_parts():
        freeze(part)
    return model.to(device)


def save_model(model, folder, extra_config: dict | None = None) -> Path:
    from .base import save_model as save
    return save(model, folder, extra_config)


def export_final(phase_dir, out) -> None:
    """final.pt (a torch.load(weights_only=True)-safe dict) + model.safetensors + config.json."""
    import torch
    model = load_model(phase_dir)
    out = Path(out)
    cfg = {**json.loads((Path(phase_dir) / "config.json").read_text()), **model.config}   # head as loaded
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"config": cfg, "state_dict": sd}, out.with_suffix(".tmp"))
    out.with_suffix(".tmp").replace(out)
    save_model(model, out.parent, {k: v for k, v in cfg.items() if k not in model.config})
    print(f"wrote {out} and {out.parent}/model.safetensors + config.json "
          f"({sum(v.numel() for v in sd.values()) / 1e6:.2f} M parameters)")
