"""The DAG at scale: what the Snakefile computes per shard at parse time instead of declaring every
audio file as an input (pipeline/data/manifest.py: ShardIndex), and a 20,000-row workflow run.

No test times anything (`python -m pipeline bench dag --rows N` does); these assert that the
fast paths mean exactly what the straightforward ones mean, that each digest moves exactly when
its shard's rows or files change, and that the cache under .snakemake/ is only an accelerator.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from pipeline.data import manifest as M
from pipeline.data.manifest import ShardIndex, parse_manifest, rows_digest, shard_of, shard_rows
from workflow_util import check_job_stats, mtimes, parse_jobs


# ---- the parser: orjson with the standard library deciding the hard cases -------------------------
def reference_parse(paths):
    """What the parser did before (standard library json, text mode, one os.path call per row)."""
    rows, rejects, seen, lines, blank = [], [], {}, 0, 0
    for source, path in enumerate(paths):
        base = os.path.dirname(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    blank += 1
                    continue
                lines += 1
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    rejects.append({"manifest": path, "line": n, "reason": f"malformed JSON: {e.msg} at column {e.colno}"})
                    continue
                if not isinstance(obj, dict):
                    rejects.append({"manifest": path, "line": n,
                                    "reason": f"a line must be a JSON object, got {type(obj).__name__}"})
                    continue
                extra = {k: obj[k] for k in ("id", "audio") if isinstance(obj.get(k), str)}
                audio, ds, dur = obj.get("audio"), obj.get("dataset_id", 0), obj.get("duration")
                uid = obj.get("id", audio)
                if not isinstance(audio, str) or not audio.strip():
                    reason = "missing `audio`" if audio is None else "`audio` must be a non-empty string"
                elif not isinstance(uid, str) or not uid:
                    reason = "`id` must be a non-empty string"
                elif isinstance(ds, bool) or not isinstance(ds, int) or not 0 <= ds <= 2**31 - 1:
                    reason = "`dataset_id` must be an integer in 0..2147483647 (the cache stores int32)"
                elif dur is not None and (isinstance(dur, bool) or not isinstance(dur, (int, float))
                                          or not 0 <= dur < float("inf")):
                    reason = "`duration` must be a finite number >= 0 (seconds)"
                elif uid in seen:
                    reason = f"duplicate id (first in {seen[uid][0]} line {seen[uid][1]})"
                else:
                    seen[uid] = (path, n)
                    text = obj.get("text")
                    rows.append((n, uid, os.path.normpath(os.path.join(base, os.path.expanduser(audio))), ds,
                                 text if isinstance(text, str) else None, dur, source))
                    continue
                rejects.append({"manifest": path, "line": n, **extra, "reason": reason})
    return rows, rejects, lines, blank


HARD_LINES = [
    b'{"audio": "a.wav", "id": "u1", "text": "hi", "dataset_id": 1, "duration": 1.5}',
    b'', b'   ', b'\x1c',
    b'{"audio": "a.wav"}',
    b'{"audio": "b.wav", "id": "u1"}',                       # duplicate id
    b'{"audio": "c.wav", "duration": NaN}',                  # the standard library accepts NaN
    b'{"audio": "d.wav", "text": "\xff\xfe bad utf8"}',       # undecodable bytes: replaced
    b'{"audio": "e.wav", "id": "\\ud800"}',                    # a lone surrogate
    b'not json', b'[1,2]', b'{"id": "x"}', b'{"audio": ""}', b'{"audio": 3}',
    b'{"audio": "f.wav", "id": ""}', b'{"audio": "f.wav", "id": 5}',
    b'{"audio": "g.wav", "dataset_id": true}', b'{"audio": "g2.wav", "dataset_id": -1}',
    b'{"audio": "g3.wav", "dataset_id": 1.0}', b'{"audio": "h.wav", "duration": "1"}',
    b'{"audio": "i.wav", "duration": false}',
    b'{"audio": "j.wav", "dataset_id": 123456789012345678901234567890}',   # orjson: a float
    b'{"audio": "j1.wav", "dataset_id": 2147483647}', b'{"audio": "j1b.wav", "dataset_id": 2147483648}',
    b'{"audio": "j3.wav", "duration": -1}', b'{"audio": "j4.wav", "duration": Infinity}',
    b'{"audio": "j2.wav", "duration": 123456789012345678901234567890}',
    b'\xef\xbb\xbf{"audio": "bom.wav"}',
    b'{"audio": "~/k.wav"}', b'{"audio": "/abs/../l.wav", "text": 5}', b'{"audio": "./x/../m.wav"}',
    b'{"audio": "m.wav", "audio": "m2.wav"}', b'{"audio": "n.wav"} trailing',
    b'{"audio": "o.wav"}\r', b'{"audio": "p.wav"}\r{"audio": "q.wav"}',
    b'{"audio": "u\\u00e9.wav", "id": "dup"}', b'{"audio": "v.wav", "id": "dup"}',
]


def test_parser_reads_every_line_as_the_standard_library_does(tmp_path):
    (tmp_path / "sub").mkdir()
    a = tmp_path / "sub" / "a.jsonl"
    a.write_bytes(b"\n".join(HARD_LINES) + b"\n\n")
    b = tmp_path / "b.jsonl"
    b.write_bytes(b'{"audio": "a.wav", "id": "zz"}\n{"audio":"a.wav","id":"u1"}')    # no final newline
    for paths in ([str(a)], [str(a), str(b)], [os.path.relpath(a), str(b)]):
        got = parse_manifest(paths)
        rows, rejects, lines, blank = reference_parse(paths)
        assert (got.lines, got.blank) == (lines, blank)
        assert got.rejects == rejects
        assert len(got.rows) == len(rows)
        for r, want in zip(got.rows, rows):
            assert [type(v) for v in r] == [type(v) for v in want], (r, want)
            assert repr(tuple(r)) == repr(want)          # repr: NaN compares unequal to itself
        assert got.rows[0].audio == os.path.normpath(os.path.join(os.path.dirname(paths[0]), "a.wav"))


def test_path_resolution_matches_normpath_join():
    rng = random.Random(0)
    parts = ["a", "b", ".", "..", "", "~", "x.wav", "/", "//", "c d", "é"]
    for base in ["", "data/demo", "/abs/m", "..", ".", "/", "//srv", "a/../b", "/a/"]:
        resolve = M._Resolver(base)
        for _ in range(3000):
            audio = "/".join(rng.choice(parts) for _ in range(rng.randint(1, 5)))
            audio = ("/" + audio) if rng.random() < 0.3 else audio
            if audio.strip():
                assert resolve(audio) == os.path.normpath(os.path.join(base, os.path.expanduser(audio))), (base, audio)


# ---- the shard index -----------------------------------------------------------------------------
def write_corpus(d: Path, n: int, n_files: int = 0) -> Path:
    """A manifest of n rows in d; the first n_files rows' audio files exist (tiny files)."""
    (d / "audio").mkdir(parents=True, exist_ok=True)
    with open(d / "m.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"audio": f"audio/u{i:06d}.wav", "id": f"u{i:06d}", "text": f"t{i % 7}",
                                "dataset_id": i % 3}) + "\n")
    for i in range(n_files):
        (d / "audio" / f"u{i:06d}.wav").write_bytes(b"x" * (i % 5 + 1))
    return d / "m.jsonl"


def test_index_digests_are_the_shards_rows(tmp_path):
    m = write_corpus(tmp_path, 20_000)
    index = ShardIndex.load([str(m)], 8)
    shards = shard_rows(parse_manifest(m).rows, 8)
    assert [index.rows_digest(k) for k in range(8)] == [rows_digest(s) for s in shards]
    assert [index.audio_paths(k) for k in range(8)] == [[r.audio for r in s] for s in shards]
    assert sum(index.counts) == 20_000 and min(index.counts) > 2000


def _digests(m, n_shards=8, cache=None):
    index = ShardIndex.load([str(m)], n_shards, cache)
    return [index.rows_digest(k) for k in range(n_shards)]


def test_row_digest_changes_exactly_with_its_shards_rows(tmp_path):
    m = write_corpus(tmp_path, 20_000)
    before = _digests(m)
    lines = m.read_text().splitlines(keepends=True)
    st = m.stat()

    def changed(new_lines, keep_stat=False):
        m.write_text("".join(new_lines))
        if keep_stat:     # a filesystem with coarse mtimes: same size, same mtime
            assert m.stat().st_size == st.st_size
            os.utime(m, ns=(st.st_atime_ns, st.st_mtime_ns))
        return {k for k, (a, b) in enumerate(zip(before, _digests(m))) if a != b}

    edited = lines.copy()
    edited[123] = edited[123].replace('"t4"', '"t5"')        # same length
    assert changed(edited, keep_stat=True) == {shard_of("u000123", 8)}
    added = lines + [json.dumps({"audio": "audio/new.wav", "id": "new"}) + "\n"]
    assert changed(added) == {shard_of("new", 8)}
    removed = lines[:500] + lines[501:]
    assert changed(removed) == {shard_of("u000500", 8)}
    i = next(i for i in range(10) if shard_of(f"u{i:06d}", 8) != shard_of(f"u{i + 1:06d}", 8))
    swapped = lines[:i] + [lines[i + 1], lines[i]] + lines[i + 2:]   # each shard's order kept: no change
    assert changed(swapped) == set()
    moved = [lines[-1]] + lines[:-1]                       # first of its shard now: the cache's order
    assert changed(moved) == {shard_of("u019999", 8)}
    assert changed(lines) == set()


def test_index_cache_is_an_accelerator_only(tmp_path):
    m = write_corpus(tmp_path, 5000)
    cache = tmp_path / ".snakemake" / "index"
    first = ShardIndex.load([str(m)], 8, cache)
    entry = cache / first.key
    assert (entry / "index.json").is_file() and len(list(entry.glob("paths-*.json"))) == 8
    second = ShardIndex.load([str(m)], 8, cache)
    assert second._paths is None                     # from the cache, paths read per shard on demand
    for k in range(8):
        assert second.rows_digest(k) == first.rows_digest(k)
        assert second.audio_paths(k) == first.audio_paths(k)

    # a cluster job needs one shard: it reads that shard's list alone
    for k in range(1, 8):
        (entry / f"paths-{k:04d}.json").unlink()
    assert ShardIndex.load([str(m)], 8, cache).audio_paths(0) == first.audio_paths(0)
    # a list gone meanwhile (pruned by another process): the manifests are parsed again
    assert ShardIndex.load([str(m)], 8, cache).audio_paths(5) == first.audio_paths(5)
    # a damaged entry is rebuilt
    (entry / "index.json").write_text("{not json")
    third = ShardIndex.load([str(m)], 8, cache)
    assert third._paths is not None and [third.rows_digest(k) for k in range(8)] == first._rows
    assert json.loads((entry / "index.json").read_text())["rows"] == first._rows
    # another shard count or manifest is another entry; the newest INDEX_KEEP are kept
    for n in range(2, 2 + M.INDEX_KEEP + 2):
        ShardIndex.load([str(m)], n, cache)
        time.sleep(0.01)
    entries = [e for e in cache.iterdir() if not e.name.startswith(".")]
    assert len(entries) == M.INDEX_KEEP
    assert not list(cache.glob(".tmp-*"))


def test_audio_digest_moves_with_size_mtime_and_presence_only(tmp_path):
    m = write_corpus(tmp_path, 400, n_files=400)
    index = ShardIndex.load([str(m)], 8)
    before = [index.audio_digest(k) for k in range(8)]
    assert before == [index.audio_digest(k) for k in range(8)]
    wav = tmp_path / "audio" / "u000042.wav"
    k = shard_of("u000042", 8)
    st = wav.stat()

    def changed():
        return {j for j in range(8) if index.audio_digest(j) != before[j]}

    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))          # touched
    assert changed() == {k}
    wav.write_bytes(b"Y" * st.st_size)                                          # same size, new content
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert changed() == set()                  # not seen: what the README says to touch files for
    wav.write_bytes(b"Y" * (st.st_size + 1))                                    # another size
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert changed() == {k}
    wav.unlink()
    assert changed() == {k}
    wav.write_bytes(b"x" * st.st_size)
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert changed() == set()


def test_slow_filesystem_stats_in_threads_give_the_same_digest(tmp_path, monkeypatch):
    m = write_corpus(tmp_path, 3000, n_files=2000)
    paths = ShardIndex.load([str(m)], 1).audio_paths(0)
    serial = M.file_stats(paths)
    assert serial.count(None) == 1000
    monkeypatch.setattr(M, "SLOW_STAT_S", -1.0)        # every filesystem is slow
    assert M.file_stats(paths) == serial


# ---- a 20,000-row workflow ------------------------------------------------------------------------
def _snakemake(root, *extra, target="results/phase11/final.pt"):
    import subprocess
    import sys
    from workflow_util import Result, run_env
    p = subprocess.run([sys.executable, "-m", "snakemake", *([target] if target else []), "--cores", "2", "--configfile",
                        "config/snac_24khz.yaml", "bench.yaml", *extra], cwd=root, env=run_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    r = Result(p.returncode, p.stdout, 0.0, parse_jobs(p.stdout))
    assert r.rc == 0, r.out[-4000:]
    return r


@pytest.mark.slow
def test_20k_rows_shard_jobs_take_digests_not_audio_inputs(tmp_path):
    """The synthetic corpus of `bench dag` (each row its own hard-linked WAV), 8 shards: one job per
    shard whose inputs are the manifest and the codec; everything built -> nothing to do; one
    touched file -> its shard and what depends on it; a cluster job's command is complete."""
    from pipeline.bench import _fake_build, dag_tree
    root = dag_tree(tmp_path / "t", rows=20_000, shards=8)
    manifest = root / "corpus/train.jsonl"
    before = mtimes(root)

    r = _snakemake(root, "-n")
    check_job_stats(r)
    shards = [j for j in r.jobs if j["rule"] == "precompute_shard"]
    assert len(shards) == 9                                   # 8 + the held-out split's 1
    for j in shards:
        assert ".wav" not in j["input"]
        assert j["input"].split(", ")[0] in (str(manifest), str(root / "corpus/heldout.jsonl"))
    # parsing wrote nothing into the tree but the index under .snakemake/
    assert mtimes(root) == before
    assert len(list((root / ".snakemake/phase11-manifest-index").glob("*/index.json"))) == 2

    _fake_build(root, r.out)
    r = _snakemake(root, "-n")
    assert not r.jobs and "Nothing to be done" in r.out, r.out[-3000:]

    row = parse_manifest(manifest).rows[777]
    shutil.copy(row.audio, f"{row.audio}.new")     # a file of its own (touching a hard link would
    os.replace(f"{row.audio}.new", row.audio)      # touch every link to the same file)
    r = _snakemake(root, "-n")
    k = shard_of(row.id, 8)
    keys = {(j["rule"], j.get("wildcards", "")) for j in r.jobs}
    assert ("precompute_shard", f"cachedir=cache, shard={k:03d}") in keys
    assert sum(1 for j in r.jobs if j["rule"] == "precompute_shard") == 1
    assert next(j for j in r.jobs if j["rule"] == "precompute_shard")["reason"].startswith("Params have changed")

    # the jobstep a cluster runs for that shard (snakemake-executor-plugin-slurm's command, minus
    # options about storage and deployment): it re-parses the Snakefile and formats the command
    r = _snakemake(root, "--target-jobs", f"precompute_shard:cachedir=cache,shard={k:03d}", "--allowed-rules",
                   "precompute_shard", "--force", "--nolock", "--ignore-incomplete", "--mode", "remote",
                   "--dry-run", "--printshellcmds", target=None)
    assert [j["rule"] for j in r.jobs] == ["precompute_shard"]
    assert f"precompute-shard --manifest {manifest} --shard {k:03d} --n-shards 8" in r.out, r.out[-3000:]
    # a training job's DAG holds every shard job too; it formats its own command only
    r = _snakemake(root, "--target-jobs", "train:phase=warmup", "--allowed-rules", "train", "--force", "--nolock",
                   "--ignore-incomplete", "--mode", "remote", "--dry-run", "--printshellcmds", target=None)
    assert [j["rule"] for j in r.jobs] == ["train"]
    assert "pipeline train --phase warmup" in r.out, r.out[-3000:]


# ---- held-out is held out -----------------------------------------------------------------------------
def test_heldout_overlap_is_refused_naming_five_and_rides_on_the_index_build(tmp_path, monkeypatch):
    m = write_corpus(tmp_path, 3000)
    (tmp_path / "held").mkdir()
    held = tmp_path / "held" / "h.jsonl"
    rows = [{"audio": f"../audio/u{i:06d}.wav", "id": f"h{i}"} for i in (5, 6, 7)]          # same files
    rows += [{"audio": f"x{i}.wav", "id": f"u{i:06d}"} for i in (100, 200, 300, 400)]       # same ids
    rows += [{"audio": "fresh.wav", "id": "fresh"}]
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    checked, index = tmp_path / ".snakemake" / "checked", tmp_path / ".snakemake" / "index"
    parses = []
    real = M._iter_rows
    monkeypatch.setattr(M, "_iter_rows", lambda paths, *a: parses.append(paths) or real(paths, *a))
    import pytest
    with pytest.raises(ValueError, match=r"^7 held-out utterances are also training utterances \(same id or same "
                                         r"audio file\): 'h5' \(the audio of training 'u000005'\), 'h6' \(.*\), 'h7' "
                                         r"\(.*\), 'u000100', 'u000200' \.\.\.; the evaluation would score"):
        M.check_heldout_disjoint([str(m)], [str(held)], checked, index=(8, index))
    assert parses.count([str(m)]) == 1                 # the index build's parse, no second one
    held.write_text(json.dumps(rows[-1]) + "\n")
    parses.clear()
    M.check_heldout_disjoint([str(m)], [str(held)], checked, index=(8, index))   # index cached: one parse
    assert parses.count([str(m)]) == 1 and len(list(checked.glob("disjoint-*"))) == 1
    parses.clear()
    M.check_heldout_disjoint([str(m)], [str(held)], checked, index=(8, index))   # remembered: none
    assert parses.count([str(m)]) == 0
