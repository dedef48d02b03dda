"""The library call: `pipeline.load(path)` -> a Decoder for codes held in memory.

    import pipeline
    dec = pipeline.load("results/phase11/final.pt")       # or a model folder; lora=, device=
    audio = dec.decode(codes)          # SNAC's layout: [(B, T_0), (B, T_1), ...] -> (B, 1, samples)
    s = dec.stream(batch=B)            # codes a few frames at a time -> audio as it is final
    pieces = [s.push(c) for c in chunks] + [s.flush()]

The Decoder holds the model (`dec.model`: eval mode, noise blocks as trained) and uses only what
every codec family offers (pipeline/model/codecs/base.py): `model.geometry` (rates, hop, strides,
quantum, codebook size), `model.context("decoder")` and `model.decode(codes)`. Bad codes raise the `decode` command's one-line ValueErrors
(pipeline/evaluation/codes.py). Outputs stay on the model's device.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..gpus import pick_device
from .codes import as_tensors
from .stream import Stream


class Decoder:
    def __init__(self, model):
        self.model = model
        self.geometry = model.geometry
        self.context = model.context("decoder")
        """(left, right): finest frames of codes before and after a frame that its audio depends
        on (SNAC: measured from codes to audio, a few decodes of random codes, noise off; Mimi: its
        transformer's window back, the head's look-ahead forward)."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lag_seconds(self) -> float:
        """How far a stream's audio trails its codes: the right context, in seconds."""
        return self.context[1] * self.geometry.hop / self.geometry.codec_rate

    @torch.inference_mode()
    def decode(self, codes) -> torch.Tensor:
        """One integer tensor (or array) per codebook, coarsest first, (B, T_i) or (T_i,) -> audio
        (B, 1, frames * hop_target) at the target rate, float32, on the model's device."""
        return self.model.decode(as_tensors(codes, self.geometry, self.device))

    __call__ = decode

    def stream(self, batch: int = 1) -> Stream:
        """A stream of `batch` clips decoded in step (pipeline/evaluation/stream.py)."""
        return Stream(self.model, self.context, batch)

    def __repr__(self) -> str:
        g = self.geometry
        return (f"Decoder({g.codec_rate} Hz codes -> {g.target_rate} Hz, strides {list(g.strides)}, "
                f"quantum {g.quantum} frames, codebook {g.codebook_size}, on {self.device})")


def load(path, lora=None, device="auto") -> Decoder:
    """A trained model (folder or final.pt), optionally with a LoRA adapter applied, on `device`
    ("auto": CUDA when there is one)."""
    model, _ = open_model(path, device, lora)
    return Decoder(model)


def open_model(model_path, device="auto", lora=None):
    """-> (model in eval mode, the LoRA tensors loaded); one-line errors for what cannot load."""
    from ..model.codecs import load_model
    path, dev = Path(model_path), pick_device(device)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist")
    try:
        model = load_model(path, dev)
    except (OSError, ValueError):
        raise
    except Exception as e:   # unpickling, safetensors and state-dict errors come in many types
        raise ValueError(f"{path}: not a model folder or final.pt ({type(e).__name__}: {_first_line(e)})") from None
    loaded = []
    if lora:
        try:
            loaded, skipped = model.load_lora(lora)
        except (OSError, ValueError):
            raise
        except Exception as e:
            raise ValueError(f"{lora}: not a loadable LoRA file ({type(e).__name__}: {_first_line(e)})") from None
        if skipped:
            raise ValueError(f"{lora}: {len(skipped)} adapter tensors do not fit this model, e.g. {skipped[:3]}")
    return model.eval(), loaded


def _first_line(e) -> str:
    return (str(e).strip().splitlines() or [""])[0]
