"""Deterministic demo corpus: synthetic, speech-like, full-band audio.

`generate_demo(out_dir, ...)` writes `audio/<id>.wav` (mono, 16-bit PCM at `rate`: the workflow
passes `codec.target_rate`),
`manifest.jsonl` (training clips) and `heldout.jsonl` (held-out clips, disjoint ids) with
audio paths relative to `out_dir`. The demo exists so that a 48 kHz decoder has something
real to learn in the 12-24 kHz band, so the content is built to fill the whole band.

Content model. A clip (length uniform in [min_seconds, max_seconds]) is a chain of segments
of 50-400 ms, starting with a pause:

* voiced: a band-limited harmonic pulse train (closed-form sum of all harmonics of f0 up to
  ~0.46·rate) whose f0 (80-300 Hz) glides linearly over the segment, continuous in f0 and
  phase with a preceding voiced segment; a little aspiration noise (HNR 15-30 dB) is mixed
  in. It is shaped, frame by frame in the STFT domain, by a spectral envelope: a -6 dB/oct
  tilt times a parallel sum of 3 formant resonances whose centres move linearly over the
  segment, plus a -30..-22 dB floor so harmonics reach up to near rate/2.
* fricative: white noise shaped by a band-pass envelope (steep high-pass at 3.5-6 kHz,
  a broad peak at 5-10 kHz, low-pass at 14 kHz-0.45·rate): most energy is in 4-20 kHz,
  with a large share above 12 kHz (frequencies scale down for rates below 48 kHz).
* pause: silence; the whole clip carries a -70 dBFS white noise floor.

Segments overlap by 10 ms complementary raised-cosine crossfades (no clicks), each segment
gets a random level, and the clip is peak-normalized to -3 dBFS minus a random 0-12 dB
gain, then quantized to 16 bits. Clips are 1/4 dataset 1, the rest dataset 0 (by index,
so both splits get some of each once they have at least 2 clips).

Determinism: clip `i` of split `s` (0 train, 1 held-out) draws everything from
`numpy.random.default_rng([seed, s, i])`, so a rerun is byte-identical and growing
`n_train` never changes existing clips. Every file is written to a temporary name in its
folder and `os.replace`d; the manifests are written last.
"""
from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf

from ..settings import DEMO_DEFAULTS, PRECOMPUTE_DEFAULTS

_N_FFT = 1024
_HOP = _N_FFT // 4
_WIN = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_N_FFT) / _N_FFT))  # periodic Hann
_OLA_GAIN = 1.5      # sum over frames of hann**2 at hop N/4
_FADE_S = 0.010      # crossfade length between segments
_FLOOR_DBFS = -70.0

_ONSETS = ["", "b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "sh", "t", "th", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ee"]
_CODAS = ["", "", "", "n", "s", "t", "r", "m"]


def generate_demo(out_dir, seed: int = DEMO_DEFAULTS["seed"], n_train: int = DEMO_DEFAULTS["n_train"],
                  n_heldout: int = DEMO_DEFAULTS["n_heldout"], rate: int = PRECOMPUTE_DEFAULTS["target_rate"],
                  min_seconds: float = DEMO_DEFAULTS["min_seconds"],
                  max_seconds: float = DEMO_DEFAULTS["max_seconds"]) -> dict:
    """Write the demo corpus under `out_dir`; return {"train", "heldout", "seconds", "rate"}."""
    seed, n_train, n_heldout, rate = int(seed), int(n_train), int(n_heldout), int(rate)
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if n_train < 0 or n_heldout < 0:
        raise ValueError("n_train and n_heldout must be >= 0")
    if rate < 8000:
        raise ValueError("rate must be >= 8000")
    if not 0 < min_seconds <= max_seconds:
        raise ValueError("need 0 < min_seconds <= max_seconds")
    n_min = int(np.ceil(min_seconds * rate))
    n_max = max(n_min, int(np.floor(max_seconds * rate)))

    out_dir = os.fspath(out_dir)
    audio_dir = os.path.join(out_dir, "audio")
    os.makedirs(audio_dir, exist_ok=True)

    total_samples = 0
    manifests = {}
    for split, name, count in ((0, "train", n_train), (1, "heldout", n_heldout)):
        lines = []
        for i in range(count):
            cid = f"demo-{name}-{i:03d}"
            rng = np.random.default_rng([seed, split, i])
            n = int(rng.integers(n_min, n_max + 1))
            pcm = _synth_clip(rng, n, rate)
            _write_wav(os.path.join(audio_dir, cid + ".wav"), pcm, rate)
            total_samples += n
            lines.append({"audio": f"audio/{cid}.wav", "id": cid, "text": _pseudo_text(rng),
                          "duration": round(n / rate, 3), "dataset_id": 1 if i % 4 == 1 else 0})
        manifests[name] = lines

    _write_jsonl(os.path.join(out_dir, "manifest.jsonl"), manifests["train"])
    _write_jsonl(os.path.join(out_dir, "heldout.jsonl"), manifests["heldout"])
    return {"train": n_train, "heldout": n_heldout,
            "seconds": round(total_samples / rate, 3), "rate": rate}


# ---------------------------------------------------------------------------------- writing

def _tmp_name(path: str) -> str:
    d, b = os.path.split(path)
    return os.path.join(d, f".{b}.tmp-{os.getpid()}")


def _write_wav(path: str, pcm: np.ndarray, rate: int) -> None:
    tmp = _tmp_name(path)
    try:
        sf.write(tmp, pcm, rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_jsonl(path: str, rows: list) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _pseudo_text(rng) -> str:
    words = []
    for _ in range(int(rng.integers(2, 7))):
        syl = [_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
               + _CODAS[rng.integers(len(_CODAS))] for _ in range(int(rng.integers(1, 4)))]
        words.append("".join(syl))
    return " ".join(words).capitalize() + "."


# -------------------------------------------------------------------------------- synthesis

def _plan_segments(rng, n: int, rate: int) -> list:
    """[(start, end, kind)] tiling [0, n); kinds 'pause', 'voiced', 'fricative'."""
    ms = rate / 1000.0
    lo, hi = int(50 * ms), int(400 * ms)
    ranges = {"voiced": (80, 400), "fricative": (50, 250), "pause": (50, 300)}
    segs, pos, prev = [], 0, "pause"
    first = min(n, int(rng.uniform(60, 150) * ms))
    segs.append([0, first, "pause"])
    pos = first
    while pos < n:
        if prev == "pause":
            kind = "voiced" if rng.random() < 0.7 else "fricative"
        else:
            kind = ["voiced", "fricative", "pause"][rng.choice(3, p=[0.5, 0.27, 0.23])]
        a, b = ranges[kind]
        length = int(rng.uniform(a, b) * ms)
        left = n - pos
        if left <= hi:
            length = left
        else:
            length = min(length, left - lo)
        segs.append([pos, pos + length, kind])
        pos += length
        prev = kind
    kinds = [s[2] for s in segs]
    if "fricative" not in kinds:
        voiced = [j for j, k in enumerate(kinds) if k == "voiced"]
        if voiced:
            segs[voiced[int(rng.integers(len(voiced)))]][2] = "fricative"
    return [tuple(s) for s in segs]


def _stft_filter(x: np.ndarray, env_fn) -> np.ndarray:
    """Shape `x` with a time-varying magnitude envelope: env_fn(frame_centres) -> (frames, bins)."""
    n = len(x)
    n_frames = (n + _N_FFT) // _HOP + 1
    total = (n_frames + 3) * _HOP
    xp = np.zeros(total)
    xp[_N_FFT:_N_FFT + n] = x
    idx = np.arange(n_frames)[:, None] * _HOP + np.arange(_N_FFT)[None, :]
    spec = np.fft.rfft(xp[idx] * _WIN, axis=1)
    centres = np.arange(n_frames) * _HOP + _N_FFT // 2 - _N_FFT   # in x's sample index
    spec *= env_fn(centres)
    frames = np.fft.irfft(spec, n=_N_FFT, axis=1) * _WIN
    y = np.zeros(total).reshape(-1, _HOP)
    for j in range(4):
        y[j:j + n_frames] += frames[:, j * _HOP:(j + 1) * _HOP]
    return y.reshape(-1)[_N_FFT:_N_FFT + n] / _OLA_GAIN


def _voiced(rng, n_ext: int, core0: int, core1: int, rate: int, f0a: float, f0b: float,
            phase0: float) -> tuple:
    """Voiced segment over n_ext samples, core [core0, core1); returns (signal, phase at core1)."""
    t = np.arange(n_ext)
    frac = np.clip((t - core0) / max(1, core1 - core0), 0.0, 1.0)
    f0 = f0a + (f0b - f0a) * frac
    f0 *= 1.0 + 0.004 * np.sin(2 * np.pi * rng.uniform(4, 7) * t / rate + rng.uniform(0, 6.3))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    phase += phase0 - phase[core0]
    phase_end = float(phase[min(core1, n_ext - 1)])
    k = max(1, int(0.46 * rate / f0.max()))
    ph = np.mod(phase, 2 * np.pi)
    den = 2.0 * np.sin(ph / 2.0)
    safe = np.abs(den) > 1e-9
    pulse = np.where(safe, np.sin((k + 0.5) * ph) / np.where(safe, den, 1.0) - 0.5, float(k))
    hnr_db = rng.uniform(15, 30)
    sigma = np.sqrt(rate / (4.0 * f0.mean()) / 10 ** (hnr_db / 10))
    src = pulse + sigma * rng.standard_normal(n_ext)

    nyq = rate / 2.0
    freqs = np.fft.rfftfreq(_N_FFT, 1.0 / rate)
    f1 = rng.uniform(250, 850, 2)
    f2 = np.maximum(f1 + 300, rng.uniform(900, 2400, 2))
    f3 = np.maximum(f2 + 400, rng.uniform(2200, 3400, 2))
    centres = np.minimum(np.stack([f1, f2, f3]), 0.4 * nyq)   # (3, start/end)
    bws = np.array([rng.uniform(60, 120), rng.uniform(80, 170), rng.uniform(120, 260)])
    gains = np.array([1.0, rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.45)])
    floor = 10 ** (rng.uniform(-30, -22) / 20)
    tilt = 1.0 / np.sqrt(1.0 + (freqs / 800.0) ** 2)
    tilt[0] = 0.0

    def env(frame_centres):
        w = np.clip((frame_centres - core0) / max(1, core1 - core0), 0.0, 1.0)
        fc = centres[:, :1] + (centres[:, 1:] - centres[:, :1]) * w[None, :]   # (3, frames)
        d = (freqs[None, None, :] - fc[:, :, None]) / (bws[:, None, None] / 2)
        res = (gains[:, None, None] / np.sqrt(1.0 + d * d)).sum(axis=0)
        return tilt[None, :] * (res + floor)

    y = _stft_filter(src, env)
    contour = 0.65 + 0.35 * np.sin(np.pi * frac) ** 0.5
    return y * contour, phase_end


def _fricative(rng, n_ext: int, rate: int) -> np.ndarray:
    scale = min(1.0, rate / 48000.0)
    freqs = np.fft.rfftfreq(_N_FFT, 1.0 / rate)
    fl = rng.uniform(3500, 6000) * scale
    fh = min(rng.uniform(14000, 22000) * scale, 0.45 * rate)
    fpa, fpb = rng.uniform(5000, 10000, 2) * scale
    bw = rng.uniform(2000, 5000) * scale
    peak = rng.uniform(0.5, 2.0)
    with np.errstate(divide="ignore"):
        hp = 1.0 / np.sqrt(1.0 + (fl / np.maximum(freqs, 1e-3)) ** 8)
    lp = 1.0 / np.sqrt(1.0 + (freqs / fh) ** 8)
    base = hp * lp

    def env(frame_centres):
        w = np.clip(frame_centres / max(1, n_ext), 0.0, 1.0)
        fp = fpa + (fpb - fpa) * w
        d = (freqs[None, :] - fp[:, None]) / (bw / 2)
        return base[None, :] * (1.0 + peak / (1.0 + d * d))

    return _stft_filter(rng.standard_normal(n_ext), env)


def _synth_clip(rng, n: int, rate: int) -> np.ndarray:
    """One clip of n samples as int16."""
    segs = _plan_segments(rng, n, rate)
    fade = max(2, int(_FADE_S * rate) // 2 * 2)
    half = fade // 2
    ramp = np.sin(0.5 * np.pi * (np.arange(fade) + 0.5) / fade) ** 2   # up; 1 - ramp is down
    out = np.zeros(n)
    f0_prev = phase_prev = None
    prev_kind = "pause"
    for j, (s, e, kind) in enumerate(segs):
        a, b = max(0, s - half), min(n, e + half)
        m = b - a
        if kind == "voiced":
            if prev_kind == "voiced" and f0_prev is not None:
                f0a, ph0 = f0_prev, phase_prev
            else:
                f0a, ph0 = rng.uniform(80, 300), rng.uniform(0, 2 * np.pi)
            f0b = float(np.clip(f0a * 2 ** rng.uniform(-0.5, 0.5), 80, 300))
            y, phase_prev = _voiced(rng, m, s - a, e - a, rate, f0a, f0b, ph0)
            f0_prev = f0b
            level_db = rng.uniform(-4, 0)
        elif kind == "fricative":
            y = _fricative(rng, m, rate)
            level_db = rng.uniform(-16, -6)
        else:
            prev_kind = kind
            continue
        y = y * (10 ** (level_db / 20) / (np.sqrt(np.mean(y * y)) + 1e-12))
        win = np.ones(m)
        if s > 0:
            win[:fade] = ramp
        else:
            k = min(fade, m)
            win[:k] *= ramp[:k]
        if e < n:
            win[m - fade:] *= 1.0 - ramp
        else:
            k = min(fade, m)
            win[m - k:] *= ramp[:k][::-1]
        out[a:b] += y * win
        prev_kind = kind
    peak = np.max(np.abs(out))
    if peak > 0:
        out *= 10 ** ((-3.0 - rng.uniform(0.0, 12.0)) / 20) / peak
    out += rng.standard_normal(n) * 10 ** (_FLOOR_DBFS / 20)
    return np.clip(np.round(out * 32767.0), -32768, 32767).astype(np.int16)
