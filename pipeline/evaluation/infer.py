"""Inference with a trained 48 kHz model: resynthesis of any audio file, and decoding of codes.

Both work on inputs of any length in bounded memory: the input is read and resampled in blocks,
encoded and decoded in overlapping chunks (`chunked.py`), and the output streamed to disk (to
`OUT.part`, renamed when complete). Bad input is refused with a one-line ValueError naming the
file and what is wrong with it.

`decode` takes numpy.savez archives (.npz), one integer array per codebook, coarsest first (SNAC's
order; keys sorted naturally: codes_0, codes_1, ... or arr_0, arr_1, ...). Arrays are 1-D (one clip)
or 2-D (batch, codes) with the same batch size B for every codebook: a batch is decoded clip by
clip into OUT-0.wav ... OUT-{B-1}.wav (B = 1 writes OUT itself), never flattened into one clip.
It also takes an Orpheus token list (.json or .txt, one clip; the layout is in codes.py). The
checks are the library's (codes.check_codes), so both refuse bad codes with the same messages.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from ..data.audio import AudioError
from ..ui import console
from .chunked import CHUNK_SECONDS, Chunker
from .codes import read_codes
from .decoder import open_model

BLOCK = 1 << 16     # input frames read at a time


def load(model_path, device="auto", lora=None):
    """A trained model (folder or final.pt), optionally with a LoRA adapter applied."""
    model, loaded = open_model(model_path, device, lora)
    if lora:
        console.print(f"LoRA {lora}: {len(loaded)} tensors")
    return model


def resynth(model_path, src, dst, device="auto", lora=None, chunk_seconds=CHUNK_SECONDS) -> None:
    """Any audio file -> codec rate -> frozen encoder -> codes -> new decoder -> target-rate file,
    optionally through a LoRA adapter (lora_weights.safetensors) applied on top of the model."""
    fmt = output_format(dst)
    rate = probe(src)
    model = load(model_path, device, lora)
    g = model.geometry
    if rate < g.target_rate:
        console.print(f"note: {src} is {rate} Hz: the output above {rate / 2:g} Hz (its Nyquist frequency) "
                      "is invented by the decoder, not recovered from the source", soft_wrap=True)
    chunker = Chunker(model, chunk_seconds)
    try:
        codes, n = chunker.encode(read_blocks(src, g.codec_rate))
    except AudioError as e:
        raise ValueError(f"{src}: {e}") from None
    write(dst, fmt, g.target_rate, chunker.decode(codes), n * g.hop_target // g.hop)
    console.print(f"{src} ({rate} Hz, {n / g.codec_rate:.2f} s) -> {dst} ({g.target_rate} Hz)", soft_wrap=True)


def decode(model_path, codes_path, dst, device="auto", chunk_seconds=CHUNK_SECONDS, lora=None) -> None:
    """Codes (.npz, or an Orpheus token list: see the module docstring) -> one target-rate file
    per clip."""
    fmt = output_format(dst)
    model = load(model_path, device, lora)
    g = model.geometry
    batch = read_codes(codes_path, g)
    dst = Path(dst)
    outs = [dst] if len(batch[0]) == 1 else [dst.with_name(f"{dst.stem}-{k}{dst.suffix}") for k in range(len(batch[0]))]
    chunker = Chunker(model, chunk_seconds)
    for k, out in enumerate(outs):
        codes = [torch.from_numpy(a[k:k + 1].astype(np.int64)) for a in batch]
        frames = codes[-1].shape[-1] * g.strides[-1]
        write(out, fmt, g.target_rate, chunker.decode(codes))
        console.print(f"{codes_path}: {frames} frames -> {out} ({frames * g.hop_target / g.target_rate:.2f} s "
                      f"at {g.target_rate} Hz)", soft_wrap=True)


# ---- input ------------------------------------------------------------------------------------
def probe(src) -> int:
    """The sample rate of an audio file, or a ValueError saying why it cannot be used."""
    p = Path(src)
    reason = ("is a directory, not an audio file" if p.is_dir() else "missing file" if not p.exists()
              else "zero-length file" if p.stat().st_size == 0 else None)
    if reason is None:
        try:
            info = sf.info(str(p))
        except Exception as e:   # libsndfile errors come in several types
            reason = f"unreadable audio: {_first_line(e) or type(e).__name__}"
        else:
            reason = "zero-length audio" if info.frames == 0 else None
    if reason:
        raise ValueError(f"{src}: {reason}")
    return int(info.samplerate)


def read_blocks(src, rate: int, quality: str = "HQ"):
    """Mono float32 blocks of an audio file at `rate`: read and resampled in pieces (soxr's
    streaming resampler gives the one-shot result), so a long file never sits in memory whole."""
    try:
        with sf.SoundFile(str(src)) as f:
            rs = None if f.samplerate == rate else soxr.ResampleStream(f.samplerate, rate, 1, "float32", quality)
            for x in f.blocks(BLOCK, dtype="float32", always_2d=True):
                x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
                if not np.isfinite(x).all():
                    raise AudioError("NaN/Inf samples")
                yield rs.resample_chunk(x) if rs else x
            if rs:
                yield rs.resample_chunk(np.zeros(0, np.float32), last=True)
    except sf.SoundFileRuntimeError as e:
        raise AudioError(f"unreadable audio: {_first_line(e)}") from None


# ---- output -----------------------------------------------------------------------------------
def output_format(dst) -> str:
    """The soundfile format for an output path (from its extension), checked before any work."""
    dst = Path(dst)
    fmt = dst.suffix[1:].upper()
    if dst.is_dir():
        raise ValueError(f"{dst} is a directory; give an output file name")
    if fmt not in sf.available_formats():
        raise ValueError(f"{dst}: unknown output format {dst.suffix!r} (use .wav or .flac, or another "
                         "extension libsndfile writes)")
    return fmt


class _Sink:
    """The output file as soundfile's virtual I/O: libsndfile reports a failed write only as
    'System error'; this keeps the OSError (a full disk says so) to raise it with the file's name."""

    def __init__(self, f, name: str):
        self.f, self.name, self.error = f, name, None

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            self.error = self.error or e
            return 0

    def write(self, data):
        done = 0
        while done < len(data):          # a short write, retried, raises the reason
            k = self._guard(self.f.write, data[done:])
            if not k:
                break
            done += k
        return done

    def seek(self, offset, whence=0):
        return self._guard(self.f.seek, offset, whence)

    def read(self, n=-1):
        return self._guard(self.f.read, n) or b""

    def tell(self):
        return self.f.tell()

    def check(self):
        if self.error is not None:
            e = self.error
            raise OSError(e.errno, e.strerror, self.name) from e


def write(dst, fmt: str, rate: int, pieces, n: int | None = None) -> int:
    """Stream 1-D float pieces (clipped to [-1, 1]) into a mono file, the first `n` samples only
    if given; written to DST.part and renamed when complete. Returns the samples written."""
    dst = Path(dst)
    part, done = dst.with_name(dst.name + ".part"), 0
    try:
        with open(part, "w+b", buffering=0) as f:
            sink = _Sink(f, str(dst))
            try:
                with sf.SoundFile(sink, "w", rate, 1, format=fmt) as out:
                    for y in pieces:
                        y = y if n is None else y[:n - done]
                        out.write(np.clip(y, -1.0, 1.0))
                        done += len(y)
                        sink.check()
            except (sf.SoundFileRuntimeError, AssertionError) as e:   # soundfile asserts on a short write
                sink.check()
                raise RuntimeError(f"writing {dst} failed: {_first_line(e) or type(e).__name__}") from None
            sink.check()
        part.replace(dst)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return done


def _first_line(e) -> str:
    return (str(e).strip().splitlines() or [""])[0]
