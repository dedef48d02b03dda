"""Encoding and decoding of inputs of any length in overlapping chunks, in bounded memory.

Each chunk keeps `chunk` finest frames and sees `context` more on each side, all multiples of
`geo.quantum` (whole codes of the coarsest codebook, whole windows of SNAC's local attention), so
every chunk is processed exactly as its part of the whole file would be. The context is the
model's own reach, measured once per model (two forward passes): how many finest frames on either
side a change to one quantum block moves the output (encoder: audio -> latents, the quantizer
working within quantum blocks; decoder: codes -> audio, `codes_reach`, which also gives streaming
its left and right context separately). With that context a chunk's kept part equals the
whole-file result up to float rounding (tests/test_infer.py measures it), so nothing is
cross-faded and the seams are not audible; only SNAC's noise blocks, random by design, differ
from one run to the next as they always do.

Memory: the model, one chunk's activations (`chunk + 2 context` frames) and the codes of the whole
input (under 16 bytes per finest frame), whatever the input's length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..model.codec import noise_disabled

CHUNK_SECONDS = 5.0         # audio per chunk at the codec rate (rounded to whole quanta); snac_24khz
                            # needs about 0.2 GB per chunk second on CPU


@dataclass(frozen=True)
class Span:
    """Process finest frames [lo, hi) and keep [a, b) of the result."""
    lo: int
    a: int
    b: int
    hi: int


@torch.inference_mode()
def reach(fn, channels: int, per_frame: int, quantum: int, device, floor: float = 1e-6) -> int:
    """Finest frames of context each side beyond which `fn` (noise off) does not look, rounded up
    to whole quanta: the spread of a change to one aligned quantum block of a random input into the
    output, counting output samples changed by more than `floor` times the largest change. `fn`
    maps (B, channels, frames * per_frame) to a sequence with a whole number of samples per frame.
    Two forward passes in one batch: no autograd graph, so cheap even for snac_24khz."""
    def probe(frames, m, g):
        x = torch.randn(1, channels, frames * per_frame, generator=g)
        moved = x.clone()
        moved[..., m * per_frame:(m + quantum) * per_frame] += torch.randn(channels, quantum * per_frame, generator=g)
        return fn(torch.cat([x, moved]).to(device))
    return max(_sides(probe, quantum, floor))


@torch.inference_mode()
def codes_reach(model, floor: float = 1e-6) -> tuple[int, int]:
    """(left, right): finest frames of codes before and after an output frame that its audio
    depends on, each rounded up to whole quanta, measured from codes to audio through
    `model.decode` (noise off) as `reach` measures: new random codes in one aligned quantum block
    of random codes, and how far before the block (right context: what the decoder looks ahead)
    and after it (left context: what it looks back) the audio moves. Needs only model.geometry
    and model.decode, so it holds for any codec family (causal decoders: right context 0)."""
    geo = model.geometry
    device = next(model.parameters()).device
    size, q = geo.codebook_size, geo.quantum

    def probe(frames, m, g):
        codes, moved = [], []
        for s in geo.strides:
            c = torch.randint(0, size, (1, frames // s), generator=g)
            d = c.clone()
            d[:, m // s:(m + q) // s] = (d[:, m // s:(m + q) // s]
                                        + torch.randint(1, size, (1, q // s), generator=g)) % size
            codes.append(c)
            moved.append(d)
        return model.decode([torch.cat(pair).to(device) for pair in zip(codes, moved)])
    with noise_disabled(model):
        after, before = _sides(probe, q, floor)
    return after, before


def _sides(probe, quantum: int, floor: float) -> tuple[int, int]:
    """(after, before): how many finest frames after and before a changed quantum block the output
    moves by more than `floor` times its largest change, rounded up to quanta. `probe(frames, m,
    generator)` returns the outputs (2, C, frames * samples_per_frame) of an input and of the same
    input changed in frames [m, m + quantum); the input doubles until the change stays inside it."""
    frames, g = 8 * quantum, torch.Generator().manual_seed(0)
    while frames <= 1024 * quantum:
        m = frames // 2 // quantum * quantum
        y = probe(frames, m, g).float().cpu()
        d = (y[0] - y[1]).abs().amax(0)
        hit = torch.nonzero(d > floor * d.max()).flatten() // (y.shape[-1] // frames)
        lo, hi = int(hit.min()), int(hit.max())
        if lo > 0 and hi < frames - 1:
            up = lambda n: math.ceil(max(n, 0) / quantum) * quantum
            return up(hi - (m + quantum - 1)), up(m - lo)
        frames *= 2                     # the change reached the edges: measure on a longer input
    raise RuntimeError(f"the model's receptive field exceeds {frames // 2} frames; cannot chunk it")


class Chunker:
    """Chunked encode (a stream of codec-rate blocks -> codes) and decode (codes -> target-rate
    pieces) with a SNAC48 model."""

    def __init__(self, model, chunk_seconds: float = CHUNK_SECONDS, context: tuple | None = None):
        g = self.geo = model.geometry
        if not chunk_seconds > 0:
            raise ValueError(f"chunk length must be positive, got {chunk_seconds} s")
        q = g.quantum
        self.model = model
        self.chunk = max(1, round(chunk_seconds * g.codec_rate / g.hop / q)) * q
        if context is None:
            dev = next(model.parameters()).device
            with noise_disabled(model):     # (not re-entrant: codes_reach disables noise itself)
                enc = reach(model.encoder, 1, g.hop, q, dev)
            context = (enc, max(codes_reach(model)))
        self.enc_context, self.dec_context = context

    def spans(self, frames: int, context: int):
        """The chunks of an input of `frames` finest frames (a multiple of geo.quantum)."""
        for a in range(0, frames, self.chunk):
            b = min(a + self.chunk, frames)
            yield Span(max(0, a - context), a, b, min(frames, b + context))

    @torch.inference_mode()
    def encode(self, blocks) -> tuple[list, int]:
        """Codec-rate audio given as an iterable of 1-D float32 arrays -> (codes as (1, T_i) int64
        CPU tensors, coarsest first, exactly as model.encode of the whole input; input samples)."""
        g, ctx, hop = self.geo, self.enc_context, self.geo.hop
        dev = next(self.model.parameters()).device
        parts, buf, start, n, a = [], np.zeros(0, np.float32), 0, 0, 0   # buf holds samples [start, n)
        it, done = iter(blocks), False
        while True:
            while not done and n < (a + self.chunk + ctx) * hop:
                x = next(it, None)
                if x is None:
                    done = True
                else:
                    buf, n = np.concatenate([buf, x]), n + len(x)
            if done and a >= g.frames(n):
                break
            b = min(a + self.chunk, g.frames(n)) if done else a + self.chunk
            lo = max(0, a - ctx)
            x = torch.from_numpy(buf[lo * hop - start:min(n, (b + ctx) * hop) - start]).to(dev)
            codes = self.model.encode(x[None, None])
            parts.append([c[:, (a - lo) // st:(b - lo) // st].cpu() for c, st in zip(codes, g.strides)])
            a, keep = b, max(0, b - ctx) * hop            # the next chunk's input starts at `keep`
            buf, start = buf[keep - start:], keep
        if n == 0:
            raise ValueError("zero-length audio")
        return [torch.cat(cs, dim=1) for cs in zip(*parts)], n

    @torch.inference_mode()
    def decode(self, codes: list):
        """Codes as (1, T_i) int64 tensors (T_0 * stride_0 finest frames, a multiple of geo.quantum)
        -> target-rate 1-D float32 arrays, one per chunk, in order."""
        g, dev = self.geo, next(self.model.parameters()).device
        frames = codes[-1].shape[-1] * g.strides[-1]
        for s in self.spans(frames, self.dec_context):
            part = [c[:, s.lo // st:s.hi // st].to(dev) for c, st in zip(codes, g.strides)]
            y = self.model.decode(part)[0, 0]
            yield y[(s.a - s.lo) * g.hop_target:(s.b - s.lo) * g.hop_target].float().cpu().numpy()
