"""Spectrogram pictures, shared by the report (pipeline/evaluation/report.py) and the trainer's
TensorBoard samples (`tb_log_samples`): PNG (or JPEG) bytes drawn with matplotlib, no display."""
from __future__ import annotations

import io

import numpy as np
import torch

DB_RANGE = 90.0          # spectrograms show this many dB below the reference's loudest bin


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def image_bytes(fig, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=fig.dpi, bbox_inches="tight",
                **({"pil_kwargs": {"quality": 85}} if fmt == "jpeg" else {}))
    plt().close(fig)
    return buf.getvalue()


def power_db(x, n_fft: int = 1024) -> np.ndarray:
    """Power spectrogram in dB, ``(n_fft // 2 + 1, frames)``, Hann window, hop ``n_fft // 4``."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(-1)
    n = min(n_fft, 1 << (max(len(x), 2).bit_length() - 1))
    spec = torch.stft(x, n, n // 4, window=torch.hann_window(n), center=True, return_complex=True)
    return (10 * torch.log10(spec.abs().square() + 1e-12)).numpy()


def spectrograms_png(signals: dict, rate: int, mark_hz: float | None = None, ref_db: float | None = None,
                     panel_size=(3.6, 2.6), fmt: str = "png") -> bytes:
    """One PNG with a spectrogram per signal, side by side, 0 to ``rate / 2``, on one colour
    scale (dB below ``ref_db``, default: the loudest bin of the first signal), and a dashed line
    at ``mark_hz`` (the codec's Nyquist frequency: above it only the new decoder adds content)."""
    pyplot = plt()
    specs = {k: power_db(v) for k, v in signals.items()}
    ref = max(specs[next(iter(specs))].max(), -200.0) if ref_db is None else ref_db
    fig, axes = pyplot.subplots(1, len(specs), figsize=(panel_size[0] * len(specs), panel_size[1]),
                                sharey=True, squeeze=False, dpi=80)
    for ax, (name, s) in zip(axes[0], specs.items()):
        seconds = len(np.asarray(signals[name]).reshape(-1)) / rate
        im = ax.imshow(s - ref, origin="lower", aspect="auto", cmap="magma", vmin=-DB_RANGE, vmax=0,
                       extent=(0, seconds, 0, rate / 2000), interpolation="nearest")
        if mark_hz:
            ax.axhline(mark_hz / 1000, color="cyan", ls="--", lw=1)
            ax.text(0.01 * seconds, mark_hz / 1000, f" {mark_hz / 1000:g} kHz", color="cyan", va="bottom", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("s", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("kHz", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), pad=0.01, fraction=0.03, label="dB")
    return image_bytes(fig, fmt)


def tb_log_samples(writer, step: int, preds: dict, target, rate: int, mark_hz: float | None = None,
                   max_items: int = 2, tag: str = "samples") -> None:
    """Audio and spectrograms of the first ``max_items`` items of a validation batch:
    ``preds`` maps a name to a ``(B, 1, T)`` (or ``(B, T)``) tensor at ``rate``, ``target`` is the
    same shape. Writes ``{tag}/{i}/{name}`` audio for target and each prediction, and
    ``{tag}/{i}/spectrogram``: all of them side by side, 0 to ``rate / 2``, ``mark_hz`` marked
    (pass the codec's Nyquist frequency)."""
    sig = {"target": target, **preds}
    sig = {k: torch.as_tensor(v).detach().float().cpu().reshape(len(target), -1) for k, v in sig.items()}
    for i in range(min(max_items, len(target))):
        for name, x in sig.items():
            writer.add_audio(f"{tag}/{i}/{name}", x[i].clamp(-1, 1)[None], step, sample_rate=rate)
        png = spectrograms_png({k: v[i].numpy() for k, v in sig.items()}, rate, mark_hz)
        writer.add_image(f"{tag}/{i}/spectrogram", plt().imread(io.BytesIO(png))[..., :3], step, dataformats="HWC")
