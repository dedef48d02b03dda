"""Training segments: short utterances padded and masked, batch k a function of (seed, k) for any
number of loader workers or data-parallel shares, and the masked, per-item reconstruction loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import speechlike, write_audio, write_manifest

from pipeline.data.cache import open_cache
from pipeline.data.precompute import encode_same_length, run_shard, silence_codes
from pipeline.data.segments import (SegmentBatches, build_pool, collate, fixed_segments,
                                    open_training_cache, read_segment)
from pipeline.model.codecs.snac import geometry
from pipeline.settings import segment_frames
from pipeline.training.losses import ReconstructionLoss
from pipeline.model import codecs

SR = 48000


@pytest.fixture(scope="module")
def cache(tiny_codec_dir, tmp_path_factory):
    """Seven clips of 0.6 to 2.4 s in two shards: segments of 1.5 s leave some of them short."""
    d = tmp_path_factory.mktemp("seg")
    rows = []
    for i in range(7):
        write_audio(d / f"a{i}.wav", speechlike(0.6 + 0.3 * i, SR, seed=i), SR)
        rows.append({"audio": f"a{i}.wav", "id": f"u{i}"})
    m = write_manifest(d / "m.jsonl", rows)
    for k in range(2):
        run_shard(m, k, 2, codecs.load(tiny_codec_dir), d / f"shard-{k:03d}.zarr")
    return d


def _batches(shards, n, bs=4, share=(0, 1), seed=3):
    return SegmentBatches(shards, build_pool(shards, n), n, bs, seed, 100, share=share)


def test_short_utterances_are_padded_and_masked(cache):
    shards = open_cache(cache)
    geo = shards[0].geometry
    n = segment_frames(1.5, geo)
    pool = build_pool(shards, n)
    assert len(pool.items) == 7 and not pool.excluded and 0 < pool.padded < 7
    hop_t = geo.hop_target
    for si, ui, usable, _ in pool.items:
        if usable >= n:
            continue
        sh = shards[si]
        codes, target, mask = collate([read_segment(sh, ui, 0, n)])
        real = int(sh.table["samples"][ui])
        assert target.shape == mask.shape == (1, 1, n * hop_t) and mask.dtype == torch.bool
        assert mask[0, 0, :real].all() and not mask[0, 0, real:].any()
        assert not target[0, 0, sh.frames(ui) * hop_t:].any()                  # zeros past the cached audio
        full_codes, _ = sh.utterance(ui)
        for c, f, s, fill in zip(codes, full_codes, sh.strides, sh.silence_codes):
            assert c.dtype == torch.long and c.shape == (1, n // s)
            assert torch.equal(c[0, :len(f)], torch.from_numpy(f))               # the utterance's own codes
            assert (c[0, len(f):] == fill).all()                                 # then the codec's silence


def test_silence_codes_are_what_the_encoder_gives_for_silence(tiny_codec_dir):
    codec = codecs.load(tiny_codec_dir)
    geo = codec.geometry_at(48000)
    codes = encode_same_length(codec, np.zeros((1, 24 * geo.pad_to), np.float32), "cpu")
    frames = 24 * geo.pad_to // geo.hop
    for c, s, want in zip(codes, geo.strides, silence_codes(codec, geo, "cpu")):
        middle = c[0, frames // 4 // s: 3 * frames // 4 // s]     # away from the edges
        assert (middle == want).all()


def test_batches_are_a_function_of_seed_and_k_for_any_share_or_worker_count(cache):
    shards = open_training_cache(list(sorted(cache.glob("shard-*.zarr"))), None, preload=False)
    n = segment_frames(1.0, shards[0].geometry)
    whole = _batches(shards, n)
    halves = [_batches(shards, n, share=(r, 2)) for r in range(2)]
    for k in (0, 7):
        codes, target, mask = whole[k]
        assert len(codes) == 3 and target.shape[0] == 4
        parts = [h[k] for h in halves]
        assert torch.equal(torch.cat([p[1] for p in parts]), target)
        assert torch.equal(torch.cat([p[2] for p in parts]), mask)
        for i in range(3):
            assert torch.equal(torch.cat([p[0][i] for p in parts]), codes[i])
    assert not torch.equal(whole[0][1], whole[1][1])
    # two forked loader workers reading zarr give the same batches as direct indexing
    loader = torch.utils.data.DataLoader(whole, batch_size=None, num_workers=2)
    for k, (codes, target, mask) in zip(range(6), loader):
        assert torch.equal(target, whole[k][1]) and torch.equal(mask, whole[k][2])
    with pytest.raises(ValueError, match="split evenly"):
        _batches(shards, n, bs=3, share=(0, 2))


def test_validation_segments_cover_every_utterance(cache):
    shards = open_cache(cache)
    n = segment_frames(1.0, shards[0].geometry)
    segs = fixed_segments(shards, n, 10**6)
    codes, target, mask = collate(segs)
    real = sum(int(s.table["samples"].sum()) for s in shards)
    geo = shards[0].geometry
    tails = 7 * geo.quantum * geo.hop_target           # a last window under one quantum is left out
    assert real - tails < int(mask.sum()) <= real      # real samples once each, no padding counted
    assert len(segs) > 7
    assert target.shape == mask.shape and target.dtype == torch.float32


LAMBDAS = {"l1": 1.0, "stft": 1.0, "mel": 1.0}


def _signals(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    t = torch.randn(len(lengths), 1, T, generator=g) * 0.1
    p = t + 0.05 * torch.randn(len(lengths), 1, T, generator=g)
    mask = (torch.arange(T)[None, None] < torch.tensor(lengths)[:, None, None])
    return p * mask + 3.0 * ~mask, t * mask, mask     # garbage in the padded part of pred


def test_masked_loss_equals_loss_of_the_unpadded_items():
    lengths = [4800, 3000, 4800, 1500, 3000]
    p, t, mask = _signals(lengths)
    loss = ReconstructionLoss(SR, LAMBDAS, n_ffts=(256, 512, 1024), n_mels=40)
    total, terms = loss(p, t, mask)
    alone = [loss(p[i:i + 1, :, :n], t[i:i + 1, :, :n]) for i, n in enumerate(lengths)]
    for name in LAMBDAS:
        want = torch.stack([a[1][name] for a in alone]).mean()
        assert terms[name].item() == pytest.approx(want.item(), rel=1e-5), name
    assert total.item() == pytest.approx(torch.stack([a[0] for a in alone]).mean().item(), rel=1e-5)
    # garbage in the padding does not matter; a mask of all True changes nothing
    p2 = p.clone()
    p2[~mask] = -7.0
    assert loss(p2, t, mask)[0].item() == pytest.approx(total.item(), rel=1e-6)
    full = torch.ones_like(mask)
    assert torch.equal(loss(p, t, full)[0], loss(p, t)[0])
    # the gradient never reaches the padding
    p3 = p.clone().requires_grad_(True)
    loss(p3, t, mask)[0].backward()
    assert not p3.grad[~mask].any() and p3.grad[mask].abs().sum() > 0
    with pytest.raises(ValueError, match="prefix"):
        loss(p, t, mask.flip(-1))


def test_loss_is_a_mean_over_items_so_equal_shares_average_back():
    p, t, _ = _signals([4800] * 4, seed=1)
    t[2] *= 20                                       # a loud item: a pooled SC would weight it differently
    loss = ReconstructionLoss(SR, LAMBDAS, n_ffts=(256, 512, 1024), n_mels=40)
    whole = loss(p, t)[1]
    halves = [loss(p[:2], t[:2])[1], loss(p[2:], t[2:])[1]]
    for name in LAMBDAS:
        assert whole[name].item() == pytest.approx((halves[0][name] + halves[1][name]).item() / 2, rel=1e-5)
