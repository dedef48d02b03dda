"""Manifest parsing, sharding, and the per-shard digests the Snakefile gives its shard jobs.

A manifest is JSONL, one utterance a line: `audio` (required; relative paths resolve against
the manifest's folder), optional `id` (default: the `audio` string as written), `text`,
`duration`, `dataset_id` (default 0). Several manifests can be given (each row keeps its
dataset_id and remembers its manifest as `source`, for sampling weights). Blank lines are skipped;
every other line is either a `Row` or a reject with a reason. Rows go to shards by a stable hash
of their id, so adding one utterance changes one shard.

At parse time the Snakefile needs, per shard, two short digests (Snakemake params), never the
audio files as inputs (a million declared inputs cost minutes per invocation):
  rows   changes exactly when the shard's rows do (an edited, added or removed line);
  audio  changes when one of the shard's audio files changes size or mtime, appears or vanishes.
`ShardIndex` computes them. Parsing a million rows takes seconds, so the index (each shard's
row digest and audio paths) is cached under `.snakemake/`, keyed by the manifests' bytes; the
audio files themselves are stat()ed on every use (about 3 CPU s per million files on a local
disk; BENCHMARKS.md). Each shard job parses the manifests again with `parse_manifest` and takes
its own rows.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import NamedTuple

import orjson

INDEX_FORMAT = 2     # bump when what the index holds or how its digests are computed changes (2: range checks)
INDEX_KEEP = 4       # newest cache entries kept (one per manifest version or shard count)
# what the cache stores (pipeline/data/cache.py TABLE): dataset_id int32, source (manifest index) int16
DATASET_ID_MAX = 2**31 - 1
MAX_MANIFESTS = 2**15


class Row(NamedTuple):   # a NamedTuple: a million of them are built at parse time (3x faster than a frozen dataclass)
    line: int
    id: str
    audio: str          # as resolved: manifest folder joined with the manifest's `audio`
    dataset_id: int = 0
    text: str | None = None
    duration: float | None = None
    source: int = 0     # which manifest (index in the configured list) the row comes from


_new_row = tuple.__new__     # Row(...) without the Python-level __new__ that handles defaults
_INF = float("inf")


@dataclass
class Parsed:
    rows: list
    rejects: list       # {"line", "id"?, "audio"?, "reason"}
    lines: int          # non-blank lines counted
    blank: int


def as_paths(manifest) -> list:
    """One manifest path or several -> a list of path strings."""
    return [os.fspath(manifest)] if isinstance(manifest, (str, os.PathLike)) else [os.fspath(m) for m in manifest]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def parse_manifest(paths) -> Parsed:
    """One manifest path or a list of them (rows remember their `source` index; ids must be
    unique across all of them). Rejects carry the manifest path and the line number in it."""
    paths = as_paths(paths)
    parsed = Parsed([], [], 0, 0)
    with _no_gc():
        parsed.rows = list(_iter_rows(paths, [_read(p) for p in paths], parsed))
    return parsed


@contextlib.contextmanager
def _no_gc():
    """A million rows are a million tracked objects: the cyclic GC would rescan the growing heap
    again and again (half the parse time); none of these objects can form a cycle."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _iter_rows(paths: list, datas: list, parsed: Parsed):
    """Yields the rows; counts lines and blank lines and collects the rejects into `parsed`."""
    if len(paths) > MAX_MANIFESTS:
        raise ValueError(f"{len(paths)} manifests: the cache records a row's manifest as int16, at most {MAX_MANIFESTS}")
    seen = {}         # id -> source << 40 | line of its first row
    for source, (path, data) in enumerate(zip(paths, datas)):
        resolve = _Resolver(os.path.dirname(path))
        if b"\r" in data:   # the line ends text mode knows: \r\n and a lone \r
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        for n, raw in enumerate(io.BytesIO(data), start=1):
            row, reason, extra = _parse_line(raw, n, resolve, source)
            if reason is None and row is None:
                parsed.blank += 1
                continue
            parsed.lines += 1
            if row is not None:
                first = seen.setdefault(row.id, source << 40 | n)
                if first == source << 40 | n:
                    yield row
                    continue
                extra = _extra(_loads_any(raw))
                reason = f"duplicate id (first in {paths[first >> 40]} line {first & (1 << 40) - 1})"
            parsed.rejects.append({"manifest": path, "line": n, **extra, "reason": reason})


def _loads_any(raw: bytes):
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw.decode("utf-8", errors="replace"))


def _parse_line(raw: bytes, n: int, resolve, source: int = 0):
    """-> (Row, None, {}), (None, reason, extra) or (None, None, {}) for a blank line.

    orjson parses a million lines in about a second; the standard library (8x slower) decides
    whatever orjson refuses or reads differently (NaN, invalid UTF-8, lone surrogates, integers
    beyond 64 bits, which orjson turns into floats), so every line means what it always meant."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        obj = None
    else:
        row = _row(obj, n, resolve, source)
        if row is not None and (row.duration.__class__ is not float or -9e18 < row.duration < 9e18):
            return row, None, {}
    text = raw.decode("utf-8", errors="replace")    # undecodable bytes replaced, as always
    if not text.strip():
        return None, None, {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg} at column {e.colno}", {}
    row = _row(obj, n, resolve, source)
    if row is not None:
        return row, None, {}
    if not isinstance(obj, dict):
        return None, f"a line must be a JSON object, got {type(obj).__name__}", {}
    audio = obj.get("audio")
    uid = obj.get("id", audio)
    ds = obj.get("dataset_id", 0)
    if not isinstance(audio, str) or not audio.strip():
        reason = "missing `audio`" if audio is None else "`audio` must be a non-empty string"
    elif not isinstance(uid, str) or not uid:
        reason = "`id` must be a non-empty string"
    elif type(ds) is not int or not 0 <= ds <= DATASET_ID_MAX:
        reason = f"`dataset_id` must be an integer in 0..{DATASET_ID_MAX} (the cache stores int32)"
    else:
        reason = "`duration` must be a finite number >= 0 (seconds)"
    return None, reason, _extra(obj)


def _row(obj, n: int, resolve, source: int):
    """The Row of a parsed line, or None if the line is to be rejected (`_parse_line` says why)."""
    if obj.__class__ is not dict:
        return None
    audio = obj.get("audio")
    uid = obj.get("id", audio)
    ds = obj.get("dataset_id", 0)
    duration = obj.get("duration")
    if (audio.__class__ is not str or not audio.strip() or uid.__class__ is not str or not uid
            or ds.__class__ is not int or ds < 0 or ds > DATASET_ID_MAX
            or (duration is not None and ((duration.__class__ is not float and duration.__class__ is not int)
                                          or not 0 <= duration < _INF))):       # NaN fails too
        return None
    text = obj.get("text")
    return _new_row(Row, (n, uid, resolve(audio), ds, text if text.__class__ is str else None, duration, source))


def _extra(obj: dict) -> dict:
    """What a reject shows of its line: `id` and `audio` as written, where they are strings."""
    return {k: obj[k] for k in ("id", "audio") if isinstance(obj.get(k), str)}


class _Resolver:
    """os.path.normpath(os.path.join(base, os.path.expanduser(audio))), with the folder part
    normalized once per folder: the rows of a corpus share a few thousand folders."""

    def __init__(self, base: str):
        self.base, self.dirs = base, {}

    def __call__(self, audio: str) -> str:
        cut = audio.rfind("/") + 1
        name = audio[cut:]
        if name in ("", ".", "..") or audio[0] == "~":
            return os.path.normpath(os.path.join(self.base, os.path.expanduser(audio)))
        folder = audio[:cut]
        d = self.dirs.get(folder)
        if d is None:
            # normpath(join(base, folder + name)) == normpath(join(base, folder)) + "/" + name
            # for a plain final component; "." and a root ("/", "//") are the special cases
            d = os.path.normpath(os.path.join(self.base, folder or "."))
            d = "" if d == "." else d if d.endswith("/") else d + "/"
            self.dirs[folder] = d
        return d + name


def shard_of(uid: str, n_shards: int) -> int:
    """The shard an utterance id belongs to (stable across manifests and runs)."""
    return int.from_bytes(hashlib.sha1(uid.encode("utf-8")).digest()[:8], "big") % n_shards


def shard_rows(rows, n_shards: int) -> list:
    out = [[] for _ in range(n_shards)]
    for r in rows:
        out[shard_of(r.id, n_shards)].append(r)
    return out


def rows_digest(rows) -> str:
    """Digest of a shard's rows, for Snakemake params: changes exactly when the shard's lines do
    (moving a line within the manifest changes nothing cached, so the line number is left out)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(_row_bytes(r))
    return h.hexdigest()[:16]


def _row_bytes(r: Row) -> bytes:
    # repr: exact for any str (surrogates escaped), int and float (NaN too)
    return repr((r.id, r.audio, r.dataset_id, r.text, r.duration, r.source)).encode() + b"\n"


def audio_digest(paths) -> str:
    """Digest of (path, size, mtime) of each file, or of its absence: changes when a file is
    rewritten, replaced, touched, created or deleted. Content is never read (see the README on
    filesystems with coarse mtimes)."""
    h = hashlib.sha256("\0".join(paths).encode("utf-8", "surrogatepass"))
    h.update(repr(file_stats(paths)).encode())
    return h.hexdigest()[:16]


SLOW_STAT_S = 20e-6       # a stat() slower than this on average: a network filesystem
STAT_THREADS = 16


def file_stats(paths) -> list:
    """(size, mtime_ns) of each path, None where it cannot be stat()ed. On a local disk a stat()
    takes about a microsecond; on a network filesystem (NFS, Lustre) it is a round trip, so if
    the first few hundred are slow the rest are spread over threads (stat releases the GIL)."""
    paths = list(paths)
    probe = min(len(paths), 256)
    t0 = time.perf_counter()
    out = _stats(paths[:probe])
    if probe == len(paths) or (time.perf_counter() - t0) / max(probe, 1) < SLOW_STAT_S:
        return out + _stats(paths[probe:])
    from concurrent.futures import ThreadPoolExecutor
    rest = paths[probe:]
    step = -(-len(rest) // (STAT_THREADS * 8))
    with ThreadPoolExecutor(STAT_THREADS) as pool:
        for part in pool.map(_stats, [rest[i:i + step] for i in range(0, len(rest), step)]):
            out += part
    return out


def _stats(paths) -> list:
    out, stat = [], os.stat
    for p in paths:
        try:
            st = stat(p)
            out.append((st.st_size, st.st_mtime_ns))
        except (OSError, ValueError):      # ValueError: a NUL in the path
            out.append(None)
    return out


class ShardIndex:
    """Per shard of a list of manifests: the digest of its rows and its audio paths.

    `ShardIndex.load(manifests, n_shards, cache_dir)` reads the manifests (the bytes are the
    cache key: an edit is seen whatever the filesystem's mtime resolution), and either loads the
    cached index or parses them and writes one. A cluster job needs one shard: it loads the small
    index and that shard's path list, never the other shards'. Any unreadable cache entry is
    rebuilt; the cache is only an accelerator and holds nothing else.
    """

    def __init__(self, key: str, rows: list, counts: list, paths=None, folder=None, manifests=None):
        self.key, self._rows, self.counts = key, rows, counts
        self._paths, self._folder, self._manifests = paths, folder, manifests

    @property
    def n_shards(self) -> int:
        return len(self._rows)

    def rows_digest(self, k: int) -> str:
        return self._rows[k]

    def audio_paths(self, k: int) -> list:
        if self._paths is not None:
            return self._paths[k]
        try:
            with open(os.path.join(self._folder, f"paths-{k:04d}.json"), "rb") as f:
                data = f.read()
        except OSError:         # pruned by another process meanwhile: parse the manifests again
            datas = [_read(p) for p in self._manifests]
            if self.key_of(self._manifests, datas, self.n_shards) != self.key:
                raise RuntimeError(f"manifests {self._manifests} changed while Snakemake was reading them") from None
            self._paths = self.build(self._manifests, datas, self.n_shards, self.key)._paths
            return self._paths[k]
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:     # lone surrogates, which only the standard library reads
            return json.loads(data)

    def audio_digest(self, k: int) -> str:
        return audio_digest(self.audio_paths(k))

    # ---- building and caching ----------------------------------------------------------------
    @staticmethod
    def key_of(paths: list, datas: list, n_shards: int) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{INDEX_FORMAT}\0{n_shards}\0{len(paths)}\0".encode())
        for p, d in zip(paths, datas):
            h.update(f"{p}\0{len(d)}\0".encode("utf-8", "surrogatepass"))
            h.update(d)
        return h.hexdigest()

    @classmethod
    def build(cls, paths: list, datas: list, n_shards: int, key: str | None = None, probe=None) -> "ShardIndex":
        """One pass, no Row kept: per shard a running digest (rows_digest's, fed row by row) and
        the audio paths. `probe` (a HeldoutProbe) sees every row in the same pass."""
        hashers = [hashlib.sha256() for _ in range(n_shards)]
        audio = [[] for _ in range(n_shards)]
        with _no_gc():
            for r in _iter_rows(paths, datas, Parsed([], [], 0, 0)):
                k = shard_of(r.id, n_shards)
                hashers[k].update(_row_bytes(r))
                audio[k].append(r.audio)
                if probe is not None:
                    probe(r)
        if probe is not None:
            probe.done = True
        return cls(key or cls.key_of(paths, datas, n_shards), [h.hexdigest()[:16] for h in hashers],
                   [len(a) for a in audio], paths=audio)

    @classmethod
    def load(cls, manifests, n_shards: int, cache_dir=None, probe=None) -> "ShardIndex":
        """`probe`: see `build`; it runs only when the index is built, not loaded from the cache."""
        paths = as_paths(manifests)
        datas = [_read(p) for p in paths]
        key = cls.key_of(paths, datas, n_shards)
        if cache_dir is not None:
            folder = os.path.join(os.fspath(cache_dir), key)
            try:
                with open(os.path.join(folder, "index.json"), "rb") as f:
                    meta = orjson.loads(f.read())
                if meta["format"] == INDEX_FORMAT and len(meta["rows"]) == n_shards:
                    return cls(key, meta["rows"], meta["counts"], folder=folder, manifests=paths)
            except FileNotFoundError:
                pass
            except (OSError, ValueError, KeyError, TypeError):     # damaged: rebuilt below
                shutil.rmtree(folder, ignore_errors=True)
        index = cls.build(paths, datas, n_shards, key, probe)
        if cache_dir is not None:
            index._save(os.fspath(cache_dir), paths)
        return index

    def _save(self, cache_dir: str, manifests: list) -> None:
        """Write atomically (a temporary folder renamed into place); a failure only costs speed."""
        folder = os.path.join(cache_dir, self.key)
        tmp = os.path.join(cache_dir, f".tmp-{self.key}-{os.getpid()}")
        try:
            os.makedirs(tmp, exist_ok=True)
            for k, ps in enumerate(self._paths):
                with open(os.path.join(tmp, f"paths-{k:04d}.json"), "w", encoding="ascii") as f:
                    json.dump(ps, f)
            with open(os.path.join(tmp, "index.json"), "wb") as f:   # last: its presence means complete
                f.write(json.dumps({"format": INDEX_FORMAT, "manifests": manifests, "rows": self._rows,
                                    "counts": self.counts, "created": time.time()}).encode())
            try:
                os.rename(tmp, folder)
            except OSError:          # another process wrote the same entry first
                shutil.rmtree(tmp, ignore_errors=True)
            _prune(cache_dir, keep=self.key)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)


def _prune(cache_dir: str, keep: str) -> None:
    """Keep the INDEX_KEEP newest entries (and always `keep`); drop leftovers of killed writers."""
    try:
        entries = [e for e in os.scandir(cache_dir) if e.is_dir()]
    except OSError:
        return
    now = time.time()
    stale = [e for e in entries if e.name.startswith(".tmp-") and now - e.stat().st_mtime > 3600]
    done = sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.stat().st_mtime, reverse=True)
    for e in stale + [e for e in done[INDEX_KEEP:] if e.name != keep]:
        shutil.rmtree(e.path, ignore_errors=True)


# ---- what a built shard records, read without zarr (parse time) -----------------------------------
def shard_record(shard_dir) -> dict | None:
    """The attributes of a shard folder's zarr.json (format, rows it was built from), or None when
    it has no readable zarr.json (not a shard: the workflow and training report that otherwise).
    One file read and parsed with orjson: about a millisecond for 15,000 ids."""
    try:
        with open(os.path.join(os.fspath(shard_dir), "zarr.json"), "rb") as f:
            meta = orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return attrs if isinstance(attrs, dict) else {}


def n_q_of(cache_paths) -> int | None:
    """The number of codebooks a cache was built with (its fingerprint's n_q: codec.n_q, a
    precompute setting; a SNAC cache records none: all). One zarr.json read; a shard that has none
    is reported where the cache is opened."""
    record = shard_record(cache_paths[0]) if cache_paths else None
    return ((record or {}).get("fingerprint") or {}).get("n_q")


# ---- held-out is held out ---------------------------------------------------------------------------
class HeldoutProbe:
    """Sees training rows one by one and remembers those that are also held-out rows: the same id,
    or the same audio file (paths resolved against their manifests' folders, then made absolute;
    symlinks are not followed). Give it to ShardIndex.build to ride on the index's own parse."""

    def __init__(self, heldout):
        held = parse_manifest(heldout).rows
        self.order = [r.id for r in held]
        self.ids = set(self.order)
        self.files = {}
        for r in held:
            self.files.setdefault(os.path.abspath(r.audio), r.id)
        self.names = {p[p.rfind("/") + 1:] for p in self.files}
        self.hits, self.done = {}, False

    def __call__(self, r: Row) -> None:
        if r.id in self.ids:
            self.hits.setdefault(r.id, f"id {r.id!r}")
        a = r.audio
        if a[a.rfind("/") + 1:] in self.names:            # a cheap filter before abspath
            h = self.files.get(os.path.abspath(a))
            if h is not None:
                self.hits.setdefault(h, f"the audio of training {r.id!r}")

    def result(self) -> tuple[int, list]:
        """(how many held-out rows are also training rows, the first five as [(id, how)])."""
        both = [uid for uid in self.order if uid in self.hits]
        return len(both), [(uid, self.hits[uid]) for uid in both[:5]]


def check_heldout_disjoint(train, heldout, cache_dir=None, index=None) -> None:
    """Raise ValueError naming up to five held-out utterances that are also training ones. A pass
    is remembered under cache_dir, keyed by the manifests' paths and bytes and the working folder
    (relative paths resolve against it). `index`: (n_shards, index cache folder) of the training
    split: when its ShardIndex has to be built anyway (a manifest edited), the check rides on
    that one parse; otherwise the training manifests are parsed for it (once per version)."""
    train, heldout = as_paths(train), as_paths(heldout)
    marker = None
    if cache_dir is not None:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"disjoint {INDEX_FORMAT}\0{os.getcwd()}\0{len(train)}\0".encode("utf-8", "surrogatepass"))
        for p in train + heldout:
            h.update(f"{p}\0".encode("utf-8", "surrogatepass"))
            h.update(_read(p))
        marker = os.path.join(os.fspath(cache_dir), f"disjoint-{h.hexdigest()}")
        if os.path.exists(marker):
            return
    probe = HeldoutProbe(heldout)
    if index is not None:
        ShardIndex.load(train, index[0], index[1], probe=probe)
    if not probe.done:
        paths = train
        with _no_gc():
            for r in _iter_rows(paths, [_read(p) for p in paths], Parsed([], [], 0, 0)):
                probe(r)
    n, first = probe.result()
    if n:
        what = "utterance is also a training utterance" if n == 1 else "utterances are also training utterances"
        raise ValueError(
            f"{n} held-out {what} (same id or same audio file): "
            + ", ".join(f"{uid!r}" + ("" if how.startswith("id ") else f" ({how})") for uid, how in first)
            + (" ..." if n > 5 else "") + f"; the evaluation would score the model on what it trained on: remove "
            f"them from {', '.join(heldout)} or from {', '.join(train)}")
    if marker is not None:
        try:
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            open(marker, "w").close()
        except OSError:
            pass
