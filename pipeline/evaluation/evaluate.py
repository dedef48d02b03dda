"""Held-out evaluation: the 24 kHz codec's own decode (upsampled with soxr) as the baseline, and
each 48 kHz stage, on whole held-out utterances, noise blocks off, against the cached targets."""
from __future__ import annotations


import numpy as np
import torch

from ..data import audio as A
from ..data.cache import CACHE_FORMAT, dump_json, open_cache, Shard
from ..model.codec import fingerprint, load_codec, noise_disabled, pick_device
from .metrics import evaluate_pair
from ..model.snac48 import load_model
from ..ui import console

METRICS = ("mrstft", "mel_l1", "lsd_db", "lsd_hf_db", "si_sdr_db")


@torch.inference_mode()
def evaluate(codec_dir, heldout_paths, models: dict, out, settings: dict | None = None) -> dict:
    s = {"n_ffts": [1024, 2048, 4096, 8192], "max_seconds": 600.0, "device": "auto", **(settings or {})}
    device = pick_device(s["device"])
    codec = load_codec(codec_dir, device)
    target_rate = Shard(heldout_paths[0]).fingerprint["target_rate"]
    fp = fingerprint(codec, target_rate, CACHE_FORMAT)
    shards = open_cache(heldout_paths, expect=fp)
    hf_band = (fp["codec_rate"] / 2, target_rate / 2)     # the band only the new decoder can fill
    decoders = {"baseline": None, **{n: load_model(p, device) for n, p in models.items()}}
    sums = {n: {m: 0.0 for m in METRICS} for n in decoders}
    count, seconds = 0, 0.0
    for sh in shards:
        for i in range(len(sh)):
            codes, audio = sh.utterance(i)
            n = int(sh.table["samples"][i])
            target = torch.from_numpy(audio[:n].astype(np.float32) / 32768.0)
            codes_t = [torch.from_numpy(c)[None].to(device) for c in codes]
            for name, model in decoders.items():
                with noise_disabled(model or codec):
                    if model is None:
                        y24 = codec.decode(codes_t)[0, 0].float().cpu().numpy()
                        pred = torch.from_numpy(A.resample(y24, fp["codec_rate"], target_rate))
                    else:
                        pred = model.decode(codes_t)[0, 0].float().cpu()
                pred = torch.nn.functional.pad(pred[:n], (0, max(0, n - len(pred))))
                r = evaluate_pair(pred, target, target_rate, n_ffts=s["n_ffts"], hf_band=hf_band)
                for m in METRICS:
                    sums[name][m] += r[m]
            count += 1
            seconds += n / target_rate
            if seconds >= s["max_seconds"]:
                break
    if not count:
        raise RuntimeError("the held-out cache holds no utterance to evaluate")
    result = {"utterances": count, "seconds": round(seconds, 2), "target_rate": target_rate,
              "hf_band_hz": list(hf_band),
              "models": {n: {m: round(v / count, 4) for m, v in d.items()} for n, d in sums.items()}}
    dump_json(result, out)
    print_table(result)
    return result


def print_table(result: dict) -> None:
    from rich.table import Table
    t = Table(title=f"held-out evaluation: {result['utterances']} utterances, {result['seconds']} s "
                    f"(lsd_hf: {result['hf_band_hz'][0] / 1000:g}-{result['hf_band_hz'][1] / 1000:g} kHz)")
    t.add_column("model")
    for m in METRICS:
        t.add_column(m + (" ↑" if m == "si_sdr_db" else " ↓"), justify="right")
    for name, d in result["models"].items():
        t.add_row(name, *(f"{d[m]:.3f}" for m in METRICS))
    console.print(t)
