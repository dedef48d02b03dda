"""The Zarr cache: one zarr-3 group per shard, written once by one Snakemake job.

Layout of `shard-NNN.zarr` (all 1-D, ragged arrays concatenated with int64 offsets):

  audio            int16  target-rate audio, each utterance zero-padded to frames*hop_target
  audio_offsets    int64  n+1
  codes_<i>        int16/int32  codebook i, frames/stride_i codes per utterance
  codes_<i>_offsets int64 n+1
  dataset_id int32, source int16 (manifest index), source_rate int32, samples int64 (true
  target-rate length), bandlimited bool, clipped int32      (the per-utterance table)
  crc_audio, crc_codes uint32  crc32 of each utterance's audio and codes, written with them
  crc_audio_chunks uint32  crc32c of each AUDIO_CHUNK of `audio`'s decoded samples, by position
  attrs: fingerprint {cache_format, codec_digest, codec_rate, target_rate, hop, hop_target,
         strides, pad_to, codebook_size, attn_window}, shard {index, count}, ids [...],
         silence_codes [one per codebook], rows (digest of the manifest rows it was built from,
         pipeline.data.manifest.rows_digest), rejects [...], stats {...}, digest

Chunking: audio uses 2^16-sample chunks (1.4 s at 48 kHz) inside 2^24-sample zarr shards
(5.8 min, 32 MiB raw), codes 2^14-frame chunks inside 2^20 shards. 1,000 hours of audio are
then about 10,000 audio shard files (not the 2.6 M files that plain 2^16 chunks would make),
while a random 4 s read touches at most 4 inner chunks. Appends are buffered to whole zarr
shards so no shard is rewritten. Codecs are spec v3 codecs (`zarr.codecs.ZstdCodec`).

A cache cannot lie (zarr returns the fill value for a chunk that is not there, silently):
  - fill values are sentinels no data takes (audio -32768: `to_int16` clips to +-32767; codes
    and offsets -1), so a read that touched a missing chunk is recognised on every read;
  - every chunk ends in a crc32c (`Crc32cCodec`; shard indexes have one too): a damaged chunk
    fails on any read, random segment reads included, at the cost of one crc per chunk read;
  - opening a shard checks that every array and every chunk file is there and that offsets and
    table agree (cheap: a stat per file), so a deleted file stops training before step 1;
  - opening recomputes the digest over everything it reads (ids, table, offsets, checksums,
    fingerprint, place in the cache, rows): an array or attribute edited, or moved from another
    shard, fails there;
  - every read is checked against where it belongs: a valid chunk copied from elsewhere passes
    its own crc32c, so each audio chunk's decoded content is also checked against the crc32c
    recorded for its position (`crc_audio_chunks`, bound to the shard by the digest). A segment
    read (training, `preload: false`) reads the whole chunks that cover it (zarr decodes whole
    chunks anyway) and checks each; a preloaded cache checks every chunk and utterance at load;
    codes are read whole into memory on first use (they are ~1/500 of the audio) and each
    utterance's crc32 verified against its offsets; whole-utterance reads (evaluation) also
    verify the audio's crc32; `verify()` (`cache-info --check`) verifies every utterance.
Every error is a `CacheError` naming the shard folder and, where there is one, the utterance.

Writers: one per shard, enforced by an flock on `<shard>.lock` (the kernel drops it when the
holder dies, so a killed job leaves no stale lock); the shard is written to `<shard>.partial`
and renamed into place after every array and, last, the attributes (fingerprint, digest) are
written. A shard is complete only when all of them are there.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
import zlib
from pathlib import Path

import google_crc32c            # zarr's own crc32c (Crc32cCodec): hardware crc32c, ~12 GB/s here
import numpy as np
import zarr
import zarr.codecs
import zarr.errors

from ..geometry import geometry_of
from ..locks import FileLock, Held

CACHE_FORMAT = 4          # 3: crc32s, crc32c chunks, sentinel fill values, shard index/count, digest;
                          # 4: per-position audio chunk checksums, the rows record, digest over all
AUDIO_CHUNK, AUDIO_SHARD = 2**16, 2**24
CODE_CHUNK, CODE_SHARD = 2**14, 2**20
TABLE = {"dataset_id": "int32", "source": "int16", "source_rate": "int32", "samples": "int64",
         "bandlimited": "bool", "clipped": "int32"}
CHECKS = {"crc_audio": "uint32", "crc_codes": "uint32"}
CHUNK_CHECKS = "crc_audio_chunks"        # uint32, one per AUDIO_CHUNK of `audio`
AUDIO_FILL, CODE_FILL, OFFSET_FILL = -32768, -1, -1     # values no written datum takes
WRITE_ALL = {"write_empty_chunks": True}   # every chunk is a file, even one equal to the fill value
# segment reads in loader workers: zarrs' Rust codec pipeline, one thread (workers are the
# parallelism); None: zarr-python's (bench train compares the two)
FAST_READS = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline", "threading.max_workers": 1}
# segment reads check each chunk against the checksum of its position; False only in
# `bench train`, which measures what that costs (BENCHMARKS.md)
CHECK_READS = True


class CacheError(RuntimeError):
    pass


def crc_audio(audio: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(audio, dtype="<i2"))


def crc_chunk(audio: np.ndarray) -> int:
    """crc32c of one chunk's int16 samples (little-endian), as recorded in crc_audio_chunks."""
    a = np.ascontiguousarray(audio, dtype="<i2")
    if a.flags.writeable:                   # google_crc32c takes read-only buffers only
        a = a.view()
        a.flags.writeable = False
    return google_crc32c.value(a)


def chunk_crcs(audio: np.ndarray) -> np.ndarray:
    """crc_chunk of each AUDIO_CHUNK of `audio`, which starts at a chunk boundary."""
    return np.fromiter((crc_chunk(audio[j:j + AUDIO_CHUNK]) for j in range(0, len(audio), AUDIO_CHUNK)),
                       dtype="uint32")


def crc_codes(codes) -> int:
    crc = 0
    for c in codes:
        crc = zlib.crc32(np.ascontiguousarray(c, dtype="<i4"), crc)
    return crc


def _compressors():
    return (zarr.codecs.ZstdCodec(level=3), zarr.codecs.Crc32cCodec())


class ShardLock(FileLock):
    """An exclusive lock on `<shard>.lock` naming the writer: a second writer fails at once naming
    the holder; a killed holder's lock vanishes with its process."""

    def __init__(self, shard):
        super().__init__(str(shard) + ".lock", unlink=True)
        try:
            self.acquire()
        except Held as e:
            raise CacheError(f"{shard}: another writer holds it ({e.holder}; lock file {self.path}); "
                             "two jobs must not write one shard") from None


class _Appender:
    """Append to a 1-D zarr array in whole-shard blocks (a partial shard is rewritten on append).
    Holds at most `block` + one utterance of data."""

    def __init__(self, arr, block: int, on_write=None):
        self.arr, self.block, self.buf, self.n, self.on_write = arr, block, [], 0, on_write

    def add(self, x: np.ndarray):
        self.buf.append(x)
        self.n += len(x)
        if self.n >= self.block:
            data = np.concatenate(self.buf)
            cut = len(data) // self.block * self.block
            self._write(data[:cut])
            self.buf, self.n = [data[cut:]], len(data) - cut

    def close(self):
        if self.n:
            self._write(np.concatenate(self.buf))
        self.buf, self.n = [], 0

    def _write(self, data: np.ndarray):
        self.arr.append(data)
        if self.on_write:
            self.on_write(data)     # starts where the previous block ended: a multiple of `block`


class ShardWriter:
    """Write shard `index` of a cache of `count` shards to `<path>.partial`, then rename it into
    place on close(). Holds the shard's lock (taken here unless given) until close() or abort().
    `silence_codes`: per codebook, the code the frozen encoder gives for silence (padding);
    `rows`: the digest of the manifest rows the shard is built from (manifest.rows_digest), which
    the workflow compares with the manifest's current rows."""

    def __init__(self, path, fingerprint: dict, silence_codes, index: int = 0, count: int = 1,
                 lock: ShardLock | None = None, rows: str | None = None):
        if not 0 <= index < count:
            raise ValueError(f"shard index {index} outside 0..{count - 1}")
        self.path = Path(path)
        self.lock = lock or ShardLock(self.path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(self.tmp, ignore_errors=True)          # leftovers of a killed writer
        self.fp, self.index, self.count, self.rows = fingerprint, index, count, rows
        self.silence = [int(c) for c in silence_codes]
        if len(self.silence) != len(fingerprint["strides"]):
            raise ValueError(f"{len(self.silence)} silence codes for {len(fingerprint['strides'])} codebooks")
        self.group = zarr.open_group(self.tmp, mode="w", zarr_format=3)
        self.code_dtype = "int16" if fingerprint["codebook_size"] <= 2**15 else "int32"

        def mk(name, dtype, chunk, shard, fill):
            return self.group.create_array(name, shape=(0,), dtype=dtype, chunks=(chunk,), shards=(shard,),
                                           compressors=_compressors(), fill_value=fill, config=WRITE_ALL)
        self.chunk_crcs = []
        self.audio = _Appender(mk("audio", "int16", AUDIO_CHUNK, AUDIO_SHARD, AUDIO_FILL), AUDIO_SHARD,
                               on_write=lambda data: self.chunk_crcs.append(chunk_crcs(data)))
        self.codes = [_Appender(mk(f"codes_{i}", self.code_dtype, CODE_CHUNK, CODE_SHARD, CODE_FILL), CODE_SHARD)
                      for i in range(len(fingerprint["strides"]))]
        self.audio_off, self.code_off = [0], [[0] for _ in self.codes]
        self.table = {k: [] for k in (*TABLE, *CHECKS)}
        self.ids = []

    def add(self, uid: str, audio: np.ndarray, codes: list, **row):
        """audio: int16 at target rate, padded to frames*hop_target; codes[i]: frames/stride_i ints."""
        frames = len(codes[-1]) * self.fp["strides"][-1]
        if len(audio) != frames * self.fp["hop_target"]:
            raise ValueError(f"{self.path}: {uid}: {len(audio)} target samples for {frames} frames")
        audio = np.asarray(audio).astype(np.int16, copy=False)
        if (audio == AUDIO_FILL).any():
            raise ValueError(f"{self.path}: {uid}: audio holds {AUDIO_FILL}, the cache's missing-chunk sentinel (clip to +-32767)")
        codes = [np.asarray(c).astype(self.code_dtype) for c in codes]
        for i, (c, s) in enumerate(zip(codes, self.fp["strides"])):
            if len(c) * s != frames:
                raise ValueError(f"{self.path}: {uid}: codebook {i} has {len(c)} frames, expected {frames // s}")
            if len(c) and (c.min() < 0 or c.max() >= self.fp["codebook_size"]):
                raise ValueError(f"{self.path}: {uid}: codebook {i} holds codes outside 0..{self.fp['codebook_size'] - 1}")
        for k, dtype in TABLE.items():      # fail here, naming the utterance, not at close()
            info = np.iinfo(dtype) if dtype != "bool" else None
            if info is not None and not info.min <= int(row[k]) <= info.max:
                raise ValueError(f"{self.path}: {uid}: {k} {row[k]} does not fit the cache's {dtype}")
        for i, c in enumerate(codes):
            self.codes[i].add(c)
            self.code_off[i].append(self.code_off[i][-1] + len(c))
        self.audio.add(audio)
        self.audio_off.append(self.audio_off[-1] + len(audio))
        self.ids.append(uid)
        for k in TABLE:
            self.table[k].append(row[k])
        self.table["crc_audio"].append(crc_audio(audio))
        self.table["crc_codes"].append(crc_codes(codes))

    def close(self, rejects: list, stats: dict) -> str:
        """Write the last blocks, the offsets, the table and, last, the attributes; rename into
        place; release the lock. Returns the shard's digest."""
        for a in (self.audio, *self.codes):
            a.close()
        g = self.group
        arrays = {"audio_offsets": np.asarray(self.audio_off, dtype="int64"),
                  **{f"codes_{i}_offsets": np.asarray(o, dtype="int64") for i, o in enumerate(self.code_off)},
                  **{k: np.asarray(v, dtype=(TABLE | CHECKS)[k]).reshape(-1) for k, v in self.table.items()},
                  CHUNK_CHECKS: np.concatenate([np.zeros(0, "uint32"), *self.chunk_crcs])}
        for name, data in arrays.items():
            g.create_array(name, data=data, compressors=_compressors(), config=WRITE_ALL,
                           fill_value=OFFSET_FILL if name.endswith("offsets") else None)
        shard = {"index": self.index, "count": self.count}
        digest = shard_digest(self.fp, shard, self.ids, self.silence, self.rows, arrays)
        g.attrs.update({"fingerprint": self.fp, "shard": shard, "ids": self.ids, "silence_codes": self.silence,
                        "rows": self.rows, "rejects": rejects, "stats": stats, "digest": digest})
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(self.tmp, self.path)
        self.lock.release()
        return digest

    def abort(self):
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.lock.release()


def shard_digest(fp, shard, ids, silence, rows, arrays: dict) -> str:
    """sha256 over what a shard holds: fingerprint, place in the cache, ids, silence codes, the
    rows it was built from, and every array but the data itself (offsets, table, per-utterance
    and per-chunk checksums: so, indirectly, all of its data, each piece bound to its place)."""
    h = hashlib.sha256(json.dumps([fp, shard, ids, silence, rows], sort_keys=True).encode())
    for k in sorted(arrays):
        a = np.asarray(arrays[k])
        h.update(k.encode() + a.dtype.str.encode() + np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class Shard:
    """Read access to one shard. `preload=True` pulls the audio into memory too (small caches).
    Opening checks completeness and structure; see the module docstring for what is verified when."""

    def __init__(self, path, preload: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CacheError(f"{self.path}: shard folder missing")
        try:
            self.group = zarr.open_group(self.path, mode="r")
            attrs = self.group.attrs.asdict()
        except Exception as e:
            raise CacheError(f"{self.path}: not a readable zarr group ({e})") from None
        if "fingerprint" not in attrs:
            raise CacheError(f"{self.path}: no fingerprint (incomplete or foreign shard)")
        self.fingerprint = attrs["fingerprint"]
        if self.fingerprint.get("cache_format") != CACHE_FORMAT:
            raise CacheError(f"{self.path}: cache format {self.fingerprint.get('cache_format')}, this code "
                             f"reads format {CACHE_FORMAT}: rebuild the cache")
        missing = [k for k in ("shard", "ids", "silence_codes", "rows", "digest") if k not in attrs]
        if missing:
            raise CacheError(f"{self.path}: incomplete shard: attributes {missing} missing")
        self.ids, self.digest, self.silence_codes = attrs["ids"], attrs["digest"], attrs["silence_codes"]
        self.rows = attrs["rows"]
        self.index, self.count = attrs["shard"]["index"], attrs["shard"]["count"]
        self.rejects, self.stats = attrs.get("rejects", []), attrs.get("stats", {})
        self.geometry = geometry_of(self.fingerprint)
        self.strides = self.fingerprint["strides"]
        with warnings.catch_warnings():
            # Snakemake's directory() outputs hold its .snakemake_timestamp file, which zarr lists as
            # a stray object: one ZarrUserWarning per shard in every training log, saying nothing
            warnings.filterwarnings("ignore", r"Object at \.snakemake_timestamp ", zarr.errors.ZarrUserWarning)
            self._arrays = dict(self.group.arrays())
        expected = ["audio", "audio_offsets", *(f"codes_{i}{s}" for i in range(len(self.strides)) for s in ("", "_offsets")),
                    *TABLE, *CHECKS, CHUNK_CHECKS]
        missing = [k for k in expected if k not in self._arrays]
        if missing:
            raise CacheError(f"{self.path}: incomplete shard: arrays {missing} missing (has a fingerprint but "
                             "not all its data: an interrupted or concurrent writer?); rebuild it")
        for name in ("audio_offsets", *(f"codes_{i}_offsets" for i in range(len(self.strides))), *TABLE, *CHECKS,
                     CHUNK_CHECKS):
            self._require_files(name)
        n = len(self.ids)
        self.audio_off = self._read("audio_offsets")
        self.code_off = [self._read(f"codes_{i}_offsets") for i in range(len(self.strides))]
        self.table = {k: self._read(k) for k in TABLE}
        self.checks = {k: self._read(k) for k in CHECKS}
        self.chunk_crcs = self._read(CHUNK_CHECKS)
        for k, v in {**self.table, **self.checks}.items():
            if len(v) != n:
                raise CacheError(f"{self.path}: {k} has {len(v)} rows for {n} utterances")
        self._check_offsets("audio_offsets", self.audio_off, self._arrays["audio"].shape[0])
        for i, off in enumerate(self.code_off):
            self._check_offsets(f"codes_{i}_offsets", off, self._arrays[f"codes_{i}"].shape[0])
            if not np.array_equal(np.diff(off) * self.strides[i], np.diff(self.code_off[-1]) * self.strides[-1]):
                raise CacheError(f"{self.path}: codes_{i}_offsets disagree with the finest codebook's")
        if not np.array_equal(np.diff(self.audio_off), np.diff(self.code_off[-1]) * self.strides[-1] * self.geometry.hop_target):
            raise CacheError(f"{self.path}: audio_offsets disagree with the codes' frames")
        if len(self.chunk_crcs) != -(-self._arrays["audio"].shape[0] // AUDIO_CHUNK):
            raise CacheError(f"{self.path}: {CHUNK_CHECKS} has {len(self.chunk_crcs)} entries for "
                             f"{self._arrays['audio'].shape[0]} audio samples; rebuild this shard")
        if self._digest() != self.digest:
            raise CacheError(f"{self.path}: digest mismatch: its ids, table, offsets or checksums are not what was "
                             "written (edited, or copied from another shard?); rebuild this shard")
        for name in ("audio", *(f"codes_{i}" for i in range(len(self.strides)))):
            self._require_files(name)
        self._audio, self._pid = self._arrays["audio"], os.getpid()
        self._codes = None
        if preload:
            self.load_audio()

    def load_audio(self) -> None:
        """Read the whole audio array into memory, each chunk verified against the checksum of
        its position (which covers every utterance's samples: their own checksums, under the same
        digest, would read them all again)."""
        audio = self._read("audio", self.audio_off)
        self._verify_chunks(audio, 0)
        self._audio = audio

    def _digest(self) -> str:
        arrays = {"audio_offsets": self.audio_off, **{f"codes_{i}_offsets": o for i, o in enumerate(self.code_off)},
                  **self.table, **self.checks, CHUNK_CHECKS: self.chunk_crcs}
        return shard_digest(self.fingerprint, {"index": self.index, "count": self.count}, self.ids,
                            self.silence_codes, self.rows, arrays)

    def __len__(self):
        return len(self.ids)

    # ---- integrity helpers ----------------------------------------------------------------------
    def _where(self, i: int) -> str:
        return f"{self.path}: utterance {self.ids[i]!r}"

    def _read(self, name: str, off=None) -> np.ndarray:
        """A whole array; when it fails and `off` gives its utterances, name the first bad one."""
        arr = self._arrays[name]
        try:
            return arr[:]
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
        for i in range(len(self) if off is not None else 0):
            try:
                arr[int(off[i]):int(off[i + 1])]
            except Exception as e:
                raise CacheError(f"{self._where(i)}: {name} unreadable ({type(e).__name__}: {e}); "
                                 "rebuild this shard") from None
        raise CacheError(f"{self.path}: array {name} unreadable ({why}); rebuild this shard")

    def _check_offsets(self, name, off, length):
        if len(off) != len(self.ids) + 1 or off[0] != 0 or off[-1] != length or (np.diff(off) < 0).any():
            raise CacheError(f"{self.path}: {name} is inconsistent (a missing or damaged chunk?); rebuild this shard")

    def _require_files(self, name: str):
        """Every chunk (or zarr shard) file an array of this length must have is there."""
        arr = self._arrays[name]
        block = (arr.shards or arr.chunks)[0]
        enc = arr.metadata.chunk_key_encoding
        keys = [enc.encode_chunk_key((k,)) for k in range(-(-arr.shape[0] // block))]
        gone = [k for k in keys if not (self.path / name / k).is_file()]
        if not gone:
            return
        k = keys.index(gone[0])
        where = ""
        if name in ("audio", *(f"codes_{i}" for i in range(len(self.strides)))):
            off = self.audio_off if name == "audio" else self.code_off[int(name.split("_")[1])]
            hit = np.nonzero((off[1:] > k * block) & (off[:-1] < (k + 1) * block))[0]
            where = f" (utterances {', '.join(repr(self.ids[j]) for j in hit[:3])}{' ...' if len(hit) > 3 else ''}: " \
                    f"{len(hit)} in all)" if len(hit) else ""
        raise CacheError(f"{self.path}: chunk file {name}/{gone[0]} is missing{where}"
                         f"{f' and {len(gone) - 1} more' if len(gone) > 1 else ''}; rebuild this shard")

    def _verify_chunks(self, block: np.ndarray, first: int, i: int | None = None):
        """`block` holds whole int16 chunks from chunk `first` on (the last may end with the
        array): each must match the checksum recorded for its position. `i`: the utterance read."""
        view = np.ascontiguousarray(block, dtype="<i2").view()
        view.flags.writeable = False                 # google_crc32c takes read-only buffers only
        for c in range(first, first + -(-len(block) // AUDIO_CHUNK)):
            lo = (c - first) * AUDIO_CHUNK
            if google_crc32c.value(view[lo:lo + AUDIO_CHUNK]) == self.chunk_crcs[c]:
                continue
            if i is None:       # name the first utterance the chunk holds
                i = int(np.searchsorted(self.audio_off, c * AUDIO_CHUNK, side="right")) - 1
            if (view[lo:lo + AUDIO_CHUNK] == AUDIO_FILL).any():
                raise CacheError(f"{self._where(i)}: audio reads as the fill value (a missing chunk); rebuild this shard")
            raise CacheError(f"{self._where(i)}: audio chunk {c} (samples {c * AUDIO_CHUNK}..{(c + 1) * AUDIO_CHUNK - 1}"
                             f" of {self.path.name}/audio) does not match the checksum recorded for its place "
                             "(moved or copied from elsewhere, or damaged); rebuild this shard")

    def _verify_audio(self, i: int, audio: np.ndarray):
        if crc_audio(audio) != self.checks["crc_audio"][i]:
            raise CacheError(f"{self._where(i)}: audio checksum mismatch (damaged data); rebuild this shard")

    @property
    def codes(self) -> list:
        """Every codebook's codes, read whole on first use and verified utterance by utterance."""
        if self._codes is None:
            codes = [self._read(f"codes_{i}", o) for i, o in enumerate(self.code_off)]
            for i in range(len(self)):
                part = [c[o[i]:o[i + 1]] for c, o in zip(codes, self.code_off)]
                if crc_codes(part) != self.checks["crc_codes"][i]:
                    gap = any((p == CODE_FILL).any() for p in part)
                    raise CacheError(f"{self._where(i)}: codes checksum mismatch "
                                     f"({'a missing chunk' if gap else 'damaged data'}); rebuild this shard")
            self._codes = codes
        return self._codes

    # ---- reads ----------------------------------------------------------------------------------
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
        codes = [c[o[i] + offset // s: o[i] + (offset + n) // s].astype(np.int64)
                 for c, o, s in zip(self.codes, self.code_off, self.strides)]
        hop_t = self.geometry.hop_target
        a0 = int(self.audio_off[i]) + offset * hop_t
        return codes, self._audio_range(i, a0, a0 + n * hop_t)

    def _audio_range(self, i: int, a0: int, a1: int) -> np.ndarray:
        """Audio samples [a0, a1) (of utterance i): in memory (verified at load), or read as the
        whole chunks that cover them, each checked against the checksum of its position."""
        if isinstance(self._audio, np.ndarray):
            return self._audio[a0:a1]
        if not CHECK_READS:
            return self._unchecked_range(i, a0, a1)
        c0 = a0 // AUDIO_CHUNK
        lo, hi = c0 * AUDIO_CHUNK, min(-(-a1 // AUDIO_CHUNK) * AUDIO_CHUNK, int(self.audio_off[-1]))
        try:
            block = np.asarray(self._reader()[lo:hi])
        except Exception as e:
            raise CacheError(f"{self._where(i)}: audio unreadable ({type(e).__name__}: {e}); rebuild this shard") from None
        self._verify_chunks(block, c0, i)            # a missing chunk (fill values) fails there too
        return block[a0 - lo:a1 - lo]

    def _unchecked_range(self, i: int, a0: int, a1: int) -> np.ndarray:
        """What reads were before format 4 (fill value checked only), for the benchmark."""
        try:
            audio = np.asarray(self._reader()[a0:a1])
        except Exception as e:
            raise CacheError(f"{self._where(i)}: audio unreadable ({type(e).__name__}: {e}); rebuild this shard") from None
        if (audio == AUDIO_FILL).any():
            raise CacheError(f"{self._where(i)}: audio reads as the fill value (a missing chunk); rebuild this shard")
        return audio

    def _reader(self):
        """The audio for reads. In a process other than the one that opened the shard (a loader
        worker) it is reopened through zarrs (`FAST_READS`: about twice zarr-python's random
        segment reads here, see BENCHMARKS.md); never in the opening process, the workers'
        parent: zarrs deadlocks in a forked child once the parent has decoded with it
        (zarrs-python issue #171)."""
        if FAST_READS and self._pid != os.getpid() and not isinstance(self._audio, np.ndarray):
            with zarr.config.set(FAST_READS):
                self._audio = zarr.open_array(self.path / "audio", mode="r")
            self._pid = os.getpid()
        return self._audio

    def utterance(self, i: int):
        """Whole utterance i (padded length), its audio verified: by its chunks' checksums as every
        read is (CHECK_READS), else by its own."""
        codes, audio = self.segment(i, 0, self.frames(i))
        if not CHECK_READS:
            self._verify_audio(i, audio)
        return codes, audio

    def verify(self, on_progress=None) -> list:
        """Check every utterance's codes and audio (the digest, offsets and chunk files were
        checked at open). Returns the problems found (empty: intact). Audio is read in blocks of
        whole zarr shards, not per utterance."""
        problems = []
        try:
            self.codes
        except CacheError as e:
            problems.append(str(e))
        i, n = 0, len(self)
        while i < n:
            j = int(np.searchsorted(self.audio_off, self.audio_off[i] + AUDIO_SHARD, side="right")) - 1
            j = min(max(j, i + 1), n)
            try:
                block = np.asarray(self._audio[int(self.audio_off[i]):int(self.audio_off[j])])
            except Exception:
                block = None            # read utterance by utterance to name the damaged ones
            for u in range(i, j):
                try:
                    if block is None:
                        self.utterance(u)
                    else:
                        self._verify_audio(u, block[self.audio_off[u] - self.audio_off[i]:
                                                    self.audio_off[u + 1] - self.audio_off[i]])
                except CacheError as e:
                    problems.append(str(e))
            if on_progress:
                on_progress(j - i)
            i = j
        return problems


def shard_paths(cache_dir) -> list:
    paths = sorted(p for p in Path(cache_dir).glob("shard-*.zarr") if p.is_dir())
    if not paths:
        raise CacheError(f"{cache_dir}: no shard-*.zarr found")
    return paths


def shard_name(index: int) -> str:
    return f"shard-{index:03d}.zarr"


def open_cache(paths, preload: bool = False, expect: dict | None = None) -> list:
    """Open shards (a cache folder or a list of shard paths); all must share one fingerprint,
    and it must equal `expect` when given (the fingerprint of the codec in use); together they
    must be the whole cache (shards 0..count-1, each once)."""
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
    check_complete(shards)
    return shards


def check_complete(shards) -> None:
    """The shards are the whole cache they record: one count, each index 0..count-1 once."""
    counts = {s.count for s in shards}
    if len(counts) > 1:
        raise CacheError("cache shards disagree on the number of shards: " + ", ".join(
            f"{s.path} says {s.count}" for s in shards) + " (leftovers of a run with another shard count?)")
    count, seen = counts.pop(), {}
    for s in shards:
        if s.index in seen:
            raise CacheError(f"{s.path} and {seen[s.index]} are both shard {s.index}")
        seen[s.index] = s.path
    gone = [k for k in range(count) if k not in seen]
    if gone:
        folder = shards[0].path.parent
        raise CacheError(f"cache {folder} is incomplete: {len(gone)} of its {count} shards missing: "
                         + ", ".join(str(folder / shard_name(k)) for k in gone[:5]) + (" ..." if len(gone) > 5 else ""))


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}={b.get(k)!r} (expected {a.get(k)!r})" for k in keys)


def cache_info(cache_dir, check: bool = False, codec=None, say=None) -> dict:
    """Shards, utterances, seconds, fingerprint, digests; with `check`, also every shard's
    `verify()` and (given the codec) the alignment checks. `problems` lists what failed;
    `say(text)` hears about each shard being checked."""
    shards = open_cache(cache_dir)
    fp = shards[0].fingerprint
    out = {"cache": str(cache_dir), "fingerprint": fp, "shards": [], "utterances": 0, "seconds": 0.0,
           "problems": []}
    if check and codec is None:
        out["note"] = "alignment checks skipped: give --codec DIR to run them"
    for s in shards:
        sec = float(s.table["samples"].sum()) / fp["target_rate"]
        row = {"path": str(s.path), "utterances": len(s), "seconds": round(sec, 3),
               "bandlimited": int(s.table["bandlimited"].sum()), "rejects": len(s.rejects), "digest": s.digest}
        if check:
            if say:
                say(f"checking {s.path} ({len(s)} utterances)")
            problems = s.verify()
            if codec is not None and not problems:
                from .alignment import check_shard, verdict
                row["alignment"] = check_shard(s, codec)
                problems += [f"{s.path}: alignment: {v}" for v in verdict(row["alignment"])]
            row["ok"] = not problems
            out["problems"] += problems
        out["shards"].append(row)
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
