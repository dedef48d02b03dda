"""Alignment checks of a cache against the codec that built it (the bug that ruined the
original scripts: codes and audio that silently do not belong together).

For random utterances and random segment offsets aligned to the coarsest stride:
  slicing     codes of the segment == whole-utterance codes sliced at offset/stride_i, and the
              target == cached audio at [offset*hop_t, (offset+n)*hop_t);
  re-encoding the target around the segment, brought to the codec rate and encoded again,
              reproduces the segment's codes;
  decoding    (noise off) decoding the codes around the segment reproduces the segment's part of
              the whole-utterance decode.
"Around": the segment with the context the codec's encoder (or decoder) reads on either side
(`codec.context(side)`, from the codec's family: measured for SNAC, from the transformer's window for
Mimi, whose encoder looks only back), clipped to the utterance and aligned to whole quanta, so
every code and sample compared was computed from all it depends on. The codec comes in as an
object (the data code imports no model code): `cache-info --check --codec DIR` loads it and runs
the checks on every shard; `verdict` says which figures fail.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import audio as A

# a right cache re-encodes its codes with agreement (kappa) >= 0.95 (near-ties flip after int16 and
# resampling); a wrong hop (882 for 1024) gives 0.52-0.85 on the tests' tiny random codecs (seeds
# 7-12), whose slowly changing codes agree a lot by chance. Deterministic decodes agree to float error.
MIN_REENCODE_MATCH, MAX_DECODE_ERR = 0.9, 1e-3
INTERIOR_CODES = 8   # coarsest codes per check, by default


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two label sequences: 1 when equal, about 0 when they agree only as often
    as their label frequencies make chance agreement (a codec that emits few distinct codes
    matches a misaligned crop by chance most of the time; kappa does not credit that)."""
    observed = float(np.mean(a == b))
    labels, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    pa, pb = (np.bincount(i, minlength=len(labels)) / len(a) for i in np.split(inverse, 2))
    chance = float(pa @ pb)
    return 1.0 if chance >= 1.0 else (observed - chance) / (1.0 - chance)


def around(off: int, n: int, context: tuple, frames: int, q: int) -> tuple[int, int]:
    """Finest frames [lo, hi) holding [off, off + n) and `context` (left, right) more on either
    side, plus a quantum of slack (resampling's filter at a cut), on whole quanta, within [0, frames)."""
    left, right = context
    lo = max(0, (off - left - q) // q * q)
    hi = min(frames, math.ceil((off + n + right + q) / q) * q)
    return lo, hi


@torch.no_grad()
def check_shard(shard, codec, n_checks: int = 8, seg_coarse: int | None = None, seed: int = 0) -> dict:
    """Run the three checks on `n_checks` random (utterance, offset) pairs of segments of
    `seg_coarse` coarsest codes (default: INTERIOR_CODES, or the longest utterance). `codec`: the
    codec the cache claims (a loaded one: encode, decode, context, noise_disabled). Returns
    slicing_ok, decode_max_err (the worst) and reencode_match: the agreement of the cached and
    re-encoded codes pooled over all checks and levels (`reencode_compared` codes). Pooled, because
    one near-tie flip among 4 coarse codes is 25 %."""
    fp, rng = shard.fingerprint, np.random.default_rng(seed)
    geo = shard.geometry
    strides, hop, hop_t, coarse, q = geo.strides, geo.hop, geo.hop_target, geo.coarsest, geo.quantum
    ctx = {side: codec.context(side) for side in ("encoder", "decoder")}
    if seg_coarse is None:
        longest = max((shard.frames(i) for i in range(len(shard))), default=0) // coarse
        seg_coarse = max(1, min(INTERIOR_CODES, longest))
    n = seg_coarse * coarse
    out = {"checks": 0, "slicing_ok": True, "reencode_match": 1.0, "decode_max_err": 0.0}
    cached, again = [], []
    candidates = [i for i in range(len(shard)) if shard.frames(i) >= n]
    for _ in range(n_checks if candidates else 0):
        i = int(rng.choice(candidates))
        frames = shard.frames(i)
        off = int(rng.integers((frames - n) // coarse + 1)) * coarse
        full_codes, full_audio = shard.utterance(i)
        codes, audio = shard.segment(i, off, n)
        ok = all(np.array_equal(c, f[off // s:(off + n) // s]) for c, f, s in zip(codes, full_codes, strides))
        ok &= np.array_equal(audio, full_audio[off * hop_t:(off + n) * hop_t])
        out["slicing_ok"] &= bool(ok)
        # re-encoding: the target around the segment -> codec rate -> encode -> the segment's codes
        lo, hi = around(off, n, ctx["encoder"], frames, q)
        x = A.resample(full_audio[lo * hop_t:hi * hop_t].astype(np.float32) / 32768.0, fp["target_rate"], fp["codec_rate"])
        re = codec.encode(torch.from_numpy(x)[None, None])
        for level, (c, r, s) in enumerate(zip(codes, re, strides)):   # codes of different levels: different labels
            cached.append(level * geo.codebook_size + c.astype(np.int64))
            again.append(level * geo.codebook_size + r[0, (off - lo) // s:(off - lo + n) // s].cpu().numpy())
        # decoding: the codes around the segment vs the whole decode, noise off
        lo, hi = around(off, n, ctx["decoder"], frames, q)
        with codec.noise_disabled():
            whole = codec.decode([torch.from_numpy(c)[None] for c in full_codes])[0, 0]
            part = codec.decode([torch.from_numpy(c[lo // s:hi // s])[None] for c, s in zip(full_codes, strides)])[0, 0]
        err = (part[(off - lo) * hop:(off - lo + n) * hop] - whole[off * hop:(off + n) * hop]).abs().max()
        out["decode_max_err"] = max(out["decode_max_err"], float(err))
        out["checks"] += 1
    if cached:
        out["reencode_match"] = agreement(np.concatenate(cached), np.concatenate(again))
    out.update(reencode_compared=sum(map(len, cached)), segment_frames=n,
               encoder_context=list(ctx["encoder"]), decoder_context=list(ctx["decoder"]))
    return out


def verdict(r: dict) -> list:
    """What is wrong with `check_shard`'s figures (empty: the cache and the codec line up)."""
    out = []
    if not r["reencode_compared"]:
        out.append(f"no utterance holds a segment of {r['segment_frames']} frames: nothing was checked")
    if not r["slicing_ok"]:
        out.append("sliced codes or audio differ from the whole utterance's")
    if r["reencode_match"] < MIN_REENCODE_MATCH:
        out.append(f"re-encoding the targets matches only {r['reencode_match']:.2f} of the cached codes "
                   f"(< {MIN_REENCODE_MATCH}): codes and audio do not belong together (wrong hop or codec?)")
    if r["decode_max_err"] > MAX_DECODE_ERR:
        out.append(f"decoding sliced codes differs from the whole decode by {r['decode_max_err']:.2e} (> {MAX_DECODE_ERR})")
    return out
