"""A manifest from a folder of audio: `python -m pipeline make-manifest AUDIO_DIR OUT_DIR`.

Writes OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl in the pipeline's manifest format
(pipeline/data/manifest.py): one line per audio file, `audio` relative to OUT_DIR (where the
manifest lives), `id` (the path under AUDIO_DIR), `duration` (seconds, from the header) and, with
`--speaker-depth N`, `speaker`: the name of the folder N levels below AUDIO_DIR (1:
AUDIO_DIR/<speaker>/..., as LibriSpeech; 2: AUDIO_DIR/<corpus>/<speaker>/..., as VCTK's wav48/).

Every file whose suffix is one libsndfile reads (AUDIO_SUFFIXES) ends up in exactly one of
train.jsonl, heldout.jsonl or OUT_DIR/skipped.jsonl (with a reason: unreadable, zero-length, not
a regular file). Files with other suffixes (transcripts, ...) are counted and named in the summary,
not listed. FIFOs, sockets, devices and broken links are skipped without being opened (opening a
FIFO would wait for a writer forever); symlinked files and folders are followed, each folder once.

The held-out split: speakers (or, without --speaker-depth, files) are ranked by a hash of
(seed, name) and taken in that order until they hold --heldout-fraction of the files, so the split
is seeded, never puts one speaker on both sides, and a speaker's side depends on its rank only
(adding files moves at most the speakers at the boundary). With --speaker-depth, files above that
depth have no speaker and go to training, where they cannot share a speaker with held-out clips.

Scale: one os.scandir walk (the folder entries carry the file types: no stat per file) and the
headers read in a thread pool (libsndfile releases the GIL); progress every few seconds.
"""
from __future__ import annotations

import hashlib
import os
import stat
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import soundfile as sf

from ..ui import console

# suffixes of the formats libsndfile reads (RAW has no header: it needs its parameters given)
_ALIASES = {"WAV": ("wave",), "AIFF": ("aif", "aifc"), "AU": ("snd",), "OGG": ("oga", "opus"),
            "NIST": ("sph",), "SVX": ("iff",), "IRCAM": ("sf",), "MAT4": ("mat",), "MAT5": ("mat",)}
AUDIO_SUFFIXES = frozenset(
    s for fmt in sf.available_formats() if fmt != "RAW" for s in (fmt.lower(), *_ALIASES.get(fmt, ())))
BATCH = 256             # header reads per thread-pool task
PROGRESS_EVERY = 5.0    # seconds between progress lines


def make_manifest(audio_dir, out_dir, speaker_depth: int | None = None, heldout_fraction: float = 0.05,
                  seed: int = 0, workers: int = 16) -> dict:
    """Scan, read headers, split, write; returns the summary it prints."""
    root, out = Path(audio_dir), Path(out_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: {'not a folder' if root.exists() else 'does not exist'} (AUDIO_DIR must be a folder of audio)")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
    if speaker_depth is not None and speaker_depth < 1:
        raise ValueError(f"--speaker-depth must be 1 or more (1: AUDIO_DIR/<speaker>/...), got {speaker_depth}")
    t0 = time.monotonic()
    top = os.path.normpath(root)
    files, skipped, ignored = scan(top)
    console.print(f"{root}: {len(files):,} audio files ({time.monotonic() - t0:.1f} s)")
    heads = read_headers(files, workers)
    rows, rates = [], Counter()
    cut = len(os.path.join(top, ""))            # every path the walk gives is TOP/...
    up = os.path.relpath(os.path.abspath(top), os.path.abspath(out))     # TOP as seen from OUT_DIR
    up = "" if up == "." else up.replace(os.sep, "/") + "/"
    for path, (head, reason) in zip(files, heads):
        if reason is not None:
            skipped.append({"audio": path, "reason": reason})
            continue
        uid = path[cut:].replace(os.sep, "/")
        frames, rate = head
        row = {"id": uid, "audio": up + uid, "duration": round(frames / rate, 6)}
        if speaker_depth is not None:
            parts = uid.split("/", speaker_depth)
            if len(parts) > speaker_depth:      # the last part is the rest of the path
                row["speaker"] = parts[speaker_depth - 1]
        rows.append(row)
        rates[rate] += 1
    console.print(f"headers read ({time.monotonic() - t0:.1f} s)")
    rows.sort(key=lambda r: r["id"])
    skipped.sort(key=lambda r: r["audio"])
    train, heldout = split(rows, heldout_fraction, seed, speaker_depth is not None)
    out.mkdir(parents=True, exist_ok=True)
    for name, lines in (("train", train), ("heldout", heldout), ("skipped", skipped)):
        _write_jsonl(out / f"{name}.jsonl", lines)
    summary = _summary(train, heldout, skipped, ignored, rates, time.monotonic() - t0)
    _show(summary, out)
    if not rows:
        raise ValueError(f"{root}: no readable audio ({len(skipped)} files skipped: see {out / 'skipped.jsonl'}; "
                         f"suffixes looked for: {', '.join(sorted(AUDIO_SUFFIXES))})")
    return summary


# ---- the walk ---------------------------------------------------------------------------------
def scan(root: str):
    """-> (audio file paths, skipped entries, Counter of other suffixes). Folders are entered once
    each (by device and inode: a symlink back up the tree is no loop); only the entries whose
    suffix is an audio one are looked at closer, and a non-regular one is never opened."""
    files, skipped, ignored = [], [], Counter()
    stack, seen = [root], set()
    last, dirs = time.monotonic(), 0
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            it = os.scandir(d)
        except OSError as e:
            skipped.append({"audio": d, "reason": f"unreadable folder: {e.strerror}"})
            continue
        dirs += 1
        with it:
            for e in it:
                name = e.name
                dot = name.rfind(".")
                suffix = name[dot + 1:].lower() if dot > 0 else ""
                try:
                    if e.is_dir():
                        stack.append(e.path)
                    elif suffix not in AUDIO_SUFFIXES:
                        ignored[suffix or "(none)"] += 1
                    elif e.is_file():
                        files.append(e.path)
                    else:
                        skipped.append({"audio": e.path, "reason": _not_regular(e)})
                except OSError as err:
                    skipped.append({"audio": e.path, "reason": f"cannot stat: {err.strerror}"})
        if time.monotonic() - last > PROGRESS_EVERY:
            last = time.monotonic()
            console.print(f"scanning: {len(files):,} audio files in {dirs:,} folders so far")
    return files, skipped, ignored


def _not_regular(entry) -> str:
    try:
        mode = entry.stat().st_mode
    except OSError:
        return "broken symbolic link" if entry.is_symlink() else "not a regular file"
    kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else
            "character device" if stat.S_ISCHR(mode) else "block device" if stat.S_ISBLK(mode) else "special file")
    return f"not a regular file ({kind})"


# ---- the headers ------------------------------------------------------------------------------
def read_headers(paths: list, workers: int = 16) -> list:
    """[((frames, rate), None) or (None, reason)] per path, in order; headers only."""
    batches = [paths[i:i + BATCH] for i in range(0, len(paths), BATCH)]
    out, last, t0 = [], time.monotonic(), time.monotonic()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for part in pool.map(_headers, batches):
            out += part
            if time.monotonic() - last > PROGRESS_EVERY:
                last = time.monotonic()
                console.print(f"headers: {len(out):,} / {len(paths):,} "
                              f"({len(out) / (last - t0):,.0f} files/s)")
    return out


def _headers(paths):
    return [_header(p) for p in paths]


def _header(path: str):
    try:
        with sf.SoundFile(path) as f:
            frames, rate = f.frames, f.samplerate
    except Exception as e:          # libsndfile errors come in several types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return None, f"unreadable audio: {first}"
    if frames <= 0:
        return None, "zero-length audio"
    return (int(frames), int(rate)), None


# ---- the split --------------------------------------------------------------------------------
def split(rows: list, fraction: float, seed: int, by_speaker: bool) -> tuple[list, list]:
    """(train, heldout): groups (speakers, or single files) ranked by sha256(seed, name) go to
    heldout until it holds `fraction` of the files; at least one group stays in training."""
    groups = {}
    for r in rows:
        key = r.get("speaker") if by_speaker else r["id"]
        if key is not None:                     # no speaker: training (see the module docstring)
            groups.setdefault(key, []).append(r)
    ranked = sorted(groups, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).digest())
    held, n, want = set(), 0, fraction * len(rows)
    for k in ranked[:-1]:
        if n >= want:
            break
        held.add(k)
        n += len(groups[k])
    is_held = (lambda r: r.get("speaker") in held) if by_speaker else (lambda r: r["id"] in held)
    return [r for r in rows if not is_held(r)], [r for r in rows if is_held(r)]


# ---- output -----------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        for r in rows:
            f.write(orjson.dumps(r) + b"\n")
    tmp.replace(path)


def _summary(train, heldout, skipped, ignored, rates, seconds) -> dict:
    def side(rows):
        return {"files": len(rows), "hours": round(sum(r["duration"] for r in rows) / 3600, 3),
                "speakers": len({r["speaker"] for r in rows if "speaker" in r})}
    return {"train": side(train), "heldout": side(heldout), "skipped": len(skipped),
            "skip_reasons": dict(Counter(r["reason"].split(":")[0] for r in skipped).most_common()),
            "other_files": dict(ignored.most_common()), "rates": {str(k): v for k, v in sorted(rates.items())},
            "seconds": round(seconds, 1)}


def _show(s: dict, out: Path) -> None:
    for name in ("train", "heldout"):
        d = s[name]
        who = f", {d['speakers']:,} speakers" if d["speakers"] else ""
        console.print(f"{out / (name + '.jsonl')}: {d['files']:,} files, {d['hours']:.2f} h{who}")
    if s["skipped"]:
        why = ", ".join(f"{k} ({v:,})" for k, v in s["skip_reasons"].items())
        console.print(f"{out / 'skipped.jsonl'}: {s['skipped']:,} files skipped: {why}")
    if s["other_files"]:
        top = ", ".join(f".{k} ({v:,})" if k != "(none)" else f"no suffix ({v:,})"
                        for k, v in list(s["other_files"].items())[:6])
        console.print(f"not audio by their suffix, left out: {top}")
    console.print("sample rates: " + ", ".join(f"{k} Hz ({v:,})" for k, v in s["rates"].items())
                  + f"; {s['seconds']:.1f} s in all")
