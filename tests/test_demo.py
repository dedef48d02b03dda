"""Tests for the deterministic demo-corpus generator (pipeline/data/demo.py)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf

from pipeline.data.demo import generate_demo

RATE = 48000
KW = dict(seed=7, n_train=6, n_heldout=2, rate=RATE, min_seconds=1.0, max_seconds=2.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = generate_demo(out, **KW)
    return out, summary


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _all_files(root):
    found = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            found[os.path.relpath(p, root)] = p
    return found


def _load_all(out):
    clips = []
    for name in ("manifest.jsonl", "heldout.jsonl"):
        for row in _read_jsonl(out / name):
            x, sr = sf.read(out / row["audio"], dtype="float64", always_2d=True)
            clips.append((row, x, sr))
    return clips


def test_deterministic_bytes(corpus, tmp_path):
    out, summary = corpus
    again = generate_demo(tmp_path / "b", **KW)
    assert again == summary
    a, b = _all_files(out), _all_files(tmp_path / "b")
    assert sorted(a) == sorted(b)
    assert len(a) == KW["n_train"] + KW["n_heldout"] + 2
    for rel in a:
        with open(a[rel], "rb") as fa, open(b[rel], "rb") as fb:
            assert fa.read() == fb.read(), rel


def test_other_seed_differs(corpus, tmp_path):
    out, _ = corpus
    generate_demo(tmp_path, **{**KW, "seed": 8, "n_train": 1, "n_heldout": 0})
    rel = os.path.join("audio", "demo-train-000.wav")
    assert (out / rel).read_bytes() != (tmp_path / rel).read_bytes()


def test_manifests_and_audio(corpus):
    out, summary = corpus
    train = _read_jsonl(out / "manifest.jsonl")
    held = _read_jsonl(out / "heldout.jsonl")
    assert len(train) == KW["n_train"] and len(held) == KW["n_heldout"]
    assert summary["train"] == KW["n_train"] and summary["heldout"] == KW["n_heldout"]
    assert summary["rate"] == RATE
    train_ids, held_ids = [r["id"] for r in train], [r["id"] for r in held]
    assert len(set(train_ids)) == len(train_ids) and len(set(held_ids)) == len(held_ids)
    assert not set(train_ids) & set(held_ids)
    assert train_ids[0] == "demo-train-000" and held_ids[0] == "demo-heldout-000"

    total = 0.0
    for rows in (train, held):
        assert {r["dataset_id"] for r in rows} == {0, 1}
        for r in rows:
            assert set(r) == {"audio", "id", "text", "duration", "dataset_id"}
            assert not os.path.isabs(r["audio"]) and r["audio"] == f"audio/{r['id']}.wav"
            assert isinstance(r["text"], str) and r["text"].strip()
            info = sf.info(str(out / r["audio"]))
            assert info.samplerate == RATE and info.channels == 1
            assert info.subtype == "PCM_16" and info.format == "WAV"
            secs = info.frames / RATE
            assert KW["min_seconds"] <= secs <= KW["max_seconds"]
            assert r["duration"] == round(secs, 3)
            total += secs
    assert summary["seconds"] == pytest.approx(total, abs=2e-3)
    # no temporary files left behind
    assert not [p for p in _all_files(out) if ".tmp" in p]


def test_band_content_silence_and_fricatives(corpus):
    out, _ = corpus
    n_fft, hop = 1024, 512
    win = np.hanning(n_fft)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / RATE)
    hi_band, lo_band = freqs >= 12000, freqs < 4000
    total = high = 0.0
    fricative_frames = silent_frames = 0
    for _, x, sr in _load_all(out):
        assert sr == RATE and x.shape[1] == 1
        x = x[:, 0]
        assert np.all(np.isfinite(x)) and np.max(np.abs(x)) <= 1.0
        n = (len(x) - n_fft) // hop + 1
        frames = x[np.arange(n)[:, None] * hop + np.arange(n_fft)[None, :]]
        spec = np.abs(np.fft.rfft(frames * win, axis=1)) ** 2
        total += spec.sum()
        high += spec[:, hi_band].sum()
        rms_db = 20 * np.log10(np.sqrt(np.mean(frames ** 2, axis=1)) + 1e-12)
        silent_frames += int(np.sum(rms_db < -50))
        loud = rms_db > -45
        fricative_frames += int(np.sum(loud & (spec[:, hi_band].sum(1) > spec[:, lo_band].sum(1))))
    assert high / total > 1e-3
    assert fricative_frames > 0
    assert silent_frames > 0


def test_no_clipping_and_levels(corpus):
    out, _ = corpus
    for _, x, _ in _load_all(out):
        peak = np.max(np.abs(x))
        assert np.all(np.isfinite(x))
        # peak-normalized to -3 dBFS minus a 0..12 dB gain (plus a tiny noise floor)
        assert 10 ** (-15.5 / 20) <= peak <= 10 ** (-2.9 / 20) < 1.0
        # clips start and end quietly (fades, leading pause)
        assert np.max(np.abs(x[:64])) < 0.01


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_demo(tmp_path, min_seconds=2.0, max_seconds=1.0)
    with pytest.raises(ValueError):
        generate_demo(tmp_path, n_train=-1)


def test_demo_codec_trains_on_salient_excerpts():
    """Clips that open and close with a pause (as real read speech does): excerpts drawn uniformly
    are silence half the time, salient ones (salient_db) almost never; the draw is deterministic."""
    from pipeline.training.democodec import excerpt
    rate, n = 24000, 6000
    rng = np.random.default_rng(0)
    loud = 0.1 * rng.standard_normal(rate)
    clips = [np.concatenate([np.zeros(rate), loud, np.zeros(rate)]).astype(np.float32) for _ in range(4)]

    def silent_share(salient_db, seed=1):
        r = np.random.default_rng(seed)
        return np.mean([np.sqrt(np.mean(excerpt(clips, n, r, salient_db) ** 2)) < 1e-3 for _ in range(400)])

    assert silent_share(None) > 0.4
    assert silent_share(-40.0) < 0.02
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert all(np.array_equal(excerpt(clips, n, a, -40.0), excerpt(clips, n, b, -40.0)) for _ in range(20))
