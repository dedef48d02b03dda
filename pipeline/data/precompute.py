"""Precompute: one shard job (read -> mono -> checks -> resample -> frozen encode -> zarr) and
the summary that accounts for every manifest line.

Target-rate policy for sources below the target rate (`low_rate_policy`):
  reject            (default) such sources are rejected with their rate in the reason;
  keep_bandlimited  the target is the source upsampled (no content above source_rate/2) and the
                    utterance is flagged `bandlimited` so training can exclude it;
  bwe               the target comes from an external bandwidth-extension model, a TorchScript
                    file taking codec-rate audio (1, 1, T) and returning target-rate audio
                    (1, 1, T * target_rate / codec_rate).

A shard job streams: rows are read, encoded and appended a window at a time, so its memory is
bounded whatever the number of rows, by about
    window_seconds * (codec_rate + target_rate) * 4 bytes * 2    (float32 window, resampled copies)
  + the encoder's activations for one batch of batch_seconds
  + AUDIO_SHARD * 2 bytes * 3 (the audio appender's block and its concatenation) + codes alike
  + ~200 bytes per row (manifest row, id, offsets, table)
i.e. about 0.5 GB + the encoder's batch at the defaults (600 s window), for 15,000 rows as for
150, never the shard's audio. Progress: a rich bar on a terminal; in a log file a line every
PIPELINE_PROGRESS_SECONDS (default 30) seconds. A killed shard job leaves `<shard>.partial`
(and a `<shard>.lock` no process holds any more): the rerun takes the lock, deletes the leftover
and writes the shard from the start, the same bytes as an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import audio as A
from .cache import CACHE_FORMAT, ShardLock, ShardWriter, Shard, dump_json
from .manifest import as_paths, parse_manifest, rows_digest, shard_rows
from ..ui import console, progress

from ..settings import PRECOMPUTE_DEFAULTS as DEFAULTS

POLICIES = ("reject", "keep_bandlimited", "bwe")
STAGES = ("read", "resample", "encode", "write")


def settings_with_defaults(settings: dict | None) -> dict:
    s = {**DEFAULTS, **(settings or {})}
    unknown = set(s) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown precompute settings: {sorted(unknown)}")
    if s["low_rate_policy"] not in POLICIES:
        raise ValueError(f"low_rate_policy must be one of {POLICIES}, got {s['low_rate_policy']!r}")
    if s["low_rate_policy"] == "bwe" and not s["bwe_model"]:
        raise ValueError("low_rate_policy 'bwe' needs bwe_model: a TorchScript file")
    return s


class Preparer:
    """Turns one manifest row into codec-rate input and target-rate audio, or raises AudioError."""

    def __init__(self, geo, s: dict, clock: dict | None = None):
        self.geo, self.s, self.clock = geo, s, clock if clock is not None else dict.fromkeys(STAGES, 0.0)
        self.bwe = torch.jit.load(s["bwe_model"], map_location="cpu").eval() if s["low_rate_policy"] == "bwe" else None

    def __call__(self, row):
        t0 = time.perf_counter()
        x, sr = A.read_mono(row.audio)
        t1 = time.perf_counter()
        self.clock["read"] += t1 - t0
        try:
            return self._convert(row, x, sr)
        finally:
            self.clock["resample"] += time.perf_counter() - t1     # bandwidth extension included

    def _convert(self, row, x, sr):
        if len(x) / sr < self.s["min_seconds"]:
            raise A.AudioError(f"too short: {len(x) / sr:.3f} s < min_seconds {self.s['min_seconds']}")
        g, q = self.geo, self.s["resample_quality"]
        codec_in = A.resample(x, sr, g.codec_rate, q)
        bandlimited = False
        if sr >= g.target_rate:
            target = A.resample(x, sr, g.target_rate, q)
        elif self.s["low_rate_policy"] == "reject":
            raise A.AudioError(f"source rate {sr} Hz is below the target rate {g.target_rate} Hz "
                               "(low_rate_policy: reject)")
        elif self.s["low_rate_policy"] == "keep_bandlimited":
            target, bandlimited = A.resample(x, sr, g.target_rate, q), True
        else:
            with torch.inference_mode():
                y = self.bwe(torch.from_numpy(codec_in)[None, None])
            want = len(codec_in) * g.target_rate // g.codec_rate
            if y.dim() != 3 or abs(y.shape[-1] - want) > g.target_rate // g.codec_rate:
                raise A.AudioError(f"bwe model returned shape {tuple(y.shape)}, expected (1, 1, {want})")
            target = y[0, 0].float().numpy()
        return {"id": row.id, "dataset_id": row.dataset_id, "source": row.source, "source_rate": sr, "x": codec_in,
                "target": target, "bandlimited": bandlimited, "seconds": len(x) / sr}


@torch.inference_mode()
def encode_same_length(codec, batch: np.ndarray, device) -> list:
    """Encode (B, T) codec-rate audio, T already a multiple of the codec's pad_to; returns per codebook
    an int array (B, frames_i). Equal lengths make each row's codes those of encoding it alone."""
    x = torch.from_numpy(batch).to(device)[:, None, :]
    return [c.cpu().numpy() for c in codec.encode(x)]


def encode_items(codec, geo, items: list, batch_seconds: float, device) -> None:
    """Fill item["codes"] for every item, batching utterances of equal padded length."""
    buckets = {}
    for it in items:
        buckets.setdefault(geo.frames(len(it["x"])), []).append(it)
    for frames, group in sorted(buckets.items()):
        length = frames * geo.hop
        per_batch = max(1, int(batch_seconds * geo.codec_rate // length))
        for k in range(0, len(group), per_batch):
            chunk = group[k:k + per_batch]
            batch = np.zeros((len(chunk), length), dtype=np.float32)
            for j, it in enumerate(chunk):
                batch[j, :len(it["x"])] = it["x"]
            codes = encode_same_length(codec, batch, device)
            for j, it in enumerate(chunk):
                it["codes"] = [c[j] for c in codes]


def silence_codes(codec, geo, device) -> list:
    """Per codebook, the code the frozen encoder gives in the middle of a long silence: what the
    codec itself sees past the end of an utterance (it zero-pads to pad_to), so it pads segments."""
    codes = encode_same_length(codec, np.zeros((1, 16 * geo.pad_to), dtype=np.float32), device)
    mid = 8 * geo.pad_to // geo.hop
    return [int(c[0, mid // s]) for c, s in zip(codes, geo.strides)]


def progress_seconds() -> float:
    """Seconds between progress lines when the output is a log file (PIPELINE_PROGRESS_SECONDS)."""
    return float(os.environ.get("PIPELINE_PROGRESS_SECONDS", 30))


def run_shard(manifest, shard: int, n_shards: int, codec, out, settings: dict | None = None) -> dict:
    """`manifest`: one path or a list (the same list, in the same order, for every shard).
    `codec`: the frozen codec, loaded (with codec.n_q) on the device it encodes on by the caller:
    `python -m pipeline precompute-shard` loads it from --codec (the data code imports no model
    code; it asks the codec object for its geometry, fingerprint and codes). Streams (see the
    module docstring for the memory bound); stats["stage_seconds"] has the time spent reading,
    resampling, encoding and writing."""
    manifests = as_paths(manifest)
    s = settings_with_defaults(settings)
    t0 = time.time()
    lock, writer = ShardLock(out), None    # before any work: a second writer of this shard fails here
    try:
        rows = shard_rows(parse_manifest(manifests).rows, n_shards)[shard]
        device = next(codec.parameters()).device
        geo = codec.geometry_at(s["target_rate"])
        fp = codec.fingerprint(s["target_rate"], CACHE_FORMAT)
        writer = ShardWriter(out, fp, silence_codes(codec, geo, device), shard, n_shards, lock, rows=rows_digest(rows))
        stats = _fill(writer, codec, geo, manifests, rows, shard, s, device, t0)
    except BaseException:
        writer.abort() if writer else lock.release()
        raise
    console.print(f"shard {shard:03d}: {stats['accepted']} accepted, {stats['rejected']} rejected, "
                  f"{stats['seconds_accepted']:.1f} s of audio in {stats['wall_seconds']:.1f} s on {device} ("
                  + ", ".join(f"{k} {v:.1f} s" for k, v in stats["stage_seconds"].items()) + ")")
    return stats


def _fill(writer, codec, geo, manifests, rows, shard, s, device, t0) -> dict:
    clock = dict.fromkeys(STAGES, 0.0)
    prep = Preparer(geo, s, clock)
    rejects, window, stats = [], [], {"rows": len(rows), "accepted": 0, "rejected": 0,
                                      "seconds_accepted": 0.0, "clipped_samples": 0}

    def flush():
        t = time.perf_counter()
        encode_items(codec, geo, window, s["batch_seconds"], device)
        clock["encode"] += time.perf_counter() - t
        t = time.perf_counter()
        for it in window:
            n_target = geo.frames(len(it["x"])) * geo.hop_target
            tgt, clipped = A.to_int16(it["target"][:n_target])
            audio = np.zeros(n_target, dtype=np.int16)
            audio[:len(tgt)] = tgt
            writer.add(it["id"], audio, it["codes"], dataset_id=it["dataset_id"], source=it["source"],
                       source_rate=it["source_rate"], samples=len(tgt),
                       bandlimited=it["bandlimited"], clipped=clipped)
            stats["accepted"] += 1
            stats["seconds_accepted"] += it["seconds"]
            stats["clipped_samples"] += clipped
        window.clear()
        clock["write"] += time.perf_counter() - t

    last_line, every = time.time(), progress_seconds()
    with progress() as bar:
        task = bar.add_task(f"shard {shard:03d}", total=len(rows))
        for n, row in enumerate(rows, start=1):
            try:
                window.append(prep(row))
            except A.AudioError as e:
                rejects.append({"manifest": manifests[row.source], "line": row.line, "id": row.id,
                                "audio": row.audio, "reason": str(e)})
            if sum(len(it["x"]) for it in window) >= s["window_seconds"] * geo.codec_rate:
                flush()
            bar.advance(task)
            if not console.is_terminal and time.time() - last_line >= every:   # a log file, not a terminal
                console.print(f"shard {shard:03d}: {n}/{len(rows)} rows read, {stats['accepted']} encoded, "
                              f"{time.time() - t0:.0f} s")
                last_line = time.time()
        flush()
    stats["rejected"] = len(rejects)
    stats["seconds_accepted"] = round(stats["seconds_accepted"], 3)
    t = time.perf_counter()
    stats["stage_seconds"] = {k: round(v, 3) for k, v in clock.items()}
    stats["wall_seconds"] = round(time.time() - t0, 2)
    writer.close(rejects, stats)
    stats["stage_seconds"]["write"] = round(clock["write"] + time.perf_counter() - t, 3)   # + closing
    return stats


def summarize(manifest, shard_dirs, out_dir) -> dict:
    """Account for every manifest line: accepted into one shard, or rejected with a reason."""
    manifests = as_paths(manifest)
    parsed = parse_manifest(manifests)
    rejects = list(parsed.rejects)
    accepted, seconds, per_shard, seen, split = 0, 0.0, [], {}, {}
    for p in shard_dirs:
        sh = Shard(p)
        if sh.count not in split:
            split[sh.count] = [rows_digest(r) for r in shard_rows(parsed.rows, sh.count)]
        if sh.rows != split[sh.count][sh.index]:
            raise RuntimeError(f"{p} was built from other manifest rows than the current ones (restored from a "
                               "backup, or copied from another tree?): delete it and rerun to rebuild it")
        rejects += sh.rejects
        for uid in sh.ids:
            if uid in seen:
                raise RuntimeError(f"id {uid!r} cached in both {seen[uid]} and {p}")
            seen[uid] = p
        accepted += len(sh)
        seconds += sh.stats.get("seconds_accepted", 0.0)
        per_shard.append({"shard": Path(p).name, "accepted": len(sh), "rejected": len(sh.rejects),
                          "seconds": sh.stats.get("seconds_accepted", 0.0)})
    rejects.sort(key=lambda r: (manifests.index(r["manifest"]), r["line"]))
    summary = {"manifest": manifests[0] if len(manifests) == 1 else manifests,
               "lines": parsed.lines, "blank_lines": parsed.blank,
               "accepted": accepted, "rejected": len(rejects), "seconds_accepted": round(seconds, 3),
               "shards": per_shard, "reasons": _reason_counts(rejects)}
    if accepted + len(rejects) != parsed.lines:
        raise RuntimeError(f"lines do not add up: {parsed.lines} lines, {accepted} accepted, "
                           f"{len(rejects)} rejected (was the manifest edited during the run?)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "rejects.jsonl", "w") as f:
        for r in rejects:
            f.write(json.dumps(r) + "\n")
    dump_json(summary, out_dir / "summary.json")
    _print_summary(summary)
    return summary


def _reason_counts(rejects) -> dict:
    out = {}
    for r in rejects:
        key = r["reason"].split(":")[0]
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _print_summary(s: dict) -> None:
    from rich.table import Table
    t = Table(title=f"precompute: {s['manifest']}")
    for c in ("shard", "accepted", "rejected", "seconds"):
        t.add_column(c, justify="right")
    for r in s["shards"]:
        t.add_row(r["shard"], str(r["accepted"]), str(r["rejected"]), f"{r['seconds']:.1f}")
    t.add_row("manifest-level", "", str(s["rejected"] - sum(r["rejected"] for r in s["shards"])), "")
    t.add_row("[b]total", f"[b]{s['accepted']}", f"[b]{s['rejected']}", f"[b]{s['seconds_accepted']:.1f}")
    console.print(t)
    console.print(f"{s['lines']} lines = {s['accepted']} accepted + {s['rejected']} rejected")
    for reason, n in s["reasons"].items():
        console.print(f"  rejected {n:>5}  {reason}")
