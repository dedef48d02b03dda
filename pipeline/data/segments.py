"""Training data: random frame-aligned segments read from the Zarr cache.

Batch `k` of a run is a pure function of (seed, k): resuming at step k reads exactly the batches
an uninterrupted run would have read, with no sampler state to save, and DataLoader workers can
build batches in any order.
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

    def exclude(self, reason: str):
        self.excluded[reason] = self.excluded.get(reason, 0) + 1


def segment_frames(seconds: float, geo) -> int:
    """Segment length in finest frames: a whole number (at least one) of `geo.quantum`, so every
    codebook gets whole codes and SNAC's local attention whole windows."""
    per_second = geo.target_rate / geo.hop_target
    return max(1, round(seconds * per_second / geo.quantum)) * geo.quantum


def build_pool(shards, n_frames: int, dataset_ids=None, allow_bandlimited=False) -> Pool:
    pool = Pool()
    for si, sh in enumerate(shards):
        hop_t = sh.geometry.hop_target
        for ui in range(len(sh)):
            if dataset_ids is not None and int(sh.table["dataset_id"][ui]) not in dataset_ids:
                pool.exclude("dataset_id filtered out")
            elif sh.table["bandlimited"][ui] and not allow_bandlimited:
                pool.exclude("band-limited source")
            elif sh.table["samples"][ui] // hop_t < n_frames:
                pool.exclude("shorter than one segment")
            else:
                pool.items.append((si, ui, int(sh.table["samples"][ui] // hop_t), int(sh.table["source"][ui])))
    return pool


class SegmentBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item k is the whole batch k (use with DataLoader(batch_size=None))."""

    def __init__(self, shards, pool: Pool, n_frames: int, batch_size: int, seed: int, length: int,
                 source_weights: list | None = None):
        if not pool.items:
            raise RuntimeError(f"no training utterances left after filters: {pool.excluded}")
        self.shards, self.pool, self.n, self.bs, self.seed, self.length = shards, pool, n_frames, batch_size, seed, length
        self.quantum = shards[0].geometry.quantum   # segment offsets: whole codes, whole attention windows
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
        """Pool indices of one batch."""
        if self.by_source is None:
            return list(rng.integers(len(self.pool.items), size=self.bs))
        return [self.by_source[src][rng.integers(len(self.by_source[src]))]
                for src in rng.choice(len(self.p), size=self.bs, p=self.p)]

    def __getitem__(self, k: int):
        rng = np.random.default_rng([self.seed, k])
        codes, audio = [], []
        for p in self.picks(rng):
            si, ui, usable, _ = self.pool.items[p]
            slots = (usable - self.n) // self.quantum + 1
            offset = int(rng.integers(slots)) * self.quantum
            c, a = self.shards[si].segment(ui, offset, self.n)
            codes.append(c)
            audio.append(a)
        codes = [torch.from_numpy(np.stack([c[i] for c in codes])) for i in range(len(codes[0]))]
        target = torch.from_numpy(np.stack(audio).astype(np.float32) / 32768.0)[:, None]
        return codes, target


def fixed_segments(shards, n_frames: int, limit: int) -> list:
    """Deterministic validation segments: consecutive aligned windows of each held-out utterance."""
    out = []
    for sh in shards:
        hop_t = sh.geometry.hop_target
        for ui in range(len(sh)):
            usable = int(sh.table["samples"][ui] // hop_t)
            for off in range(0, usable - n_frames + 1, n_frames):
                out.append(sh.segment(ui, off, n_frames))
                if len(out) >= limit:
                    return out
    return out


def collate(segs) -> tuple:
    codes = [torch.from_numpy(np.stack([c[i] for c, _ in segs])) for i in range(len(segs[0][0]))]
    target = torch.from_numpy(np.stack([a for _, a in segs]).astype(np.float32) / 32768.0)[:, None]
    return codes, target


def open_training_cache(paths, expect: dict, preload="auto"):
    shards = open_cache(paths, preload=False, expect=expect)
    if preload == "auto":
        preload = sum(s.audio_off[-1] for s in shards) * 2 < 2 * 1024**3   # < 2 GiB of int16
    return open_cache(paths, preload=True, expect=expect) if preload else shards
