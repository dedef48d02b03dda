"""Training data: random frame-aligned segments read from the Zarr cache.

Batch `k` of a run is a pure function of (seed, k): resuming at step k reads exactly the batches
an uninterrupted run would have read, with no sampler state to save, and DataLoader workers can
build batches in any order. With `share=(rank, world)` every rank draws the whole batch's random
choices and reads only its rows, so the batch is the same whatever the number of processes.

Short utterances are used, not dropped: an utterance shorter than a segment gives one segment
from its start, padded; the mask (True on real samples) keeps the padding out of every loss
term. Padded audio is zeros. Padded codes are the codec's code for silence (`silence_codes`,
recorded per shard by precompute): SNAC itself zero-pads its input, so past the end of an
utterance the decoder sees what it would see if the audio went on silent; repeating the last
code instead would hold the final sound (often speech) for the rest of the segment.

Items are `(codes, target, mask)`: codes a list of LongTensor (b, frames_i) per codebook
(coarsest first), target FloatTensor (b, 1, T) in [-1, 1), mask BoolTensor (b, 1, T).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .cache import open_cache


@dataclass
class Pool:
    """Utterances eligible for training and why the others are not."""
    items: list = field(default_factory=list)    # (shard index, utterance index, usable frames, source)
    excluded: dict = field(default_factory=dict)
    padded: int = 0                              # items shorter than one segment (read padded)

    def exclude(self, reason: str):
        self.excluded[reason] = self.excluded.get(reason, 0) + 1


def build_pool(shards, n_frames: int, dataset_ids=None, allow_bandlimited=False) -> Pool:
    """Usable frames of an item: frames wholly covered by real samples (the rest is padding)."""
    pool = Pool()
    for si, sh in enumerate(shards):
        hop_t = sh.geometry.hop_target
        for ui in range(len(sh)):
            usable = int(sh.table["samples"][ui] // hop_t)
            if dataset_ids is not None and int(sh.table["dataset_id"][ui]) not in dataset_ids:
                pool.exclude("dataset_id filtered out")
            elif sh.table["bandlimited"][ui] and not allow_bandlimited:
                pool.exclude("band-limited source")
            elif usable == 0:
                pool.exclude("shorter than one code frame")
            else:
                pool.items.append((si, ui, usable, int(sh.table["source"][ui])))
                pool.padded += usable < n_frames
    return pool


def read_segment(shard, ui: int, offset: int, n: int) -> tuple:
    """Codes, int16 audio and number of real samples of utterance `ui` for finest frames
    [offset, offset + n), padded past the utterance's end (codes: silence, audio: zeros)."""
    coarse, hop_t = max(shard.strides), shard.geometry.hop_target
    have = max(0, min(n, shard.frames(ui) - offset)) // coarse * coarse
    codes, audio = shard.segment(ui, offset, have)
    if have < n:
        codes = [np.concatenate([c, np.full((n - have) // s, fill, np.int64)])
                 for c, s, fill in zip(codes, shard.strides, shard.silence_codes)]
        audio = np.concatenate([audio, np.zeros((n - have) * hop_t, np.int16)])
    real = int(np.clip(int(shard.table["samples"][ui]) - offset * hop_t, 0, have * hop_t))
    return codes, audio, real


class SegmentBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item k is (this rank's share of) batch k; use it with
    DataLoader(batch_size=None). `share=(rank, world)`: rows [rank*b, (rank+1)*b) of the batch,
    b = batch_size // world."""

    def __init__(self, shards, pool: Pool, n_frames: int, batch_size: int, seed: int, length: int,
                 source_weights: list | None = None, share: tuple = (0, 1)):
        if not pool.items:
            raise RuntimeError(f"no training utterances left after filters: {pool.excluded}")
        rank, world = share
        if world < 1 or not 0 <= rank < world or batch_size % world:
            raise ValueError(f"share {share}: batch_size {batch_size} must split evenly over {world} "
                             "processes and the rank lie in 0..world-1")
        self.shards, self.pool, self.n, self.bs, self.seed, self.length = shards, pool, n_frames, batch_size, seed, length
        self.rows = range(rank * batch_size // world, (rank + 1) * batch_size // world)
        self.quantum = shards[0].geometry.quantum   # segment offsets: whole codes, whole attention windows
        for sh in shards:
            sh.codes            # read and verified once here, shared by forked loader workers
        # with weights: pick a manifest by weight, then an utterance of it uniformly
        self.by_source = None
        if source_weights:
            self.by_source = [[i for i, it in enumerate(pool.items) if it[3] == src]
                              for src in range(len(source_weights))]
            empty = [src for src, idx in enumerate(self.by_source) if not idx]
            if empty:
                raise RuntimeError(f"manifests {empty} have no training utterance after filters")
            w = np.asarray(source_weights, dtype=float)
            self.p = w / w.sum()

    def __len__(self):
        return self.length

    def picks(self, rng) -> list:
        """Pool indices of one (whole) batch."""
        if self.by_source is None:
            return list(rng.integers(len(self.pool.items), size=self.bs))
        return [self.by_source[src][rng.integers(len(self.by_source[src]))]
                for src in rng.choice(len(self.p), size=self.bs, p=self.p)]

    def plan(self, k: int) -> list:
        """(pool index, frame offset) of every row of batch k: all the batch's random draws."""
        rng = np.random.default_rng([self.seed, k])
        out = []
        for p in self.picks(rng):
            usable = self.pool.items[p][2]
            slots = max(0, (usable - self.n) // self.quantum) + 1
            out.append((p, int(rng.integers(slots)) * self.quantum))
        return out

    def __getitem__(self, k: int):
        plan = self.plan(k)
        segs = []
        for p, offset in (plan[r] for r in self.rows):
            si, ui, _, _ = self.pool.items[p]
            segs.append(read_segment(self.shards[si], ui, offset, self.n))
        return collate(segs)


def fixed_segments(shards, n_frames: int, limit: int) -> list:
    """Deterministic validation segments: consecutive aligned windows of each held-out utterance,
    the last one padded; every utterance gives at least one, later windows at least a quantum
    of real frames."""
    out = []
    for sh in shards:
        hop_t, q = sh.geometry.hop_target, sh.geometry.quantum
        for ui in range(len(sh)):
            real = -(-int(sh.table["samples"][ui]) // hop_t)
            for off in range(0, real, n_frames):
                if off and real - off < q:
                    break
                out.append(read_segment(sh, ui, off, n_frames))
                if len(out) >= limit:
                    return out
    return out


def collate(segs) -> tuple:
    """(codes, int16 audio, real samples) segments -> (codes, target, mask) tensors."""
    codes = [torch.from_numpy(np.stack([s[0][i] for s in segs])) for i in range(len(segs[0][0]))]
    audio = np.stack([s[1] for s in segs])[:, None]
    target = np.multiply(audio, np.float32(1 / 32768), dtype=np.float32)
    mask = np.arange(audio.shape[-1]) < np.array([s[2] for s in segs])[:, None, None]
    return codes, torch.from_numpy(target), torch.from_numpy(mask)


def open_training_cache(paths, expect: dict, preload="auto"):
    """The cache's shards, verified at open (see pipeline.data.cache); audio in memory when
    `preload` (auto: under 2 GiB), else read from zarr segment by segment."""
    shards = open_cache(paths, preload=False, expect=expect)
    if preload == "auto":
        preload = sum(s.audio_off[-1] for s in shards) * 2 < 2 * 1024**3   # < 2 GiB of int16
    for sh in shards:
        if preload:
            sh.load_audio()
        sh.codes
    return shards
