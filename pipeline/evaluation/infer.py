"""Inference with a trained 48 kHz model: resynthesis of any audio file, and decoding of codes."""
from __future__ import annotations

import numpy as np
import torch

from ..data import audio as A
from ..model.codec import pick_device
from ..model.snac48 import load_model
from ..ui import console


@torch.inference_mode()
def resynth(model_path, src, dst, device="auto", lora=None) -> None:
    """Any audio file -> codec rate -> frozen encoder -> codes -> new decoder -> target-rate WAV,
    optionally through a LoRA adapter (lora_weights.safetensors) applied on top of the model."""
    dev = pick_device(device)
    model = load_model(model_path, dev)
    if lora:
        loaded, skipped = model.load_lora(lora)
        if skipped:
            raise ValueError(f"{lora}: {len(skipped)} adapter tensors do not fit this model, e.g. {skipped[:3]}")
        console.print(f"LoRA {lora}: {len(loaded)} tensors")
    g = model.geometry
    x, sr = A.read_mono(src)
    x = A.resample(x, sr, g.codec_rate)
    codes = model.encode(torch.from_numpy(x)[None, None].to(dev))
    y = model.decode(codes)[0, 0].float().cpu().numpy()[: len(x) * g.target_rate // g.codec_rate]
    A.write_wav(dst, np.clip(y, -1, 1), g.target_rate)
    console.print(f"{src} ({sr} Hz, {len(x) / g.codec_rate:.2f} s) -> {dst} ({g.target_rate} Hz)")


@torch.inference_mode()
def decode(model_path, codes_path, dst, device="auto") -> None:
    """Codes saved with numpy.savez as one int array per codebook (coarsest first, SNAC's order;
    keys sorted naturally: codes_0, codes_1, ... or arr_0, arr_1, ...) -> target-rate WAV."""
    dev = pick_device(device)
    model = load_model(model_path, dev)
    g = model.geometry
    with np.load(codes_path) as z:
        keys = sorted(z.files, key=lambda k: (len(k), k))
        arrays = [np.asarray(z[k]).reshape(-1) for k in keys]
    if len(arrays) != g.n_codebooks:
        raise ValueError(f"{codes_path}: {len(arrays)} arrays, the codec has {g.n_codebooks} codebooks")
    frames = {len(a) * s for a, s in zip(arrays, g.strides)}
    if len(frames) != 1:
        raise ValueError(f"{codes_path}: lengths {[len(a) for a in arrays]} do not fit strides {g.strides}")
    if any(a.min() < 0 or a.max() >= g.codebook_size for a in arrays):
        raise ValueError(f"{codes_path}: codes outside [0, {g.codebook_size})")
    codes = [torch.from_numpy(a.astype(np.int64))[None].to(dev) for a in arrays]
    y = model.decode(codes)[0, 0].float().cpu().numpy()
    A.write_wav(dst, np.clip(y, -1, 1), g.target_rate)
    console.print(f"{codes_path}: {frames.pop()} frames -> {dst} ({len(y) / g.target_rate:.2f} s at {g.target_rate} Hz)")
