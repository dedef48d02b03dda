"""Precompute: codec loading, shard writing, bad input accounting, alignment, fingerprints."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_24K, speechlike, write_audio, write_manifest

from pipeline.data import audio as A
from pipeline.data import cache as C
from pipeline.data.alignment import agreement, check_shard, verdict
from pipeline.model.codecs.snac import geometry
from pipeline.model.codecs.base import state_digest
from pipeline.data.precompute import run_shard, summarize
from pipeline.model import codecs

ROOT = Path(__file__).resolve().parents[1]


def test_official_layout_loads_and_codes_equal_snac_encode(tiny_codec_dir, tmp_path):
    import snac
    ours = codecs.load(tiny_codec_dir)
    ref = snac.SNAC.from_config(str(tiny_codec_dir / "config.json"))
    ref.load_state_dict(torch.load(tiny_codec_dir / "pytorch_model.bin", weights_only=True))
    ref.eval()
    x = torch.from_numpy(speechlike(1.3, 24000, seed=1))[None, None]
    from pipeline.data.precompute import encode_items
    item = {"x": x[0, 0].numpy()}
    encode_items(ours, ours.geometry_at(48000), [item], 64.0, "cpu")
    with torch.inference_mode():
        expect = ref.encode(x)
    assert len(item["codes"]) == 3
    for got, want in zip(item["codes"], expect):
        np.testing.assert_array_equal(got, want[0].numpy())
    # the same weights as safetensors give the same digest (the fingerprint is format-independent)
    ours.save(tmp_path / "st")
    assert state_digest(codecs.load(tmp_path / "st").state_dict()) == state_digest(ours.state_dict())


def test_geometry_is_derived_from_config():
    g = geometry(TINY_24K, 48000)
    assert (g.hop, g.hop_target, g.strides, g.coarsest) == (512, 1024, (4, 2, 1), 4)
    g44 = geometry({**TINY_24K, "sampling_rate": 44100, "encoder_rates": [3, 3, 7, 7],
                    "vq_strides": [8, 4, 2, 1], "attn_window_size": 32}, 88200)
    assert (g44.hop, g44.strides, g44.pad_to) == (441, (8, 4, 2, 1), 441 * 32)
    with pytest.raises(ValueError, match="whole number"):
        geometry({**TINY_24K, "sampling_rate": 44100, "encoder_rates": [3, 3, 7]}, 48000)


@pytest.fixture(scope="module")
def good_cache(tiny_codec_dir, tmp_path_factory):
    """Eight clips of various lengths/rates in 2 shards."""
    d = tmp_path_factory.mktemp("good")
    rows = []
    for i in range(8):
        rate = [48000, 96000, 48000, 44100 * 2][i % 4]
        write_audio(d / f"a{i}.wav", speechlike(1.2 + 0.3 * i, rate, seed=i), rate)
        rows.append({"audio": f"a{i}.wav", "id": f"utt{i}", "dataset_id": i % 2})
    m = write_manifest(d / "m.jsonl", rows)
    shards = [run_shard(m, k, 2, codecs.load(tiny_codec_dir), d / f"shard-{k:03d}.zarr") for k in range(2)]
    return d, m, shards


def test_every_clip_cached_once_with_consistent_table(good_cache, tiny_codec_dir):
    d, m, _ = good_cache
    s = summarize(m, [d / "shard-000.zarr", d / "shard-001.zarr"], d / "out")
    assert (s["lines"], s["accepted"], s["rejected"]) == (8, 8, 0)
    shards = C.open_cache(d)
    ids = sorted(i for sh in shards for i in sh.ids)
    assert ids == sorted(f"utt{i}" for i in range(8))
    sh = shards[0]
    assert set(sh.table["source_rate"]) <= {48000, 96000, 88200}
    for i in range(len(sh)):
        codes, audio = sh.utterance(i)
        frames = sh.frames(i)
        assert len(audio) == frames * 1024 and sh.table["samples"][i] <= len(audio)
        assert [len(c) for c in codes] == [frames // 4, frames // 2, frames]


def test_each_shard_records_its_rows_and_the_summary_refuses_other_rows(good_cache, tmp_path):
    """The rows record is the digest the Snakefile gives the shard job (ShardIndex), so the two can
    be compared; a shard whose rows are not the manifest's (a backup put back) is refused."""
    from pipeline.data.manifest import ShardIndex, shard_record
    d, m, _ = good_cache
    index = ShardIndex.load([str(m)], 2)
    for k in range(2):
        assert C.Shard(d / f"shard-{k:03d}.zarr").rows == shard_record(d / f"shard-{k:03d}.zarr")["rows"] \
            == index.rows_digest(k)
    edited = d / "m-edited.jsonl"         # beside it: the audio paths resolve the same
    lines = m.read_text().splitlines()
    lines[3] = lines[3].replace('"dataset_id": 1', '"dataset_id": 4')
    edited.write_text("\n".join(lines) + "\n")
    k = [i for i in range(2) if ShardIndex.load([str(edited)], 2).rows_digest(i) != index.rows_digest(i)]
    assert len(k) == 1
    with pytest.raises(RuntimeError, match=f"shard-{k[0]:03d}.zarr was built from other manifest rows than the current"):
        summarize(edited, [d / "shard-000.zarr", d / "shard-001.zarr"], tmp_path / "out")


def test_alignment_slicing_reencoding_decoding(good_cache, tiny_codec_dir):
    d, _, _ = good_cache
    codec = codecs.load(tiny_codec_dir)
    for sh in C.open_cache(d):
        r = check_shard(sh, codec, n_checks=6, seed=3)
        assert r["checks"] == 6 and r["reencode_compared"] >= 6 * 8, r   # 8 coarsest codes per check
        assert r["slicing_ok"]
        assert r["reencode_match"] >= 0.95, r      # near-ties may flip after int16 + resampling
        assert r["decode_max_err"] < 1e-4, r
        assert verdict(r) == []


def test_agreement_discounts_chance_and_too_short_caches_are_named(good_cache, tiny_codec_dir):
    a = np.array([0] * 18 + [1, 2])
    assert agreement(a, a) == 1.0
    assert np.mean(a == a[::-1]) == 0.8 and agreement(a, a[::-1]) < 0   # agrees by frequency only
    d, _, _ = good_cache
    sh = C.open_cache(d)[0]
    longest = max(sh.frames(i) for i in range(len(sh))) // max(sh.strides)      # coarsest codes
    r = check_shard(sh, codecs.load(tiny_codec_dir), n_checks=2, seg_coarse=longest + 1)   # no utterance holds it
    assert r["reencode_compared"] == 0 and "nothing was checked" in verdict(r)[0]


def _rewrite_with_geometry(src, dst, hop_target):
    """A cache of the same codes whose audio was laid out with another hop (the classic bug:
    SNAC's 44 kHz hop 441 used for the 24 kHz model)."""
    sh = C.Shard(src)
    fp = {**sh.fingerprint, "hop_target": hop_target}
    w = C.ShardWriter(dst, fp, sh.silence_codes, sh.index, sh.count)
    for i in range(len(sh)):
        codes, full = sh.utterance(i)
        raw = full[:int(sh.table["samples"][i])]
        audio = np.zeros(sh.frames(i) * hop_target, np.int16)
        n = min(len(raw), len(audio))
        audio[:n] = raw[:n]
        w.add(sh.ids[i], audio, codes, **{k: sh.table[k][i] for k in C.TABLE})
    w.close([], {})


def test_wrong_hop_cache_fails_alignment(good_cache, tiny_codec_dir, tmp_path):
    d, _, _ = good_cache
    _rewrite_with_geometry(d / "shard-000.zarr", tmp_path / "shard-000.zarr", hop_target=882)
    r = check_shard(C.Shard(tmp_path / "shard-000.zarr"), codecs.load(tiny_codec_dir), n_checks=6, seed=3)
    assert r["reencode_match"] < 0.8 and any("do not belong together" in v for v in verdict(r)), r


def test_bad_input_every_reason_and_counts_add_up(tiny_codec_dir, tmp_path):
    d = tmp_path
    write_audio(d / "good1.wav", speechlike(1.2, 48000, 1), 48000)
    write_audio(d / "good2.flac", speechlike(1.0, 48000, 2), 48000)
    write_audio(d / "stereo96.wav", np.stack([speechlike(1.1, 96000, 3)] * 2, axis=1), 96000)
    write_audio(d / "ogg8k.ogg", speechlike(1.0, 8000, 4), 8000, format="OGG", subtype="VORBIS")
    write_audio(d / "short.wav", speechlike(0.05, 48000, 5), 48000)
    write_audio(d / "empty.wav", np.zeros(0, np.float32), 48000)
    nan = speechlike(1.0, 48000, 6)
    nan[100] = np.nan
    write_audio(d / "nan.wav", nan, 48000, subtype="FLOAT")
    full = (d / "good1.wav").read_bytes()
    (d / "truncated.wav").write_bytes(full[:30])
    (d / "random.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    (d / "text.wav").write_text("this is not audio\n" * 20)
    (d / "adir.wav").mkdir()
    rows = [{"audio": "good1.wav"}, {"audio": "good2.flac", "id": "g2", "dataset_id": 1},
            {"audio": "stereo96.wav"}, "{not json", {"id": "noaudio"}, {"audio": "good1.wav"},
            {"audio": "missing.wav"}, {"audio": "adir.wav"}, {"audio": "empty.wav"},
            {"audio": "nan.wav"}, {"audio": "short.wav"}, {"audio": "ogg8k.ogg"},
            {"audio": "truncated.wav"}, {"audio": "random.wav"}, {"audio": "text.wav"}, ""]
    m = write_manifest(d / "m.jsonl", rows)
    for k in range(2):
        run_shard(m, k, 2, codecs.load(tiny_codec_dir), d / f"shard-{k:03d}.zarr")
    s = summarize(m, [d / "shard-000.zarr", d / "shard-001.zarr"], d / "out")
    assert s["lines"] == 15 and s["blank_lines"] == 1
    assert s["accepted"] == 3 and s["accepted"] + s["rejected"] == s["lines"]
    rejects = [json.loads(l) for l in (d / "out" / "rejects.jsonl").read_text().splitlines()]
    by_line = {r["line"]: r["reason"] for r in rejects}
    expect = {4: "malformed JSON", 5: "missing `audio`", 6: "duplicate id", 7: "missing file",
              8: "is a directory", 9: "zero-length", 10: "NaN/Inf", 11: "too short",
              12: "below the target rate", 13: "unreadable", 14: "unreadable", 15: "unreadable"}
    for line, reason in expect.items():
        assert reason in by_line[line], (line, by_line[line])
    assert all("reason" in r and "line" in r for r in rejects)
    sh = [x for x in C.open_cache(d) if "stereo96.wav" in x.ids][0]
    assert sh.table["source_rate"][sh.ids.index("stereo96.wav")] == 96000


def test_low_rate_policies(tiny_codec_dir, tmp_path):
    write_audio(tmp_path / "low.wav", speechlike(1.0, 16000, 1), 16000)
    m = write_manifest(tmp_path / "m.jsonl", [{"audio": "low.wav"}])
    run_shard(m, 0, 1, codecs.load(tiny_codec_dir), tmp_path / "keep.zarr", {"low_rate_policy": "keep_bandlimited"})
    sh = C.Shard(tmp_path / "keep.zarr")
    assert len(sh) == 1 and sh.table["bandlimited"][0] and sh.table["source_rate"][0] == 16000

    class Repeat(torch.nn.Module):   # a stand-in bandwidth extender: sample-and-hold upsampling
        def forward(self, x):
            return x.repeat_interleave(2, dim=-1)
    torch.jit.script(Repeat()).save(str(tmp_path / "bwe.pt"))
    run_shard(m, 0, 1, codecs.load(tiny_codec_dir), tmp_path / "bwe.zarr",
              {"low_rate_policy": "bwe", "bwe_model": str(tmp_path / "bwe.pt")})
    bwe = C.Shard(tmp_path / "bwe.zarr")
    assert len(bwe) == 1 and not bwe.table["bandlimited"][0] and bwe.table["source_rate"][0] == 16000
    # the cached target is the extender's output (codec-rate input held for 2 samples), not a resampling
    x, sr = A.read_mono(tmp_path / "low.wav")
    want = A.to_int16(np.repeat(A.resample(x, sr, bwe.geometry.codec_rate), 2))[0]
    n = int(bwe.table["samples"][0])
    assert n == len(want) and np.array_equal(bwe.utterance(0)[1][:n], want)
    assert not np.array_equal(sh.utterance(0)[1][:n], want)        # keep_bandlimited cached another target


def test_cache_info_cli_and_disagreeing_shards(good_cache, tmp_path):
    d, _, _ = good_cache
    run = lambda p: subprocess.run([sys.executable, "-m", "pipeline", "cache-info", str(p), "--json"],
                                   capture_output=True, text=True)
    r = run(d)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["utterances"] == 8 and len(info["shards"]) == 2
    assert info["fingerprint"]["hop"] == 512 and info["fingerprint"]["strides"] == [4, 2, 1]
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copytree(d / "shard-000.zarr", bad / "shard-000.zarr")
    _rewrite_with_geometry(d / "shard-001.zarr", bad / "shard-001.zarr", hop_target=882)
    r = run(bad)
    assert r.returncode != 0 and "disagree" in r.stdout + r.stderr and "hop_target" in r.stdout + r.stderr


def test_fingerprint_mismatch_is_refused(good_cache, tmp_path):
    d, _, _ = good_cache
    other = codecs.build(TINY_24K, seed=99)
    with pytest.raises(C.CacheError, match="codec_digest"):
        C.open_cache(d, expect=other.fingerprint(48000, C.CACHE_FORMAT))


def _clips_manifest(d, n, seconds, name="m.jsonl"):
    """n rows reading one clip under different ids (enough to make a shard job last)."""
    write_audio(d / "clip.wav", speechlike(seconds, 48000, seed=5), 48000)
    return write_manifest(d / name, [{"audio": "clip.wav", "id": f"u{i:03d}"} for i in range(n)])


def test_killed_shard_job_restarts_cleanly_and_writes_the_same_shard(tiny_codec_dir, tmp_path):
    m = _clips_manifest(tmp_path, 10, 1.0)
    settings = {"window_seconds": 1.0}                   # encode and append as the job goes
    ref = tmp_path / "ref" / "shard-000.zarr"
    run_shard(m, 0, 1, codecs.load(tiny_codec_dir), ref, settings)
    out = tmp_path / "cache" / "shard-000.zarr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PIPELINE_PROGRESS_SECONDS": "0", "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen([sys.executable, "-m", "pipeline", "precompute-shard", "--manifest", str(m),
                            "--shard", "0", "--n-shards", "1", "--codec", str(tiny_codec_dir), "--out", str(out),
                            "--settings", json.dumps(settings)],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in job.stdout:                              # the log's progress lines
        seen.append(line)
        hit = re.search(r"(\d+)/10 rows read, (\d+) encoded", line)
        if hit and int(hit[2]) >= 3:
            job.kill()
            break
    job.wait()
    assert job.returncode == -signal.SIGKILL, "".join(seen)
    partial, lock = Path(str(out) + ".partial"), Path(str(out) + ".lock")
    assert partial.is_dir() and not out.exists()         # killed mid-way: leftovers, no shard
    run_shard(m, 0, 1, codecs.load(tiny_codec_dir), out, settings)
    assert not partial.exists() and not lock.exists()
    a, b = C.Shard(ref), C.Shard(out)
    assert a.digest == b.digest and b.verify() == []
    assert np.array_equal(a._audio[:], b._audio[:])
    assert all(np.array_equal(x, y) for x, y in zip(a.codes, b.codes))


def test_shard_job_streams_in_bounded_memory(tiny_codec_dir, tmp_path, monkeypatch):
    """Peak traced memory (numpy buffers included) does not grow with the number of rows: the
    job holds a window of audio and one zarr shard of output, never the shard's audio."""
    monkeypatch.setattr(C, "AUDIO_CHUNK", 2**12)         # small zarr shards, so the test's audio
    monkeypatch.setattr(C, "AUDIO_SHARD", 2**14)         # spans many of them
    peaks = {}
    for n in (6, 30):
        m = _clips_manifest(tmp_path, n, 0.6, f"m{n}.jsonl")
        tracemalloc.start()
        run_shard(m, 0, 1, codecs.load(tiny_codec_dir), tmp_path / f"shard-{n}.zarr", {"window_seconds": 1.0})
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(C.Shard(tmp_path / f"shard-{n}.zarr")) == n
    held = 24 * 0.6 * (48000 * 4 + 24000 * 4)            # what holding the 24 extra rows' audio would take
    assert peaks[30] - peaks[6] < 0.25 * held, peaks
