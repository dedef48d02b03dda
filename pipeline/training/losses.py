"""Training losses for the 48 kHz decoder, in torch.

Losses (``torch.nn.Module``, differentiable, return tensors):

* `MultiResolutionSTFTLoss` -- spectral convergence + log-magnitude L1, averaged over
  several STFT resolutions (the Parallel-WaveGAN formulation).
* `MelL1Loss` -- L1 between log10 mel magnitude spectrograms.
* `ReconstructionLoss` -- lambda-weighted sum of waveform L1, MR-STFT and mel terms, each the
  mean over items of per-item losses, padding masked out; returns ``(total, {name: term})`` so
  the trainer can log every term.

The metrics (pipeline.training.metrics) reuse the STFT and mel losses; both use pipeline.training.spectral.

Conventions shared by everything here:

* Audio is ``(B, 1, T)`` or ``(B, T)``; metrics (and losses) also take ``(T,)``. ``pred`` and
  ``target`` must have the same shape.
* No sample rate is hard-coded: every rate-dependent piece takes ``sample_rate``.
* Spectral work always runs in float32 with autocast disabled, so the losses are safe inside
  ``torch.autocast(..., dtype=torch.bfloat16)``: inputs are cast with ``.float()`` and the
  returned loss is float32.
* Short signals: an STFT size larger than the signal is clamped to the largest power of two
  that fits (see `spectral.fit_n_fft`); the mel transform zero-pads signals shorter than its
  reflect padding allows.

The STFT, mel and shape helpers are pipeline.training.spectral's, shared with the metrics.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..settings import TRAIN_DEFAULTS
from .spectral import as_batch, fit_n_fft, magnitude, mel, no_autocast, pair, reflect_pad

__all__ = [
    "MultiResolutionSTFTLoss",
    "MelL1Loss",
    "ReconstructionLoss",
    "Padding",
]

LOSS_TERMS = ("l1", "stft", "mel")


# --------------------------------------------------------------------------- losses

class MultiResolutionSTFTLoss(torch.nn.Module):
    """Mean over STFT resolutions of (spectral convergence + log-magnitude L1).

    For each ``n_fft`` (window = Hann of length ``n_fft``, hop = ``max(1, int(n_fft * hop_ratio))``)::

        |X| = sqrt(max(re^2 + im^2, eps))
        sc  = ||  |X_t| - |X_p|  ||_F / || |X_t| ||_F        (Frobenius over the whole batch)
        mag = mean | log|X_t| - log|X_p| |

    and the loss is ``mean_r(sc_r + mag_r)`` -- the Parallel-WaveGAN formulation (Yamamoto et
    al. 2020). Identical inputs give exactly 0.

    Hann windows are non-persistent buffers (follow ``.to(device)``, not saved in state_dict).
    If ``n_fft`` exceeds the signal length ``T`` it is clamped to the largest power of two
    ``<= T`` for that call (window built on the fly, hop scaled with it).
    """

    def __init__(self, n_ffts=tuple(TRAIN_DEFAULTS["n_ffts"]), hop_ratio: float = 0.25, eps: float = 1e-7):
        super().__init__()
        n_ffts = tuple(int(n) for n in n_ffts)
        if not n_ffts or any(n < 2 for n in n_ffts):
            raise ValueError(f"n_ffts must be a non-empty list of sizes >= 2, got {n_ffts}")
        if not 0.0 < hop_ratio <= 1.0:
            raise ValueError(f"hop_ratio must be in (0, 1], got {hop_ratio}")
        self.n_ffts = n_ffts
        self.hop_ratio = float(hop_ratio)
        self.eps = float(eps)
        for n in sorted(set(n_ffts)):
            self.register_buffer(f"window_{n}", torch.hann_window(n), persistent=False)

    def _window(self, n_fft: int, like: torch.Tensor) -> torch.Tensor:
        w = getattr(self, f"window_{n_fft}", None)
        if w is None:  # a clamped size: build it on the fly
            w = torch.hann_window(n_fft, device=like.device)
        return w.to(device=like.device, dtype=torch.float32)

    def _mags(self, p: torch.Tensor, t: torch.Tensor):
        """(|X_p|, |X_t|) of float32 (B, T) audio for each resolution."""
        for n_fft in self.n_ffts:
            n = fit_n_fft(n_fft, p.shape[-1])
            hop = max(1, int(n * self.hop_ratio))
            w = self._window(n, p)
            yield magnitude(p, n, hop, w, self.eps), magnitude(t, n, hop, w, self.eps)

    def forward(self, pred, target) -> torch.Tensor:
        p, t = pair(pred, target)
        with no_autocast(p):
            total = p.new_zeros((), dtype=torch.float32)
            for mp, mt in self._mags(p.float(), t.float()):
                sc = torch.linalg.vector_norm(mt - mp) / torch.linalg.vector_norm(mt)
                total = total + sc + F.l1_loss(torch.log(mp), torch.log(mt))
            return total / len(self.n_ffts)

    def items(self, pred, target) -> torch.Tensor:
        """The loss of each item on its own, shape (B,): spectral convergence per item, not
        pooled over the batch as in `forward`."""
        p, t = pair(pred, target)
        with no_autocast(p):
            total = p.new_zeros(p.shape[0], dtype=torch.float32)
            for mp, mt in self._mags(p.float(), t.float()):
                sc = torch.linalg.vector_norm(mt - mp, dim=(1, 2)) / torch.linalg.vector_norm(mt, dim=(1, 2))
                total = total + sc + (torch.log(mp) - torch.log(mt)).abs().mean(dim=(1, 2))
            return total / len(self.n_ffts)


class MelL1Loss(torch.nn.Module):
    """L1 between ``log10(mel + eps)`` of pred and target.

    Uses ``torchaudio.transforms.MelSpectrogram`` with ``power=1`` (magnitude mel), Hann window,
    ``center=True``, HTK mel scale, no filter normalisation. ``hop_length`` defaults to
    ``n_fft // 4``; ``f_max`` defaults to ``sample_rate / 2``. The filterbank and window are
    buffers of the submodule, so ``.to(device)`` moves them. Signals too short for the reflect
    padding (``T <= n_fft // 2``) are zero-padded on the right to ``n_fft`` samples.
    """

    # n_fft and n_mels: the evaluation's mel_l1 metric (pipeline/training/metrics.py) is this loss
    # at its defaults, a fixed measure; the training loss passes the phase's n_mels (ReconstructionLoss)
    def __init__(self, sample_rate: int, n_fft: int = 2048, hop_length: int | None = None,
                 n_mels: int = 128, f_min: float = 0.0, f_max: float | None = None, eps: float = 1e-5):
        super().__init__()
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self.sample_rate = int(sample_rate)
        self.n_fft = int(n_fft)
        self.eps = float(eps)
        self.mel = mel(self.sample_rate, self.n_fft, hop_length if hop_length is not None else self.n_fft // 4,
                       n_mels, f_min, f_max)

    def _log_mel(self, x: torch.Tensor) -> torch.Tensor:
        # centred as center=True would centre it, through reflect_pad (deterministic on CUDA)
        return torch.log10(self.mel(reflect_pad(x, self.n_fft // 2, self.n_fft // 2)) + self.eps)

    def _diff(self, pred, target) -> torch.Tensor:
        p, t = pair(pred, target)
        p, t = p.float(), t.float()
        if p.shape[-1] <= self.n_fft // 2:
            pad = self.n_fft - p.shape[-1]
            p, t = F.pad(p, (0, pad)), F.pad(t, (0, pad))
        return (self._log_mel(p) - self._log_mel(t)).abs()

    def forward(self, pred, target) -> torch.Tensor:
        with no_autocast(torch.as_tensor(pred)):
            return self._diff(pred, target).mean()

    def items(self, pred, target) -> torch.Tensor:
        """The loss of each item on its own, shape (B,)."""
        with no_autocast(torch.as_tensor(pred)):
            return self._diff(pred, target).mean(dim=(1, 2))


class ReconstructionLoss(torch.nn.Module):
    """Lambda-weighted sum of reconstruction terms.

    ``lambdas`` maps term name to weight; known names (`LOSS_TERMS`):

    * ``"l1"``   -- waveform L1 (mean absolute error);
    * ``"stft"`` -- `MultiResolutionSTFTLoss` over ``n_ffts``;
    * ``"mel"``  -- `MelL1Loss` at ``sample_rate`` with ``n_mels`` bands.

    A missing key or a weight of 0 means the term is neither built nor computed nor returned.
    Unknown keys, negative or non-finite weights, or all weights zero raise ``ValueError``.

    ``forward(pred, target, mask=None)`` returns ``(total, terms)``: ``total`` is the
    differentiable weighted sum (float32 scalar); ``terms`` maps each computed term name to its
    *unweighted*, *detached* scalar tensor, for logging (detached so that keeping them does not
    keep the graph alive).

    Every term is the mean over items of per-item losses (the MR-STFT spectral convergence too),
    so a batch split into equal shares across data-parallel ranks averages back to the same
    number. ``mask`` (bool, shaped like ``pred``, True on real samples, which come first) makes
    each item's loss that of its unpadded part alone, for every term; items of one length are
    computed together, and a batch without padding costs what it costs without a mask. ``mask``
    may also be a `Padding` built from it beforehand (what the trainer passes: built on the CPU,
    so the step never waits for the GPU to read the mask).
    """

    def __init__(self, sample_rate: int, lambdas: dict, n_ffts=tuple(TRAIN_DEFAULTS["n_ffts"]),
                 n_mels: int = TRAIN_DEFAULTS["n_mels"]):
        super().__init__()
        weights: dict[str, float] = {}
        for key, value in dict(lambdas).items():
            if key not in LOSS_TERMS:
                raise ValueError(f"unknown loss lambda {key!r}; known: {', '.join(LOSS_TERMS)}")
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"loss lambda {key!r} must be a number, got {value!r}") from None
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"loss lambda {key!r} must be finite and >= 0, got {value}")
            if value > 0:
                weights[key] = value
        if not weights:
            raise ValueError("all loss lambdas are zero: nothing to train on")
        self.lambdas = {k: weights[k] for k in LOSS_TERMS if k in weights}  # fixed order
        self.sample_rate = int(sample_rate)
        self.stft = MultiResolutionSTFTLoss(n_ffts) if "stft" in self.lambdas else None
        self.mel = MelL1Loss(sample_rate, n_mels=n_mels) if "mel" in self.lambdas else None

    def forward(self, pred, target, mask=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p, t = pair(pred, target)
        pad = mask if isinstance(mask, Padding) or mask is None else Padding(mask)
        if pad is not None and pad.shape != tuple(p.shape):
            raise ValueError(f"mask must be a bool tensor shaped like pred, got {tuple(pad.shape)}")
        groups = [(p.shape[-1], None)] if pad is None else pad.groups(p.device)
        parts = [(p, t) if idx is None else (p[idx, :n], t[idx, :n]) for n, idx in groups]
        terms: dict[str, torch.Tensor] = {}
        total = None
        for name, weight in self.lambdas.items():
            per_item = {"l1": _l1_items, "stft": getattr(self.stft, "items", None),
                        "mel": getattr(self.mel, "items", None)}[name]
            with no_autocast(p):
                value = sum(per_item(pp, tt).sum() for pp, tt in parts) / p.shape[0]
            terms[name] = value.detach()
            total = weight * value if total is None else total + weight * value
        return total, terms


def _l1_items(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (p.float() - t.float()).abs().mean(dim=-1)


class Padding:
    """Where the items of a batch end: `mask` (bool, (B, 1, T) or (B, T), True on each item's real
    samples, which come first), checked and grouped by length once, on the mask's own device. The
    trainer builds it from the loader's CPU mask before anything goes to the GPU, so neither the
    checks nor the grouping wait for the GPU (on a CUDA mask every check would be a host sync).
    `groups(device)`: [(length, item indices on `device`, or None for all items)]; items of one
    length are computed together, and a batch without padding is one group with no indexing."""

    def __init__(self, mask: torch.Tensor):
        m = as_batch(mask, "mask")
        if m.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor shaped like pred, got {m.dtype} {tuple(m.shape)}")
        self.shape, length = tuple(m.shape), m.shape[-1]
        lengths = m.sum(-1)
        if not torch.equal(m, torch.arange(length, device=m.device)[None] < lengths[:, None]):
            raise ValueError("mask must be True on a prefix of each item (real samples first, padding after)")
        n = lengths.tolist()
        if min(n) == 0:
            raise ValueError("mask: an item has no real sample")
        self.samples, self.lengths = sum(n), n         # real samples in the batch, in each item
        self._groups = [(length, None)] if min(n) == length else \
            [(k, torch.tensor([i for i, v in enumerate(n) if v == k])) for k in sorted(set(n))]
        self._on = {}

    def groups(self, device) -> list:
        device = torch.device(device)
        if device not in self._on:
            pin = device.type == "cuda" and torch.cuda.is_available()     # a copy that needs no wait
            self._on[device] = [(n, None if idx is None else
                                 (idx.pin_memory() if pin else idx).to(device, non_blocking=pin))
                                for n, idx in self._groups]
        return self._on[device]
