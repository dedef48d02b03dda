"""Audio I/O and resampling: soundfile to read and write, soxr to resample.

Every failure raises `AudioError` whose message is the reject reason written to rejects.jsonl.
"""
from __future__ import annotations

import os
import stat

import numpy as np
import soundfile as sf
import soxr


class AudioError(Exception):
    """A reason an utterance cannot be used; the message is user-facing."""


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def check_regular(path: str) -> None:
    """Raise AudioError unless `path` is a regular file (after symlinks), without opening it:
    opening a FIFO blocks until someone writes to it, and a device may never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise AudioError("missing file") from None
    except (OSError, ValueError) as e:          # ValueError: a NUL in the path
        raise AudioError(f"cannot stat the file: {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISDIR(mode):
        raise AudioError("is a directory, not an audio file")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), f"mode {stat.filemode(mode)}")
        raise AudioError(f"not a regular file ({kind})")


def read_mono(path) -> tuple[np.ndarray, int]:
    """Read any libsndfile format, mix to mono float32; reject unusable content. Anything but a
    regular file is rejected before it is opened."""
    path = os.fspath(path)
    check_regular(path)
    try:
        x, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile errors come in several types
        raise AudioError(f"unreadable audio: {str(e).strip() or type(e).__name__}") from None
    if x.shape[0] == 0:
        raise AudioError("zero-length audio")
    x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if not np.isfinite(x).all():
        raise AudioError("NaN/Inf samples")
    return np.ascontiguousarray(x, dtype=np.float32), int(rate)


def resample(x: np.ndarray, rate_in: int, rate_out: int, quality: str = "HQ") -> np.ndarray:
    if rate_in == rate_out:
        return x.astype(np.float32, copy=False)
    return soxr.resample(x, rate_in, rate_out, quality=quality).astype(np.float32, copy=False)


def to_int16(x: np.ndarray) -> tuple[np.ndarray, int]:
    """float [-1, 1] -> int16; returns (samples, number of samples that had to be clipped)."""
    y = np.round(x * 32767.0)
    clipped = int(np.count_nonzero(np.abs(y) > 32767))
    return np.clip(y, -32767, 32767).astype(np.int16), clipped
