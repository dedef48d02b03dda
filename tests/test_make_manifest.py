"""`python -m pipeline make-manifest AUDIO_DIR OUT_DIR` (issue 20.5): every audio file in exactly one
of train.jsonl, heldout.jsonl, skipped.jsonl (with a reason); manifests the pipeline's parser
reads back to the same files and durations; a seeded held-out split that never shares a speaker
with training; FIFOs skipped without being opened (opening one blocks until a writer comes)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
from conftest import write_audio

from pipeline.__main__ import main
from pipeline.data import folder as F
from pipeline.data.manifest import parse_manifest

SPEAKERS = [f"spk{k}" for k in range(8)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """AUDIO_DIR/<speaker>/<chapter>/<n>.{wav,flac}: 8 speakers of 3 files each (lengths known),
    plus what a real folder has: transcripts, a damaged file, an empty one, a FIFO, a broken link,
    a file above the speaker level, a symlink looping back up."""
    root = tmp_path_factory.mktemp("corpus") / "audio dir"
    lengths = {}
    for k, spk in enumerate(SPEAKERS):
        for n in range(3):
            rate = (16000, 24000, 48000)[n]
            rel = f"{spk}/ch{n % 2}/{n}.{'flac' if n == 1 else 'wav'}"
            write_audio(root / rel, np.zeros(rate // 10 * (k + n + 1), np.float32), rate)
            lengths[rel] = (k + n + 1) / 10
        (root / spk / "ch0" / "trans.txt").write_text("hello\n")
    write_audio(root / "top.wav", np.zeros(4800, np.float32), 48000)          # no speaker folder
    lengths["top.wav"] = 0.1
    (root / "spk0" / "ch0" / "damaged.wav").write_bytes(b"RIFF\x00\x00not really")
    sf.write(root / "spk1" / "empty.wav", np.zeros(0, np.float32), 16000)
    os.mkfifo(root / "spk2" / "pipe.wav")
    os.symlink(root / "nowhere.flac", root / "spk3" / "gone.flac")
    os.symlink(root, root / "spk4" / "loop")
    skipped = {"spk0/ch0/damaged.wav": "unreadable audio", "spk1/empty.wav": "zero-length audio",
               "spk2/pipe.wav": "not a regular file (FIFO)", "spk3/gone.flac": "broken symbolic link"}
    return root, lengths, skipped


@pytest.fixture(autouse=True)
def opened(monkeypatch):
    """The paths make-manifest opens; opening the FIFO fails (for real it would hang the test)."""
    paths, real = [], F.sf.SoundFile

    def soundfile(path, *a, **k):
        paths.append(path)
        if path.endswith("pipe.wav"):
            raise RuntimeError("opened the FIFO")
        return real(path, *a, **k)
    monkeypatch.setattr(F.sf, "SoundFile", soundfile)
    return paths


def read(out, name):
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def test_every_file_once_speakers_apart_and_readable_by_the_pipeline(corpus, tmp_path, opened, capsys):
    root, lengths, skipped = corpus
    out = tmp_path / "manifests"
    assert main(["make-manifest", str(root), str(out), "--speaker-depth", "1", "--heldout-fraction", "0.25",
                 "--seed", "3", "--workers", "3"]) == 0
    train, held, skip = read(out, "train.jsonl"), read(out, "heldout.jsonl"), read(out, "skipped.jsonl")
    # every audio file in exactly one of the three; the FIFO never opened; transcripts not listed
    ids = [r["id"] for r in train + held]
    assert sorted(ids) == sorted(lengths) and len(set(ids)) == len(ids)
    assert {os.path.relpath(r["audio"], root): r["reason"].split(":")[0] for r in skip} == skipped
    assert not [p for p in opened if p.endswith("pipe.wav")] and not [p for p in opened if "trans" in p]
    # held out: whole speakers, about a quarter of the files, none of them in training
    held_spk, train_spk = {r["speaker"] for r in held}, {r.get("speaker") for r in train}
    assert held_spk and not held_spk & train_spk and 0.25 * 25 <= len(held) <= 0.25 * 25 + 3
    assert all(r["id"].split("/")[0] == r.get("speaker", r["id"].split("/")[0]) for r in train + held)
    assert "speaker" not in next(r for r in train if r["id"] == "top.wav")
    # the pipeline's own parser: relative paths resolve against the manifest folder, to the files
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
        parsed = parse_manifest(out / name)
        assert not parsed.rejects and len(parsed.rows) == len(rows)
        for row in parsed.rows:
            assert os.path.samefile(row.audio, root / row.id)
            assert row.duration == pytest.approx(lengths[row.id], abs=1e-6)
    text = capsys.readouterr().out
    assert "4 files skipped" in text and ".txt (8)" in text and "16000 Hz (8)" in text


def test_the_split_is_seeded_and_files_split_alone_without_speakers(corpus, tmp_path):
    root, lengths, _ = corpus

    def run(seed, *extra):
        out = tmp_path / f"m{seed}{len(extra)}"
        assert main(["make-manifest", str(root), str(out), "--seed", str(seed), "--heldout-fraction", "0.2", *extra]) == 0
        return {r["id"] for r in read(out, "heldout.jsonl")}, read(out, "train.jsonl")
    a, train = run(1)
    assert run(1)[0] == a and run(2)[0] != a                  # the seed decides, and only the seed
    assert len(a) == 5 and not any("speaker" in r for r in train)     # 20 % of 25 files, one by one
    assert {r["id"] for r in train} | a == set(lengths)
    spk = run(1, "--speaker-depth", "2")[1]                   # level 2 is the chapter folder here
    assert {r["speaker"] for r in spk if "speaker" in r} <= {"ch0", "ch1"}


def test_bad_arguments_fail_in_one_line(tmp_path, capsys):
    for args, msg in (([str(tmp_path / "none"), str(tmp_path / "o")], "does not exist"),
                      ([str(tmp_path), str(tmp_path / "o"), "--heldout-fraction", "1"], "must be in [0, 1)"),
                      ([str(tmp_path), str(tmp_path / "o"), "--speaker-depth", "0"], "must be 1 or more")):
        assert main(["make-manifest", *args]) == 1
        out = capsys.readouterr().out
        assert out.startswith("error:") and msg in out and len(out.strip().splitlines()) == 1, out
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.wav").write_text("not audio")
    assert main(["make-manifest", str(tmp_path / "a"), str(tmp_path / "o")]) == 1
    assert "no readable audio (1 files skipped" in capsys.readouterr().out
    assert read(tmp_path / "o", "skipped.jsonl")[0]["reason"].startswith("unreadable audio")
