"""Smart init's output head, for every family: taps that make a head, run on held features at
the target rate, compute the pretrained head's codec-rate output upsampled by an interpolator.

The new block holds its input for r = target_rate / codec_rate samples (sample-and-hold), so
the head sees at target sample r m + j the feature the pretrained head saw at codec sample m:
  * hold: the pretrained taps spread by r (r - 1 zeros between them) compute exactly what the
    pretrained head dilated by r would: its output held for r samples;
  * cubic (the default): Keys' cubic (a = -1/2). The held features are a zero-stuffed signal
    convolved with a box of r ones; the cubic kernel, like every interpolator that reproduces
    constants, vanishes at the box's zeros, so it is the box convolved with a quotient q (3r taps),
    and the head is the spread taps convolved with q: (k - 1) r + 4r - 1 taps. Its output is the
    cubic interpolation of the codec-rate output before the final nonlinearity, exactly.
(measured on the SNAC 48 kHz model: the hold mirrors 0-12 kHz into 12-24 kHz 3-14 dB below it, the cubic
kernel 6-40 dB below; see pipeline/model/codecs/snac.py.)
"""
from __future__ import annotations

import torch

INTERPOLATORS = ("cubic", "hold")
RESIDUAL_GAIN = 1e-4       # the copied residual units' output gain: the new block starts near identity


def spread_taps(v: torch.Tensor, r: int) -> torch.Tensor:
    """Taps (..., k) -> (..., (k-1)*r+1): the originals with r-1 zeros between them."""
    out = v.new_zeros(*v.shape[:-1], (v.shape[-1] - 1) * r + 1)
    out[..., ::r] = v
    return out


def keys_cubic(r: int) -> torch.Tensor:
    """Keys' cubic convolution kernel (a = -1/2) sampled every 1/r: the 4r - 1 taps that
    interpolate a zero-stuffed signal by r (centre tap 1; zero at the other multiples of r)."""
    t = (torch.arange(-(2 * r - 1), 2 * r, dtype=torch.float64) / r).abs()
    return torch.where(t <= 1, 1.5 * t**3 - 2.5 * t**2 + 1, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2)


def hold_quotient(h: torch.Tensor, r: int) -> torch.Tensor:
    """q with h = box_r * q (box_r: r ones, the hold). Exact (remainder 0) for any h that
    reproduces constants: its polyphase parts each sum to 1, so it vanishes where the box does."""
    q, rest = h.clone(), torch.zeros(len(h) - r + 1, dtype=h.dtype)
    for i in range(len(rest)):                  # long division by 1 + z + ... + z^(r-1)
        rest[i] = q[i]
        q[i:i + r] -= rest[i]
    assert q.abs().max() < 1e-12, f"kernel does not factor through the hold: remainder {q.abs().max():g}"
    return rest


def head_taps(w: torch.Tensor, r: int, interpolator: str) -> torch.Tensor:
    """The wide head's taps (out, in, k') from a centred pretrained head's (out, in, k): hold
    spreads the taps ((k - 1) r + 1), cubic convolves those with the cubic kernel's quotient by the
    hold ((k - 1) r + 4r - 1 taps, r - 1 leading zeros centre it)."""
    wide = spread_taps(w, r)
    if interpolator == "hold":
        return wide
    q = hold_quotient(keys_cubic(r), r).to(w.dtype)
    o, i, k = wide.shape
    full = torch.nn.functional.conv1d(wide.reshape(o * i, 1, k), q.flip(0)[None, None], padding=len(q) - 1)
    return torch.nn.functional.pad(full.reshape(o, i, -1), (r - 1, 0))


def head_size(k: int, r: int, interpolator: str) -> int:
    """Taps of the wide head made from a k-tap centred pretrained one (see head_taps)."""
    return (k - 1) * r + (1 if interpolator == "hold" else 4 * r - 1)


def check_init(init: str, interpolator: str) -> None:
    if init not in ("smart", "random"):
        raise ValueError(f"init must be 'smart' or 'random', got {init!r}")
    if interpolator not in INTERPOLATORS:
        raise ValueError(f"interpolator must be one of {INTERPOLATORS}, got {interpolator!r}")
