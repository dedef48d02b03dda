"""The Zarr cache: one zarr-3 group per shard, written once by one Snakemake job.

Layout of `shard-NNN.zarr` (all 1-D, ragged arrays concatenated with int64 offsets):

  audio            int16  target-rate audio, each utterance zero-padded to frames*hop_target
  audio_offsets    int64  n+1
  codes_<i>        int16/int32  codebook i, frames/stride_i codes per utterance
  codes_<i>_offsets int64 n+1
  dataset_id int32, source int16 (manifest index), source_rate int32, samples int64 (true
  target-rate length), bandlimited bool, clipped int32      (the per-utterance table)
  attrs: fingerprint {cache_format, codec_digest, codec_rate, target_rate, hop, hop_target,
         strides, pad_to, codebook_size, attn_window}, ids [...], rejects [...], stats {...}

Chunking: audio uses 2^16-sample chunks (1.4 s at 48 kHz) inside 2^24-sample zarr shards
(5.8 min, 32 MiB raw), codes 2^14-frame chunks inside 2^20 shards. 1,000 hours of audio are
then about 10,000 audio shard files (not the 2.6 M files that plain 2^16 chunks would make),
while a random 4 s read touches at most 4 inner chunks. Appends are buffered to whole zarr
shards so no shard is rewritten. Codecs are spec v3 codecs (`zarr.codecs.ZstdCodec`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs

from ..model.codec import geometry_of

CACHE_FORMAT = 2          # 2: the fingerprint records the attention window
AUDIO_CHUNK, AUDIO_SHARD = 2**16, 2**24
CODE_CHUNK, CODE_SHARD = 2**14, 2**20
TABLE = {"dataset_id": "int32", "source": "int16", "source_rate": "int32", "samples": "int64",
         "bandlimited": "bool", "clipped": "int32"}


class CacheError(Exception):
    pass


class _Appender:
    """Append to a 1-D zarr array in whole-shard blocks (a partial shard is rewritten on append)."""

    def __init__(self, arr, block: int):
        self.arr, self.block, self.buf, self.n = arr, block, [], 0

    def add(self, x: np.ndarray):
        self.buf.append(x)
        self.n += len(x)
        if self.n >= self.block:
            data = np.concatenate(self.buf)
            cut = len(data) // self.block * self.block
            self.arr.append(data[:cut])
            self.buf, self.n = [data[cut:]], len(data) - cut

    def close(self):
        if self.n:
            self.arr.append(np.concatenate(self.buf))
        self.buf, self.n = [], 0


class ShardWriter:
    """Write one shard to `<path>.partial`, then rename into place on close()."""

    def __init__(self, path, fingerprint: dict):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.fp = fingerprint
        self.group = zarr.open_group(self.tmp, mode="w", zarr_format=3)
        comp = zarr.codecs.ZstdCodec(level=3)
        code_dtype = "int16" if fingerprint["codebook_size"] <= 2**15 else "int32"
        self.code_dtype = code_dtype

        def mk(name, dtype, chunk, shard):
            return self.group.create_array(name, shape=(0,), dtype=dtype, chunks=(chunk,),
                                           shards=(shard,), compressors=comp)
        self.audio = _Appender(mk("audio", "int16", AUDIO_CHUNK, AUDIO_SHARD), AUDIO_SHARD)
        self.codes = [_Appender(mk(f"codes_{i}", code_dtype, CODE_CHUNK, CODE_SHARD), CODE_SHARD)
                      for i in range(len(fingerprint["strides"]))]
        self.audio_off, self.code_off = [0], [[0] for _ in self.codes]
        self.table = {k: [] for k in TABLE}
        self.ids = []

    def add(self, uid: str, audio: np.ndarray, codes: list, **row):
        """audio: int16 at target rate, padded to frames*hop_target; codes[i]: frames/stride_i ints."""
        frames = len(codes[-1]) * self.fp["strides"][-1]
        if len(audio) != frames * self.fp["hop_target"]:
            raise ValueError(f"{uid}: {len(audio)} target samples for {frames} frames")
        for i, (c, s) in enumerate(zip(codes, self.fp["strides"])):
            if len(c) * s != frames:
                raise ValueError(f"{uid}: codebook {i} has {len(c)} frames, expected {frames // s}")
            self.codes[i].add(np.asarray(c).astype(self.code_dtype))
            self.code_off[i].append(self.code_off[i][-1] + len(c))
        self.audio.add(audio.astype(np.int16, copy=False))
        self.audio_off.append(self.audio_off[-1] + len(audio))
        self.ids.append(uid)
        for k in TABLE:
            self.table[k].append(row[k])

    def close(self, rejects: list, stats: dict):
        for a in (self.audio, *self.codes):
            a.close()
        g = self.group
        g.create_array("audio_offsets", data=np.asarray(self.audio_off, dtype="int64"))
        for i, off in enumerate(self.code_off):
            g.create_array(f"codes_{i}_offsets", data=np.asarray(off, dtype="int64"))
        for k, dt in TABLE.items():
            g.create_array(k, data=np.asarray(self.table[k], dtype=dt).reshape(-1))
        g.attrs.update({"fingerprint": self.fp, "ids": self.ids, "rejects": rejects, "stats": stats})
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(self.tmp, self.path)


class Shard:
    """Read access to one shard. `preload=True` pulls every array into memory (small caches)."""

    def __init__(self, path, preload: bool = False):
        self.path = Path(path)
        try:
            self.group = zarr.open_group(self.path, mode="r")
        except Exception as e:
            raise CacheError(f"{self.path}: not a readable zarr group ({e})") from None
        attrs = self.group.attrs.asdict()
        if "fingerprint" not in attrs:
            raise CacheError(f"{self.path}: no fingerprint (incomplete or foreign shard)")
        self.fingerprint, self.ids = attrs["fingerprint"], attrs["ids"]
        self.rejects, self.stats = attrs.get("rejects", []), attrs.get("stats", {})
        g = self.group
        self.audio_off = g["audio_offsets"][:]
        self.geometry = geometry_of(self.fingerprint)
        self.strides = self.fingerprint["strides"]
        self.code_off = [g[f"codes_{i}_offsets"][:] for i in range(len(self.strides))]
        self.table = {k: g[k][:] for k in TABLE}
        self._audio = g["audio"][:] if preload else g["audio"]
        self._codes = [g[f"codes_{i}"][:] if preload else g[f"codes_{i}"]
                       for i in range(len(self.strides))]

    def __len__(self):
        return len(self.ids)

    def frames(self, i: int) -> int:
        """Finest-codebook frames of utterance i (padded length)."""
        return int(self.code_off[-1][i + 1] - self.code_off[-1][i]) * self.strides[-1]

    def segment(self, i: int, offset: int, n: int):
        """Codes and target audio of utterance i for finest frames [offset, offset + n).

        offset and n must be multiples of the coarsest stride. Codebook j gets codes
        [offset/s_j, (offset+n)/s_j); audio gets samples [offset*hop_t, (offset+n)*hop_t)."""
        coarse = max(self.strides)
        if offset % coarse or n % coarse:
            raise ValueError(f"segment ({offset}, {n}) not aligned to the coarsest stride {coarse}")
        if offset < 0 or offset + n > self.frames(i):
            raise ValueError(f"segment ({offset}, {n}) outside utterance of {self.frames(i)} frames")
        codes = [np.asarray(c[o[i] + offset // s: o[i] + (offset + n) // s], dtype=np.int64)
                 for c, o, s in zip(self._codes, self.code_off, self.strides)]
        hop_t = self.fingerprint["hop_target"]
        a0 = self.audio_off[i] + offset * hop_t
        audio = np.asarray(self._audio[a0: a0 + n * hop_t])
        return codes, audio

    def utterance(self, i: int):
        return self.segment(i, 0, self.frames(i))


def shard_paths(cache_dir) -> list:
    paths = sorted(p for p in Path(cache_dir).glob("shard-*.zarr") if p.is_dir())
    if not paths:
        raise CacheError(f"{cache_dir}: no shard-*.zarr found")
    return paths


def open_cache(paths, preload: bool = False, expect: dict | None = None) -> list:
    """Open shards (a cache folder or a list of shard paths); all must share one fingerprint,
    and it must equal `expect` when given (the fingerprint of the codec in use)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = shard_paths(paths)
    shards = [Shard(p, preload) for p in paths]
    ref = shards[0].fingerprint
    for s in shards[1:]:
        if s.fingerprint != ref:
            raise CacheError(f"cache shards disagree: {s.path} has {_diff(ref, s.fingerprint)} "
                             f"compared with {shards[0].path}")
    if expect is not None and expect != ref:
        raise CacheError(f"cache {shards[0].path.parent} was built for another codec or rates: "
                         f"{_diff(expect, ref)} (rebuild it with this codec)")
    return shards


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}={b.get(k)!r} (expected {a.get(k)!r})" for k in keys)


def cache_info(cache_dir) -> dict:
    shards = open_cache(cache_dir)
    fp = shards[0].fingerprint
    out = {"cache": str(cache_dir), "fingerprint": fp, "shards": [], "utterances": 0, "seconds": 0.0}
    for s in shards:
        sec = float(s.table["samples"].sum()) / fp["target_rate"]
        out["shards"].append({"path": str(s.path), "utterances": len(s), "seconds": round(sec, 3),
                              "bandlimited": int(s.table["bandlimited"].sum()),
                              "rejects": len(s.rejects)})
        out["utterances"] += len(s)
        out["seconds"] += sec
    out["seconds"] = round(out["seconds"], 3)
    return out


def dump_json(obj, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
