"""The cache's own guarantees beyond the fault table: digests, `cache-info --check` with the
alignment checks, the fill-value sentinel on reads, the writer lock."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import speechlike, write_audio, write_manifest

from pipeline.__main__ import main
from pipeline.data import cache as C
from pipeline.data.precompute import run_shard
from pipeline.model import codecs


@pytest.fixture(scope="module")
def cache_built(tiny_codec_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    write_audio(d / "a.wav", speechlike(1.3, 48000, seed=1), 48000)
    write_audio(d / "b.wav", speechlike(0.9, 96000, seed=2), 96000)
    m = write_manifest(d / "m.jsonl", [{"audio": "a.wav"}, {"audio": "b.wav"}])
    run_shard(m, 0, 1, codecs.load(tiny_codec_dir), d / "cache" / "shard-000.zarr")
    return d


def test_digest_is_written_at_close_and_follows_the_content(cache_built, tiny_codec_dir, tmp_path):
    sh = C.Shard(cache_built / "cache" / "shard-000.zarr")
    assert len(sh.digest) == 64 and sh.verify() == []
    # the same rows give the same digest; another shard index (same data) another one
    m = cache_built / "m.jsonl"
    run_shard(m, 0, 1, codecs.load(tiny_codec_dir), tmp_path / "again.zarr")
    assert C.Shard(tmp_path / "again.zarr").digest == sh.digest
    w = C.ShardWriter(tmp_path / "other.zarr", sh.fingerprint, sh.silence_codes, 1, 2)
    for i in range(len(sh)):
        codes, audio = sh.utterance(i)
        w.add(sh.ids[i], audio, codes, **{k: sh.table[k][i] for k in C.TABLE})
    assert w.close([], {}) == C.Shard(tmp_path / "other.zarr").digest != sh.digest


def test_check_runs_the_alignment_checks_with_a_codec(cache_built, tiny_codec_dir, capsys):
    assert main(["cache-info", str(cache_built / "cache"), "--check", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shards"][0]["ok"] and "--codec" in info["note"] and "alignment" not in info["shards"][0]
    assert main(["cache-info", str(cache_built / "cache"), "--check", "--codec", str(tiny_codec_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    r = info["shards"][0]["alignment"]
    assert r["checks"] > 0 and r["slicing_ok"] and r["reencode_match"] >= 0.9 and not info["problems"]


def test_check_finds_a_table_edited_after_writing(cache_built, tmp_path, capsys):
    shutil.copytree(cache_built / "cache", tmp_path / "cache")
    import zarr
    g = zarr.open_group(tmp_path / "cache" / "shard-000.zarr", mode="r+")
    g["dataset_id"][0] = 7                                 # the data still reads; the digest says no
    assert main(["cache-info", str(tmp_path / "cache"), "--check"]) == 2
    assert "digestmismatch" in "".join(capsys.readouterr().out.split())


def test_a_chunk_gone_after_open_reads_as_the_sentinel_and_is_refused(cache_built, tmp_path):
    shutil.copytree(cache_built / "cache", tmp_path / "cache")
    sh = C.Shard(tmp_path / "cache" / "shard-000.zarr")   # opened while complete
    os.unlink(tmp_path / "cache" / "shard-000.zarr" / "audio" / "c" / "0")
    with pytest.raises(C.CacheError, match=f"utterance '{sh.ids[0]}': audio reads as the fill value"):
        sh.segment(0, 0, sh.geometry.quantum)
    loader = torch.utils.data.DataLoader(_FirstSegment(sh), batch_size=None, num_workers=1)
    with pytest.raises(C.CacheError, match=f"utterance '{sh.ids[0]}': audio reads as the fill value"):
        next(iter(loader))                                 # in a loader worker, read through zarrs


class _FirstSegment(torch.utils.data.Dataset):
    def __init__(self, shard):
        self.shard = shard

    def __len__(self):
        return 1

    def __getitem__(self, k):
        return self.shard.segment(0, 0, self.shard.geometry.quantum)[1]


def test_writer_refuses_the_missing_chunk_sentinel_and_a_stale_lock_does_not_block(cache_built, tmp_path):
    sh = C.Shard(cache_built / "cache" / "shard-000.zarr")
    codes, audio = sh.utterance(0)
    out = tmp_path / "s.zarr"
    (tmp_path / "s.zarr.lock").write_text("PID 999999 on a host that died\n")   # nobody holds it
    w = C.ShardWriter(out, sh.fingerprint, sh.silence_codes)
    with pytest.raises(C.CacheError, match=f"pid {os.getpid()}"):
        C.ShardLock(out)                                   # held by this writer
    bad = audio.copy()
    bad[5] = C.AUDIO_FILL
    with pytest.raises(ValueError, match="sentinel"):
        w.add("x", bad, codes, **{k: sh.table[k][0] for k in C.TABLE})
    w.add("x", audio, codes, **{k: sh.table[k][0] for k in C.TABLE})
    w.close([], {})
    assert not (tmp_path / "s.zarr.lock").exists() and np.array_equal(C.Shard(out).utterance(0)[1], audio)


def test_snakemakes_timestamp_in_a_shard_is_no_warning(cache_built, tmp_path):
    """Snakemake writes .snakemake_timestamp into every directory() output: zarr lists it as a
    stray object, which printed a ZarrUserWarning per shard in every training log."""
    import warnings
    shard = tmp_path / "shard-000.zarr"
    shutil.copytree(cache_built / "cache" / "shard-000.zarr", shard)
    (shard / ".snakemake_timestamp").touch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C.Shard(shard).ids
    (shard / "stray").write_text("x")            # anything else still warns
    with pytest.warns(UserWarning, match="stray"):
        C.Shard(shard)
