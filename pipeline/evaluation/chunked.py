"""Encoding and decoding of inputs of any length in overlapping chunks, in bounded memory.

Each chunk keeps `chunk` finest frames and sees the model's context before and after it, all
multiples of `geo.quantum` (whole codes of the coarsest codebook, whole windows of a blocked
attention), so every chunk is processed exactly as its part of the whole file would be. The
context is the model's own (`model.context(side)`, from its codec family: SNAC's measured, two forward
passes; Mimi's from its transformer's window, which looks back only): how many finest frames
before and after a frame its output depends on (encoder: audio -> latents; decoder: codes ->
audio, which also gives streaming its left and right context). With that context a chunk's kept
part equals the whole-file result up to float rounding (tests/test_infer.py measures it), so
nothing is cross-faded and the seams are not audible; only SNAC's noise blocks, random by design,
differ from one run to the next as they always do.

Memory: the model, one chunk's activations (`chunk` + left + right context frames) and the codes of
the whole input (under 16 bytes per finest frame), whatever the input's length.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CHUNK_SECONDS = 5.0         # audio per chunk at the codec rate (rounded to whole quanta); snac_24khz
                            # needs about 0.2 GB per chunk second on CPU


@dataclass(frozen=True)
class Span:
    """Process finest frames [lo, hi) and keep [a, b) of the result."""
    lo: int
    a: int
    b: int
    hi: int


class Chunker:
    """Chunked encode (a stream of codec-rate blocks -> codes) and decode (codes -> target-rate
    pieces) with a 48 kHz model of any codec family."""

    def __init__(self, model, chunk_seconds: float = CHUNK_SECONDS, context: tuple | None = None):
        """context: ((left, right) of the encoder, (left, right) of the decoder) in finest frames
        (default: the model's own)."""
        g = self.geo = model.geometry
        if not chunk_seconds > 0:
            raise ValueError(f"chunk length must be positive, got {chunk_seconds} s")
        q = g.quantum
        self.model = model
        self.chunk = max(1, round(chunk_seconds * g.codec_rate / g.hop / q)) * q
        if context is None:
            context = model.context("encoder"), model.context("decoder")
        self.enc_context, self.dec_context = (tuple(int(c) for c in side) for side in context)

    def spans(self, frames: int, context: tuple):
        """The chunks of an input of `frames` finest frames (a multiple of geo.quantum), each with
        context = (left, right) frames around it."""
        left, right = context
        for a in range(0, frames, self.chunk):
            b = min(a + self.chunk, frames)
            yield Span(max(0, a - left), a, b, min(frames, b + right))

    @torch.inference_mode()
    def encode(self, blocks) -> tuple[list, int]:
        """Codec-rate audio given as an iterable of 1-D float32 arrays -> (codes as (1, T_i) int64
        CPU tensors, coarsest first, exactly as model.encode of the whole input; input samples)."""
        g, (left, right), hop = self.geo, self.enc_context, self.geo.hop
        dev = next(self.model.parameters()).device
        parts, buf, start, n, a = [], np.zeros(0, np.float32), 0, 0, 0   # buf holds samples [start, n)
        it, done = iter(blocks), False
        while True:
            while not done and n < (a + self.chunk + right) * hop:
                x = next(it, None)
                if x is None:
                    done = True
                else:
                    buf, n = np.concatenate([buf, x]), n + len(x)
            if done and a >= g.frames(n):
                break
            b = min(a + self.chunk, g.frames(n)) if done else a + self.chunk
            lo = max(0, a - left)
            x = torch.from_numpy(buf[lo * hop - start:min(n, (b + right) * hop) - start]).to(dev)
            codes = self.model.encode(x[None, None])
            parts.append([c[:, (a - lo) // st:(b - lo) // st].cpu() for c, st in zip(codes, g.strides)])
            a, keep = b, max(0, b - left) * hop           # the next chunk's input starts at `keep`
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
