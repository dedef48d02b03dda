"""Warm restart: a phase starts from weights of another run (a model folder, final.pt, a
.safetensors file or a step checkpoint), with a fresh optimizer and schedule at step 0 (exact
resume of the same run is pipeline.training.checkpoint's job)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..model.codecs.base import NEW_BLOCK, state_digest
from ..ui import console
from .groups import matches


def read_weights(path) -> dict:
    """Weights from a model folder / step checkpoint (model.safetensors), a .safetensors file, or
    a .pt/.bin file (final.pt's state_dict or a plain state dict), always weights_only, on the CPU."""
    from safetensors.torch import load_file
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                return read_weights(path / name)
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
    if path.suffix == ".safetensors":
        return load_file(path, device="cpu")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob.get("state_dict", blob)


def warm_start(model, path, groups, pf) -> str:
    """Load `path` into the model: strictly, else non-strictly with a table of missing, unexpected
    and shape-mismatched keys. Refuses tensors of the codec's frozen encoder side that differ from the
    codec's, and missing trained keys that no init covers (only the new block's come from
    `init`). Returns the digest of the weights read (part of the run's identity)."""
    from rich.table import Table
    sd, own = model.adapt_head(read_weights(path)), model.state_dict()
    mismatched = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
    unexpected = sorted(k for k in sd if k not in own)
    missing = sorted(k for k in own if k not in sd)
    changed = [k for k in sd if k.startswith(model.FROZEN) and k in own and k not in mismatched
               and not torch.equal(sd[k], own[k])]
    if changed:
        pf.fail("init_checkpoint", f"{path}: {len(changed)} tensors of the codec's encoder side differ from the "
                f"codec's (e.g. {changed[0]}): the codes would change meaning")
    trained = [g["pattern"] for g in groups if g["trainable"]]
    uncovered = [k for k in missing + mismatched if not k.startswith(NEW_BLOCK + ".") and "lora_" not in k
                 and any(matches(k, p) for p in trained)]
    if uncovered:
        head = model.head_key
        hint = (f"; its output head has {sd[head].shape[-1]} taps, this model's {own[head].shape[-1]}: smart "
                "init's `interpolator` (cubic or hold) sets them" if head in mismatched else "")
        pf.fail("init_checkpoint", f"{path} lacks {len(uncovered)} tensors this phase trains and no init "
                f"covers (e.g. {uncovered[:3]}){hint}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in mismatched}, strict=False)
    if missing or unexpected or mismatched:
        t = Table(title=f"init_checkpoint {path}: loaded non-strictly")
        for c in ("missing (kept from init)", "unexpected (ignored)", "shape mismatch (kept from init)"):
            t.add_column(c)
        cols = [missing, unexpected, [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]]
        for i in range(min(20, max(map(len, cols)))):
            t.add_row(*(c[i] if i < len(c) else "" for c in cols))
        console.print(t)
    pf.add("init_checkpoint", True, f"{path}: {'strict' if not (missing or unexpected or mismatched) else 'non-strict'}"
           f" ({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} shape-mismatched); "
           "fresh optimizer, step 0")
    return state_digest(sd)
