"""Faults and hostile input (issue 8): one test per row of issue 8's fault table, each reproducing
the fault and asserting the message the user gets. Rows are added by the engineers who fix them.

Rows here (the data layer): a deleted chunk file of a cache shard, a chunk overwritten with
garbage, two `precompute-shard` processes on one output, a shard folder deleted after the run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import speechlike, write_audio, write_manifest

from pipeline.__main__ import main
from pipeline.data import cache as C
from pipeline.data.precompute import run_shard
from pipeline.data.segments import open_training_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tiny_codec_dir, tmp_path_factory):
    """A two-shard cache of six short clips, and its manifest."""
    d = tmp_path_factory.mktemp("faults")
    rows = []
    for i in range(6):
        write_audio(d / f"a{i}.wav", speechlike(0.6 + 0.2 * i, 48000, seed=i), 48000)
        rows.append({"audio": f"a{i}.wav", "id": f"utt{i}"})
    m = write_manifest(d / "m.jsonl", rows)
    for k in range(2):
        run_shard(m, k, 2, tiny_codec_dir, d / "cache" / f"shard-{k:03d}.zarr")
    return d


@pytest.fixture
def cache(built, tmp_path):
    shutil.copytree(built / "cache", tmp_path / "cache")
    return tmp_path / "cache"


def squash(text: str) -> str:
    """Without whitespace: rich wraps long lines, even inside a path."""
    return "".join(text.split())


def cache_info(capsys, *args) -> tuple:
    rc = main(["cache-info", *map(str, args)])
    out = capsys.readouterr()
    return rc, squash(out.out + out.err)


@pytest.mark.parametrize("array", ["audio", "codes_0", "codes_1", "codes_2", "audio_offsets"])
def test_deleted_chunk_file(cache, capsys, array):
    shard = cache / "shard-000.zarr"
    (shard / array / "c" / "0").unlink()
    rc, out = cache_info(capsys, cache)
    assert rc != 0 and squash(f"{shard}: chunk file {array}/c/0 is missing") in out
    if array != "audio_offsets":
        assert "utterances'utt" in out                     # which utterances it held
    with pytest.raises(C.CacheError, match=f"{shard}: chunk file {array}/c/0 is missing"):
        open_training_cache(sorted(cache.glob("shard-*")), None, preload=False)


def _utterance_in(shard_path, i=0):
    return C.Shard(shard_path).ids[i]


class _Reads(torch.utils.data.Dataset):
    """The first segment of utterance 0, read in whatever process asks."""

    def __init__(self, shard):
        self.shard = shard

    def __len__(self):
        return 1

    def __getitem__(self, k):
        return self.shard.segment(0, 0, self.shard.geometry.quantum)[1]


@pytest.mark.parametrize("how", ["whole file", "one byte"])
def test_chunk_overwritten_with_garbage(cache, capsys, how):
    shard = cache / "shard-000.zarr"
    first = _utterance_in(shard)
    f = shard / "audio" / "c" / "0"
    data = bytearray(f.read_bytes())
    if how == "whole file":
        data = bytearray(np.random.default_rng(0).bytes(len(data)))
    else:
        data[10] ^= 0xFF                                     # inside the first chunk's data
    f.write_bytes(bytes(data))
    sh = open_training_cache([shard, cache / "shard-001.zarr"], None, preload=False)[0]
    with pytest.raises(C.CacheError, match=f"{shard}: utterance '{first}'"):
        sh.segment(0, 0, sh.geometry.quantum)                 # a training read
    loader = torch.utils.data.DataLoader(_Reads(sh), batch_size=None, num_workers=1)
    with pytest.raises(C.CacheError, match=f"{shard}: utterance '{first}'"):
        next(iter(loader))                                   # the same in a loader worker (zarrs)
    with pytest.raises(C.CacheError, match=f"{shard}: utterance '{first}'"):
        sh.utterance(0)                                      # an evaluation read
    with pytest.raises(C.CacheError, match=f"{shard}: utterance '{first}'"):
        C.Shard(shard, preload=True)                         # a preloaded cache
    rc, out = cache_info(capsys, cache, "--check")
    assert rc != 0 and squash(f"{shard}: utterance '{first}'") in out


def test_codes_chunk_overwritten_with_garbage(cache):
    shard = cache / "shard-001.zarr"
    first = _utterance_in(shard)
    f = shard / "codes_2" / "c" / "0"
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(C.CacheError, match=f"{shard}: utterance '{first}': codes_2 unreadable"):
        open_training_cache([cache / "shard-000.zarr", shard], None, preload=False)


def test_two_precompute_shard_processes_on_one_output(built, tiny_codec_dir, tmp_path, capsys):
    out = tmp_path / "shard-000.zarr"
    args = ["precompute-shard", "--manifest", str(built / "m.jsonl"), "--shard", "0", "--n-shards", "1",
            "--codec", str(tiny_codec_dir), "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lock = Path(str(out) + ".lock")
    deadline = time.time() + 120
    while not (lock.exists() and f"PID {first.pid}" in lock.read_text()):
        assert first.poll() is None and time.time() < deadline, first.communicate()[0]
        time.sleep(0.02)
    rc = main(args)                       # the second writer, while the first holds the shard
    msg = squash(capsys.readouterr().out)
    log = first.communicate()[0]
    assert rc != 0 and squash(f"{out}: another writer holds it (PID {first.pid} on") in msg
    assert first.returncode == 0, log
    assert not lock.exists() and not Path(str(out) + ".partial").exists()
    sh = C.Shard(out)
    assert len(sh) == 6 and sh.verify() == []


def test_shard_with_fingerprint_but_missing_arrays_is_incomplete(cache):
    shard = cache / "shard-000.zarr"
    shutil.rmtree(shard / "audio")
    shutil.rmtree(shard / "codes_1")
    with pytest.raises(C.CacheError, match=r"shard-000.zarr: incomplete shard: arrays \['audio', 'codes_1'\] missing"):
        C.open_cache(cache)


def test_shard_folder_deleted_after_the_run(cache, capsys):
    paths = sorted(cache.glob("shard-*.zarr"))
    shutil.rmtree(cache / "shard-001.zarr")
    rc, out = cache_info(capsys, cache)
    assert rc != 0 and squash(f"cache {cache} is incomplete: 1 of its 2 shards missing: {cache / 'shard-001.zarr'}") in out
    with pytest.raises(C.CacheError, match="shard-001.zarr: shard folder missing"):
        open_training_cache(paths, None, preload=False)       # the paths the workflow gives
    with pytest.raises(C.CacheError, match="incomplete: 1 of its 2 shards missing: .*shard-001.zarr"):
        open_training_cache(paths[:1], None, preload=False)
