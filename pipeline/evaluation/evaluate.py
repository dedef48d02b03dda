"""Held-out evaluation: the codec's own decode (upsampled with soxr) as the baseline, and each
target-rate stage, on whole held-out utterances, noise blocks off, against the cached targets.

Writes, for `out` = ``.../eval.json``:

* ``eval.json`` -- per model and metric the mean over utterances (``models``), its spread
  (``spread``: std and a 95 % bootstrap interval) and the paired difference to the baseline
  (``vs_baseline``: mean and 95 % bootstrap interval of model minus baseline, utterance by
  utterance), plus the bands, floor and budget used;
* ``eval_utterances.jsonl`` -- one line per (utterance, model) with every metric, null where it
  does not apply (``missing``);
* ``eval_clips/`` -- the first ``report_clips`` utterances (at most ``report_seconds`` each) as
  FLAC for target and every model, and ``index.json``: what the report plays and draws.

Evaluation stops once ``max_seconds`` of held-out audio are done, across shards: a held-out
manifest of thousands of utterances costs what the budget says.

A metric that does not apply to an utterance (ViSQOL on a clip shorter than its patch, about
1 s of audio; an LSD band without an STFT bin) is missing for it: null in ``eval_utterances.jsonl``,
counted per model and metric in ``eval.json`` (``missing``) and the tables, left out of that
metric's mean (paired differences use the utterances where both have it). A failed evaluation
leaves no temporary file behind.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..data import audio as A
from ..data.cache import CACHE_FORMAT, dump_json, open_cache, Shard
from ..gpus import pick_device
from ..model import codecs
from ..settings import EVAL_DEFAULTS
from ..ui import console, progress
from ..training.metrics import BETTER, evaluate_pair, summarize

def metric_names(settings: dict) -> tuple:
    return tuple(m for m in BETTER if m != "visqol" or settings["visqol"])


def outputs(out) -> tuple[Path, Path, Path]:
    """eval.json -> (eval.json, eval_utterances.jsonl, eval_clips/) beside it."""
    out = Path(out)
    return out, out.with_name(f"{out.stem}_utterances.jsonl"), out.with_name(f"{out.stem}_clips")


def select(shards, max_seconds: float, rate: int) -> list:
    """(shard, index) of the utterances to evaluate, in cache order, until max_seconds of audio
    are reached (the utterance that crosses the budget is the last one), across all shards."""
    todo, seconds = [], 0.0
    for sh in shards:
        for i, n in enumerate(sh.table["samples"]):
            if seconds >= max_seconds:
                return todo
            todo.append((sh, i))
            seconds += int(n) / rate
    return todo


@torch.inference_mode()
def evaluate(codec_dir, heldout_paths, models: dict, out, settings: dict | None = None,
             target_rate: int | None = None) -> dict:
    """target_rate: the configured codec.target_rate, which the held-out cache must hold (None:
    whatever it holds); every model must decode at the cache's rate."""
    s = {**EVAL_DEFAULTS, **(settings or {})}
    device = pick_device(s["device"])
    recorded = Shard(heldout_paths[0]).fingerprint
    codec = codecs.load(codec_dir, recorded.get("n_q"), device)      # n_q: as the cache was built (codec.n_q)
    target_rate = target_rate or recorded["target_rate"]
    fp = codec.fingerprint(target_rate, CACHE_FORMAT)
    shards = open_cache(heldout_paths, expect=fp)
    split = fp["codec_rate"] / 2              # codec Nyquist: above it only the new decoder adds content
    decoders = {"baseline": None, **{n: codecs.load_model(p, device) for n, p in models.items()}}
    for name, model in decoders.items():
        if model is not None and model.target_rate != target_rate:
            raise ValueError(f"model {name} ({models[name]}) decodes at {model.target_rate} Hz, but the held-out "
                             f"cache holds {target_rate} Hz targets")
    names = metric_names(s)
    todo = select(shards, s["max_seconds"], target_rate)
    if not todo:
        raise RuntimeError("the held-out cache holds no utterance to evaluate")
    total = sum(len(sh) for sh in shards)
    budget_s = sum(int(sh.table["samples"][i]) for sh, i in todo) / target_rate
    console.print(f"evaluating {len(todo)} of {total} held-out utterances ({budget_s:.1f} s, "
                  f"eval.max_seconds {s['max_seconds']:g}) x {len(decoders)} models")

    out, utt_path, clip_dir = outputs(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clips = []
    clip_dir.mkdir(parents=True, exist_ok=True)
    values = {n: {m: [] for m in names} for n in decoders}        # None where missing
    missing = {}
    t0 = time.time()
    tmp = utt_path.with_name(utt_path.name + ".tmp")
    try:
        _score(todo, decoders, codec, fp, target_rate, split, s, names, tmp, values, missing, clips, clip_dir,
               device, t0, budget_s)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, utt_path)
    dump_json({"rate": target_rate, "codec_nyquist_hz": split, "models": list(decoders), "clips": clips},
              clip_dir / "index.json")

    boot = dict(n_boot=s["bootstrap"], seed=0)
    result = {
        "utterances": len(todo), "seconds": round(budget_s, 2), "heldout_utterances": total,
        "max_seconds": s["max_seconds"], "target_rate": target_rate, "codec_rate": fp["codec_rate"],
        "bands_hz": {"lsd_db": [0, target_rate / 2], "lsd_lo_db": [0, split], "lsd_hi_db": [split, target_rate / 2]},
        "lsd_floor_db": s["lsd_floor_db"], "better": {m: BETTER[m] for m in names},
        "visqol": visqol_note(s["visqol"]),
        "per_utterance": utt_path.name,
        "models": {}, "spread": {}, "vs_baseline": {}, "missing": missing,
    }
    for name, d in values.items():
        stats = {m: _summary([x for x in v if x is not None], boot) for m, v in d.items()}
        result["models"][name] = {m: st and round(st["mean"], 4) for m, st in stats.items()}
        result["spread"][name] = {m: st and {"std": round(st["std"], 4), "ci95": [round(c, 4) for c in st["ci95"]]}
                                  for m, st in stats.items()}
        if name != "baseline":
            result["vs_baseline"][name] = {}
            for m, v in d.items():
                pairs = [a - b for a, b in zip(v, values["baseline"][m]) if a is not None and b is not None]
                st = _summary(pairs, boot)
                result["vs_baseline"][name][m] = st and {"diff": round(st["mean"], 4),
                                                         "ci95": [round(c, 4) for c in st["ci95"]]}
    dump_json(result, out)
    print_table(result)
    return result


def _summary(values: list, boot: dict) -> dict | None:
    """summarize(), or None when every utterance misses the metric."""
    return summarize(values, **boot) if values else None


MISSING_SHOWN = 5         # missing metrics named in the log; the rest are counted


def _score(todo, decoders, codec, fp, target_rate, split, s, names, tmp, values, missing, clips, clip_dir,
           device, t0, budget_s) -> None:
    """Decode and score every selected utterance with every model into `values` (None where a
    metric does not apply, counted in `missing`), one line each into `tmp`, clips into clip_dir."""
    last, done_s, shown = t0, 0.0, 0
    with open(tmp, "w") as f, progress() as bar:
        task = bar.add_task("evaluate", total=len(todo))
        for k, (sh, i) in enumerate(todo, start=1):
            codes, audio = sh.utterance(i)
            n = int(sh.table["samples"][i])
            target = torch.from_numpy(audio[:n].astype(np.float32) / 32768.0)
            codes_t = [torch.from_numpy(c)[None].to(device) for c in codes]
            preds = {name: decode(model, codec, codes_t, n, fp["codec_rate"], target_rate)
                     for name, model in decoders.items()}
            for name, pred in preds.items():
                notes = {}
                r = evaluate_pair(pred, target, target_rate, split, n_ffts=s["n_ffts"],
                                  floor_db=s["lsd_floor_db"], with_visqol=s["visqol"], notes=notes)
                row = {m: round(r[m], 5) if math.isfinite(r[m]) else None for m in names}
                for m in names:
                    values[name][m].append(r[m] if row[m] is not None else None)
                    if row[m] is None:
                        missing.setdefault(name, {}).setdefault(m, 0)
                        missing[name][m] += 1
                        shown += 1
                        if shown <= MISSING_SHOWN:
                            console.print(f"[yellow]evaluate: {sh.path.name} {sh.ids[i]!r} ({n / target_rate:.2f} s), "
                                          f"{name}: {m} missing ({notes.get(m, 'not a finite number')})"
                                          + (" (further ones are counted in eval.json)" if shown == MISSING_SHOWN else ""))
                f.write(json.dumps({"id": sh.ids[i], "shard": sh.path.name, "seconds": round(n / target_rate, 3),
                                    "model": name, **row}) + "\n")
            if len(clips) < s["report_clips"]:
                clips.append(save_clip(clip_dir, len(clips), sh.ids[i], target, preds, target_rate,
                                       int(s["report_seconds"] * target_rate)))
            done_s += n / target_rate
            bar.advance(task)
            if not console.is_terminal and (time.time() - last > 30 or k == len(todo)):
                el = time.time() - t0
                console.print(f"evaluate: {k}/{len(todo)} utterances, {done_s:.0f}/{budget_s:.0f} s of audio, "
                              f"{el:.0f} s elapsed, eta {el / done_s * (budget_s - done_s):.0f} s")
                last = time.time()


def visqol_note(on: bool) -> str:
    if not on:
        return "ViSQOL off (eval.visqol: false)."
    from importlib.metadata import version
    return f"visqol: ViSQOL v3 audio mode, MOS-LQO (visqol-python {version('visqol-python')})."


def decode(model, codec, codes, n: int, codec_rate: int, target_rate: int) -> torch.Tensor:
    """Target-rate float32 waveform (cpu) of `n` samples: the model's decode, or for the
    baseline (model None) the codec's own decode resampled to the target rate."""
    with (model or codec).noise_disabled():
        if model is None:
            y = codec.decode(codes)[0, 0].float().cpu().numpy()
            pred = torch.from_numpy(A.resample(y, codec_rate, target_rate))
        else:
            pred = model.decode(codes)[0, 0].float().cpu()
    return torch.nn.functional.pad(pred[:n], (0, max(0, n - len(pred))))


def save_clip(folder: Path, k: int, utt_id: str, target, preds: dict, rate: int, max_samples: int) -> dict:
    import soundfile as sf
    files = {}
    for name, x in {"target": target, **preds}.items():
        files[name] = f"clip{k:02d}-{name.replace(':', '_')}.flac"
        sf.write(folder / files[name], np.clip(x[:max_samples].numpy(), -1, 1), rate, subtype="PCM_16")
    return {"id": utt_id, "seconds": round(min(len(target), max_samples) / rate, 3), "files": files}


def print_table(result: dict) -> None:
    from rich.table import Table
    lo, hi = result["bands_hz"]["lsd_hi_db"]
    t = Table(title=f"held-out evaluation: {result['utterances']} utterances, {result['seconds']} s; "
                    f"mean [95 % bootstrap interval] (n missing: utterances the metric does not apply to); "
                    f"lsd_hi: {lo / 1000:g}-{hi / 1000:g} kHz")
    names = list(result["better"])
    missing = result.get("missing", {})
    t.add_column("model")
    for m in names:
        t.add_column(m + (" ↑" if result["better"][m] == "max" else " ↓"), justify="right")
    for name, d in result["models"].items():
        t.add_row(name, *(("-" if d[m] is None else f"{d[m]:.3f} [{result['spread'][name][m]['ci95'][0]:.2f}, "
                                                   f"{result['spread'][name][m]['ci95'][1]:.2f}]")
                          + (f" ({missing[name][m]} missing)" if missing.get(name, {}).get(m) else "")
                          for m in names))
    for name, d in result["vs_baseline"].items():
        t.add_row(f"[dim]{name} - baseline", *(fmt_diff(d[m], result["better"][m]) for m in names))
    console.print(t)


def fmt_diff(d: dict | None, better: str) -> str:
    """A paired difference with its interval, green when the whole interval is on the better side."""
    if d is None:
        return "-"
    lo, hi = d["ci95"]
    good = lo > 0 if better == "max" else hi < 0
    bad = hi < 0 if better == "max" else lo > 0
    text = f"{d['diff']:+.3f} [{lo:+.2f}, {hi:+.2f}]"
    return f"[green]{text}" if good else f"[red]{text}" if bad else text
