"""Codec families behind one seam, one module per family (`mimi`; SNAC moves here next).

Which family a codec folder holds is told by its config.json: transformers' `model_type` (Mimi:
"mimi"), or SNAC's constructor keys (SNAC's own config.json has no model_type). Importing this
package stays cheap: a family's module (and its dependency: transformers for Mimi, seconds to
import) is imported only when a folder of that family is loaded.
"""
from __future__ import annotations

import json
from pathlib import Path


def family_of(folder) -> str:
    """'mimi' or 'snac', from the folder's config.json; a clear error for anything else."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"codec folder {folder} has no config.json")
    cfg = json.loads(path.read_text())
    kind = cfg.get("model_type")
    if kind == "mimi":
        return "mimi"
    if kind is None and {"sampling_rate", "encoder_rates", "vq_strides"} <= set(cfg):
        return "snac"
    raise ValueError(f"{path}: not a codec this pipeline knows (model_type {kind!r}; "
                     "known: 'mimi', or a SNAC config without model_type)")
