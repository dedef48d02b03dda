"""Alignment checks of a cache against the codec that built it (the bug that ruined the
original scripts: codes and audio that silently do not belong together).

For random utterances and random segment offsets aligned to the coarsest stride:
  slicing     codes of the segment == whole-utterance codes sliced at offset/stride_i, and the
              target == cached audio at [offset*hop_t, (offset+n)*hop_t);
  re-encoding the target crop brought to the codec rate and encoded again reproduces the
              sliced codes away from the edges (by the encoder's receptive field);
  decoding    (noise off) decoding the sliced codes matches the same crop of decoding the
              whole utterance, away from the edges (by the decoder's receptive field).
`python -m pipeline cache-info --check --codec DIR` runs them on every shard; `verdict` says
which figures fail.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import audio as A
from ..model.codec import noise_disabled

# a right cache re-encodes its interior codes with agreement (kappa) >= 0.95 (near-ties flip after
# int16 and resampling); a wrong hop (882 for 1024) gives 0.52-0.85 on the tests' tiny random
# codecs (seeds 7-12), whose slowly changing codes agree a lot by chance. Deterministic decodes of
# a crop agree to float error.
MIN_REENCODE_MATCH, MAX_DECODE_ERR = 0.9, 1e-3
INTERIOR_CODES = 8   # coarsest codes per check away from the edges, by default


def receptive_field(fn, channels: int, length: int) -> int:
    """Input samples that one output position in the middle depends on (measured by autograd)."""
    x = torch.zeros(1, channels, length, requires_grad=True)
    y = fn(x)
    y[..., y.shape[-1] // 2].sum().backward()
    nz = torch.nonzero(x.grad.abs().sum(1)[0]).flatten()
    return int(nz.max() - nz.min() + 1) if len(nz) else 0


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two label sequences: 1 when equal, about 0 when they agree only as often
    as their label frequencies make chance agreement (a codec that emits few distinct codes
    matches a misaligned crop by chance most of the time; kappa does not credit that)."""
    observed = float(np.mean(a == b))
    labels, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    pa, pb = (np.bincount(i, minlength=len(labels)) / len(a) for i in np.split(inverse, 2))
    chance = float(pa @ pb)
    return 1.0 if chance >= 1.0 else (observed - chance) / (1.0 - chance)


@functools.lru_cache(maxsize=2)
def _receptive_fields(codec, hop: int) -> tuple[int, int]:
    """(encoder, decoder) receptive fields in codec-rate samples; measured once per codec, not
    once per shard (`cache-info --check` checks every shard with one codec)."""
    with torch.enable_grad():
        return (receptive_field(codec.encoder, 1, 64 * hop),
                receptive_field(lambda z: codec.decoder(z), codec.latent_dim, 64) * hop)


@torch.no_grad()
def check_shard(shard, codec, n_checks: int = 8, seg_coarse: int | None = None, seed: int = 0) -> dict:
    """Run the three checks on `n_checks` random (utterance, offset) pairs of `seg_coarse` coarsest
    codes (default: enough for INTERIOR_CODES of them away from the encoder's edges, or the
    longest utterance). Returns slicing_ok, decode_max_err (the worst) and reencode_match: the
    agreement of the cached and re-encoded interior codes pooled over all checks and levels
    (`reencode_compared` codes). Pooled, because one near-tie flip among 4 coarse codes is 25 %."""
    fp, rng = shard.fingerprint, np.random.default_rng(seed)
    strides, hop, hop_t = fp["strides"], fp["hop"], fp["hop_target"]
    coarse = max(strides)
    enc_rf, dec_rf = _receptive_fields(codec, hop)
    margins = [math.ceil(enc_rf / (2 * hop * s)) + 1 for s in strides]
    if seg_coarse is None:
        longest = max((shard.frames(i) for i in range(len(shard))), default=0) // coarse
        seg_coarse = max(1, min(2 * margins[strides.index(coarse)] + INTERIOR_CODES, longest))
    out = {"checks": 0, "slicing_ok": True, "reencode_match": 1.0, "decode_max_err": 0.0}
    cached, again = [], []
    candidates = [i for i in range(len(shard)) if shard.frames(i) >= seg_coarse * coarse]
    for _ in range(n_checks if candidates else 0):
        i = int(rng.choice(candidates))
        frames = shard.frames(i)
        n = seg_coarse * coarse
        off = int(rng.integers((frames - n) // coarse + 1)) * coarse
        full_codes, full_audio = shard.utterance(i)
        codes, audio = shard.segment(i, off, n)
        ok = all(np.array_equal(c, f[off // s:(off + n) // s]) for c, f, s in zip(codes, full_codes, strides))
        ok &= np.array_equal(audio, full_audio[off * hop_t:(off + n) * hop_t])
        out["slicing_ok"] &= bool(ok)
        # re-encoding: target crop -> codec rate -> encode; compare away from the edges
        x = A.resample(audio.astype(np.float32) / 32768.0, fp["target_rate"], fp["codec_rate"])
        re = codec.encode(torch.from_numpy(x)[None, None])
        for level, (c, r, m) in enumerate(zip(codes, re, margins)):
            if len(c) > 2 * m:   # codes of different levels are different labels
                cached.append(level * codec.codebook_size + c[m:len(c) - m].astype(np.int64))
                again.append(level * codec.codebook_size + r[0, m:len(c) - m].numpy())
        # decoding: sliced codes vs crop of the whole decode, noise off
        with noise_disabled(codec):
            whole = codec.decode([torch.from_numpy(c)[None] for c in full_codes])[0, 0]
            part = codec.decode([torch.from_numpy(c)[None] for c in codes])[0, 0]
        m = dec_rf // 2 + hop
        crop = whole[off * hop:(off + n) * hop]
        if len(part) > 2 * m:
            out["decode_max_err"] = max(out["decode_max_err"], float((part[m:-m] - crop[m:-m]).abs().max()))
        out["checks"] += 1
    if cached:
        out["reencode_match"] = agreement(np.concatenate(cached), np.concatenate(again))
    out.update(reencode_compared=sum(map(len, cached)), encoder_rf=enc_rf, decoder_rf=dec_rf)
    return out


def verdict(r: dict) -> list:
    """What is wrong with `check_shard`'s figures (empty: the cache and the codec line up)."""
    out = []
    if not r["reencode_compared"]:
        out.append("no utterance is long enough to re-encode a code away from the encoder's edges "
                   f"(its receptive field is {r['encoder_rf']} samples): nothing was checked")
    if not r["slicing_ok"]:
        out.append("sliced codes or audio differ from the whole utterance's")
    if r["reencode_match"] < MIN_REENCODE_MATCH:
        out.append(f"re-encoding the targets matches only {r['reencode_match']:.2f} of the cached codes "
                   f"(< {MIN_REENCODE_MATCH}): codes and audio do not belong together (wrong hop or codec?)")
    if r["decode_max_err"] > MAX_DECODE_ERR:
        out.append(f"decoding sliced codes differs from the whole decode by {r['decode_max_err']:.2e} (> {MAX_DECODE_ERR})")
    return out
