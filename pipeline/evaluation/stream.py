"""Streaming decode: codes that arrive a few frames at a time -> audio as soon as it is final,
with no seams.

The decoder's output at finest frame f depends on the codes of frames [f - left, f + right]
(`model.context("decoder")`, from the codec family, in whole quanta). So after codes up to
frame n have arrived, the audio of frames before n - right is final: a push decodes the codes of
[done - left, n) and returns the audio of [done, n - right), where `done` is what earlier pushes
returned. Every decoded window starts and ends on quantum boundaries (whole coarsest codes, whole
attention windows), so each returned piece is exactly what the whole decode computes there, up to
float rounding; `flush` decodes the last window to the true end. Concatenated, the pieces are
`model.decode` of all the codes (noise blocks off; with them on, noise is random in every decode).

Latency: audio lags the codes by `right` finest frames (the decoder's look-ahead), plus the time
of one decode of left + push + right frames. Memory: the codes of the last left + right frames
(plus one push), whatever the stream's length.

Needs only model.geometry and model.decode, so it works for every codec family the pipeline
decodes (a causal decoder has right = 0: no lag beyond the push). Mimi's decoder looks back through
its transformer's sliding window (kyutai/mimi: 996 frames, 80 s, a bound from its config): a
stream holds that many frames and decodes them again at every push, exact but heavy; the tiny
test Mimi's is 125 frames.
"""
from __future__ import annotations

import torch

from .codes import as_tensors


class StreamClosed(RuntimeError):
    pass


class Stream:
    """One stream of B clips decoded together (a batch of requests that advance in step; start
    one Stream per request for requests that do not). See the module docstring."""

    def __init__(self, model, context: tuple[int, int], batch: int = 1):
        if not (isinstance(batch, int) and batch >= 1):
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        self.model, self.geo, self.batch = model, model.geometry, batch
        self.left, self.right = (int(c) for c in context)
        self.device = next(model.parameters()).device
        self.codes = None        # (B, T_i) per codebook, finest frames [start, received)
        self.start = self.received = self.done = 0      # done: frames whose audio was returned
        self.closed = False

    @property
    def held_frames(self) -> int:
        """Finest frames of codes this stream keeps (at most left + right + one push)."""
        return self.received - self.start

    @property
    def lag_seconds(self) -> float:
        """How far the returned audio trails the codes pushed (the decoder's right context)."""
        return self.right * self.geo.hop / self.geo.codec_rate

    @torch.inference_mode()
    def push(self, codes) -> torch.Tensor:
        """The next whole quanta of codes (SNAC's layout: one (B, T_i) integer tensor per codebook,
        coarsest first) -> the audio that became final, (B, 1, samples) at the target rate (often
        0 samples for the first pushes, until `right` frames have arrived)."""
        if self.closed:
            raise StreamClosed("this stream was flushed; open a new one for more codes")
        codes = as_tensors(codes, self.geo, self.device)
        if codes[0].shape[0] != self.batch:
            raise ValueError(f"codes: batch of {codes[0].shape[0]} rows, the stream was opened for "
                             f"{self.batch} (stream(batch={self.batch}))")
        self.codes = codes if self.codes is None else [torch.cat(p, dim=1) for p in zip(self.codes, codes)]
        self.received += codes[-1].shape[-1] * self.geo.strides[-1]
        return self._emit(self.received - self.right)

    @torch.inference_mode()
    def flush(self) -> torch.Tensor:
        """The rest of the audio, up to the end of the codes pushed; the stream is closed after."""
        if self.closed:
            raise StreamClosed("this stream was already flushed")
        out = self._emit(self.received)
        self.closed, self.codes = True, None
        return out

    def _emit(self, end: int) -> torch.Tensor:
        g = self.geo
        if end <= self.done:
            return torch.zeros(self.batch, 1, 0, device=self.device)
        lo = self.start                             # max(0, done - left): whole quanta
        y = self.model.decode(self.codes)
        out = y[..., (self.done - lo) * g.hop_target:(end - lo) * g.hop_target].clone()
        self.done = end
        keep = max(0, self.done - self.left)        # the next window's first frame
        self.codes = [c[:, (keep - self.start) // s:] for c, s in zip(self.codes, g.strides)]
        self.start = keep
        return out
