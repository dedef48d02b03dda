"""Manifest parsing and sharding.

A manifest is JSONL, one utterance a line: `audio` (required; relative paths resolve against
the manifest's folder), optional `id` (default: the `audio` string as written), `text`,
`duration`, `dataset_id` (default 0). Several manifests can be given (each row keeps its
dataset_id and remembers its manifest as `source`, for sampling weights). Blank lines are skipped; every other line is either a
`Row` or a reject with a reason. Rows go to shards by a stable hash of their id, so adding one
utterance changes one shard. The Snakefile calls this at parse time (to give each shard job its
audio files as inputs and a digest of its rows as a param) and each shard job calls it again.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Row:
    line: int
    id: str
    audio: str          # as resolved: manifest folder joined with the manifest's `audio`
    dataset_id: int = 0
    text: str | None = None
    duration: float | None = None
    source: int = 0     # which manifest (index in the configured list) the row comes from


@dataclass
class Parsed:
    rows: list
    rejects: list       # {"line", "id"?, "audio"?, "reason"}
    lines: int          # non-blank lines counted
    blank: int


def as_paths(manifest) -> list:
    """One manifest path or several -> a list of path strings."""
    return [os.fspath(manifest)] if isinstance(manifest, (str, os.PathLike)) else [os.fspath(m) for m in manifest]


def parse_manifest(paths) -> Parsed:
    """One manifest path or a list of them (rows remember their `source` index; ids must be
    unique across all of them). Rejects carry the manifest path and the line number in it."""
    paths = as_paths(paths)
    rows, rejects, seen = [], [], {}
    lines = blank = 0
    for source, path in enumerate(map(os.fspath, paths)):
        base = os.path.dirname(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    blank += 1
                    continue
                lines += 1
                row, reason, extra = _parse_line(raw, n, base, source)
                if row is not None and row.id in seen:
                    row, reason = None, f"duplicate id (first in {seen[row.id][0]} line {seen[row.id][1]})"
                if row is None:
                    rejects.append({"manifest": path, "line": n, **extra, "reason": reason})
                else:
                    seen[row.id] = (path, n)
                    rows.append(row)
    return Parsed(rows, rejects, lines, blank)


def _parse_line(raw: str, n: int, base: str, source: int = 0):
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg} at column {e.colno}", {}
    if not isinstance(obj, dict):
        return None, f"a line must be a JSON object, got {type(obj).__name__}", {}
    extra = {k: obj[k] for k in ("id", "audio") if isinstance(obj.get(k), str)}
    audio = obj.get("audio")
    if not isinstance(audio, str) or not audio.strip():
        return None, "missing `audio`" if audio is None else "`audio` must be a non-empty string", extra
    uid = obj.get("id", audio)
    if not isinstance(uid, str) or not uid:
        return None, "`id` must be a non-empty string", extra
    ds = obj.get("dataset_id", 0)
    if isinstance(ds, bool) or not isinstance(ds, int) or ds < 0:
        return None, "`dataset_id` must be a non-negative integer", extra
    duration = obj.get("duration")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))):
        return None, "`duration` must be a number", extra
    text = obj.get("text")
    resolved = os.path.normpath(os.path.join(base, os.path.expanduser(audio)))
    return Row(n, uid, resolved, ds, text if isinstance(text, str) else None, duration, source), None, extra


def shard_of(uid: str, n_shards: int) -> int:
    return int.from_bytes(hashlib.sha1(uid.encode("utf-8")).digest()[:8], "big") % n_shards


def shard_rows(rows, n_shards: int) -> list:
    out = [[] for _ in range(n_shards)]
    for r in rows:
        out[shard_of(r.id, n_shards)].append(r)
    return out


def rows_digest(rows) -> str:
    """Digest of a shard's rows, for Snakemake params: changes exactly when the shard's lines do."""
    h = hashlib.sha256()
    for r in rows:
        d = asdict(r)
        d.pop("line")   # moving a line within the manifest changes nothing cached
        h.update(json.dumps(d, sort_keys=True).encode())
    return h.hexdigest()[:16]
