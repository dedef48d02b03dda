"""Evaluation metrics for the 48 kHz decoder: plain functions, no gradients, python floats.

* `si_sdr` -- scale-invariant SDR in dB.
* `log_spectral_distance` -- LSD in dB over a band, with a floor relative to the target's power.
* `visqol` -- ViSQOL v3 in audio mode (MOS-LQO, about 1 to 4.75), from the pure-Python port
  `visqol-python`, which carries its SVR model and reproduces the reference implementation's
  conformance scores (see tests/test_evaluate.py).
* `evaluate_pair` -- the row the evaluate stage writes for one prediction/target pair.
* `summarize`, `rank_sum` -- aggregates with their spread, and a multi-metric ranking.
* `segment_metrics` -- the metrics of a model on fixed validation segments (checkpoint selection).

Shapes, STFT and band helpers are pipeline.training.spectral's (the losses use them too); two of
the metrics are the STFT and mel losses themselves. No rate is hard-coded: band edges come from
the caller (the codec's Nyquist frequency, from the loaded codec). The trainer selects checkpoints
by these metrics (`rank_sum`, `segment_metrics`), the evaluation reports them: so they live on the
training floor, where both reach them.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..settings import EVAL_DEFAULTS
from .losses import MelL1Loss, MultiResolutionSTFTLoss
from .spectral import band_mask, fit_n_fft, no_autocast, pair, power

__all__ = ["BETTER", "si_sdr", "log_spectral_distance", "visqol", "evaluate_pair", "summarize",
           "rank_sum", "segment_metrics"]

# Which way is better, per metric: "min" or "max". The keys are every metric evaluate_pair can
# return, in the order tables show them.
BETTER = {"visqol": "max", "lsd_lo_db": "min", "lsd_hi_db": "min", "lsd_db": "min", "mel_l1": "min",
          "mrstft": "min", "si_sdr_db": "max"}


@torch.no_grad()
def si_sdr(pred, target, eps: float = 1e-8) -> float:
    """Scale-invariant SDR in dB (Le Roux et al. 2019), mean over the batch.

    Both signals are made zero-mean, then ``s = <p,t>/(<t,t>+eps) * t``, ``e = p - s`` and
    ``SI-SDR = 10 log10((||s||^2 + eps) / (||e||^2 + eps))``. Computed in float64, so identical
    inputs score well above 100 dB and a scaled copy scores the same.
    """
    p, t = pair(pred, target)
    p = p.double() - p.double().mean(-1, keepdim=True)
    t = t.double() - t.double().mean(-1, keepdim=True)
    alpha = (p * t).sum(-1, keepdim=True) / (t.square().sum(-1, keepdim=True) + eps)
    s = alpha * t
    e = p - s
    ratio = (s.square().sum(-1) + eps) / (e.square().sum(-1) + eps)
    return float((10.0 * torch.log10(ratio)).mean())


@torch.no_grad()
def log_spectral_distance(pred, target, sample_rate: int, band: tuple[float, float] | None = None,
                          n_fft: int = 2048, hop: int = 512,
                          floor_db: float = EVAL_DEFAULTS["lsd_floor_db"]) -> float:
    """Log-spectral distance in dB, mean over frames, then over the batch.

    Power spectra ``P = |STFT|^2`` (Hann window of ``n_fft``, ``center=True``). Each item's floor
    is ``F = 10^(floor_db/10) * mean(P_target)`` (the target's mean power per time-frequency bin),
    the same for prediction and target; per frame
    ``sqrt(mean_k (10 log10 max(P_pred[k], F) - 10 log10 max(P_target[k], F))^2)``
    over the bins ``k`` whose frequency ``k * sample_rate / n_fft`` lies in ``band = [lo, hi)``
    Hz (``hi`` at or above Nyquist includes the Nyquist bin; ``None``: every bin). So an empty
    band in the prediction scores the target's level above the floor there: large, finite, and
    the same whatever numerical dust the band holds. ``n_fft`` larger than the signal is clamped
    like the STFT loss. A band that holds no bin raises ``ValueError``.
    """
    p, t = pair(pred, target)
    with no_autocast(p):
        p, t = p.float(), t.float()
        n = fit_n_fft(int(n_fft), p.shape[-1])
        window, hop = torch.hann_window(n, device=p.device), max(1, int(hop))
        pp, pt = power(p, n, hop, window), power(t, n, hop, window)           # (B, F, frames)
        floor = (pt.mean(dim=(1, 2), keepdim=True) * 10.0 ** (floor_db / 10.0)).clamp_min(1e-30)
        diff = 10.0 * (torch.log10(torch.maximum(pp, floor)) - torch.log10(torch.maximum(pt, floor)))
        if band is not None:
            diff = diff[:, band_mask(diff.shape[1], sample_rate, n, band, diff.device), :]
        lsd = torch.sqrt(diff.square().mean(dim=1))  # (B, frames)
        return float(lsd.mean(dim=-1).mean())


@functools.cache
def _visqol_api():
    from visqol import VisqolApi
    api = VisqolApi()
    api.create(mode="audio")          # the SVR model shipped inside the package
    return api


def visqol_rate() -> int:
    """The one rate ViSQOL's audio mode works at (the package's constant)."""
    from visqol.visqol_manager import K_48K_SAMPLE_RATE
    return int(K_48K_SAMPLE_RATE)


def visqol(pred, target, sample_rate: int) -> float:
    """ViSQOL v3 audio mode: MOS-LQO of ``pred`` against the reference ``target`` (mono, mean over
    a batch). Signals at another rate are resampled (soxr) to ViSQOL's audio rate first."""
    from ..data.audio import resample
    p, t = pair(pred, target)
    rate, scores = visqol_rate(), []
    for a, b in zip(p.detach().float().cpu().numpy(), t.detach().float().cpu().numpy()):
        a, b = (resample(x, sample_rate, rate).astype(np.float64) for x in (a, b))
        scores.append(_visqol_api().measure_from_arrays(b, a, sample_rate=rate).moslqo)
    return float(np.mean(scores))


@torch.no_grad()
def evaluate_pair(pred, target, sample_rate: int, split_hz: float, n_ffts=tuple(EVAL_DEFAULTS["n_ffts"]),
                  floor_db: float = EVAL_DEFAULTS["lsd_floor_db"], with_visqol: bool = False,
                  notes: dict | None = None) -> dict:
    """All evaluation metrics for one (batch of) prediction/target pair(s), as python floats.

    ``mrstft`` (`MultiResolutionSTFTLoss` over ``n_ffts``, spectral convergence pooled over the
    batch), ``mel_l1`` (`MelL1Loss` at ``sample_rate``), ``lsd_db`` (every bin), ``lsd_lo_db``
    (``[0, split_hz)``) and ``lsd_hi_db`` (``[split_hz, Nyquist]``) with the relative floor
    ``floor_db`` (`log_spectral_distance`), ``si_sdr_db``, and with ``with_visqol`` ``visqol``.
    ``split_hz`` is the codec's Nyquist frequency: the band above it is the one only a
    higher-rate decoder can fill. A band holding no STFT bin gives NaN, and so does ViSQOL on a
    signal too short for one of its patches (under about 1 s); ``notes`` (a dict), when given, gets
    the reason for each NaN by metric.
    """
    p, t = pair(pred, target)
    device = p.device

    notes = {} if notes is None else notes

    def lsd(band):
        try:
            return log_spectral_distance(p, t, sample_rate, band=band, floor_db=floor_db)
        except ValueError as e:
            notes[{None: "lsd_db", (0.0, float(split_hz)): "lsd_lo_db"}.get(band, "lsd_hi_db")] = str(e)
            return float("nan")

    out = {
        "mrstft": float(MultiResolutionSTFTLoss(n_ffts).to(device)(p, t)),
        "mel_l1": float(MelL1Loss(sample_rate).to(device)(p, t)),
        "lsd_db": lsd(None),
        "lsd_lo_db": lsd((0.0, float(split_hz))),
        "lsd_hi_db": lsd((float(split_hz), sample_rate / 2)),
        "si_sdr_db": si_sdr(p, t),
    }
    if with_visqol:
        try:
            out["visqol"] = visqol(p, t, sample_rate)
        except ValueError as e:          # too short for one patch ("... smaller than minimum patch size")
            out["visqol"], notes["visqol"] = float("nan"), f"ViSQOL: {e}"
    return out


# --------------------------------------------------------------------------- aggregates
def summarize(values, n_boot: int = EVAL_DEFAULTS["bootstrap"], seed: int = 0) -> dict:
    """Mean of per-utterance ``values`` with its spread: ``std`` (ddof 1; 0 for one value) and
    ``ci95``, the 2.5th and 97.5th percentiles of the means of ``n_boot`` bootstrap resamples of
    the utterances (percentile bootstrap, seeded: the same values give the same interval).
    For paired differences (model minus baseline, utterance by utterance) pass the differences."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to summarize")
    means = x[np.random.default_rng(seed).integers(0, x.size, (int(n_boot), x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            "ci95": [float(lo), float(hi)]}


def rank_sum(rows: dict, better: dict | None = None) -> list:
    """Rank candidates (checkpoints, models) on several metrics at once.

    ``rows``: ``{name: {metric: value}}``; ``better``: ``{metric: "min" | "max"}`` for the metrics
    to use (default: those of `BETTER` present in every row). Per metric each candidate gets its
    rank (1 = best; ties share their mean rank; a missing or NaN value ranks last); candidates are
    ordered by the sum of their ranks, ties kept in the order of ``rows`` (pass candidates in the
    order that should win a tie, e.g. newest last). Returns
    ``[{"name", "rank_sum", "ranks": {metric: rank}}, ...]``, best first.
    """
    names = list(rows)
    if better is None:
        better = {m: d for m, d in BETTER.items() if all(m in r for r in rows.values())}
    if not names or not better:
        raise ValueError("rank_sum needs at least one candidate and one metric")
    ranks = {n: {} for n in names}
    for m, direction in better.items():
        if direction not in ("min", "max"):
            raise ValueError(f"{m}: direction must be 'min' or 'max', got {direction!r}")
        sign = 1.0 if direction == "min" else -1.0
        keyed = [(sign * v if v is not None and math.isfinite(v) else math.inf, n)
                 for n, v in ((n, rows[n].get(m)) for n in names)]
        keyed.sort(key=lambda kv: kv[0])
        i = 0
        while i < len(keyed):                       # average ranks over runs of equal values
            j = i
            while j + 1 < len(keyed) and keyed[j + 1][0] == keyed[i][0]:
                j += 1
            for k in range(i, j + 1):
                ranks[keyed[k][1]][m] = (i + j) / 2 + 1
            i = j + 1
    out = [{"name": n, "rank_sum": sum(ranks[n].values()), "ranks": ranks[n]} for n in names]
    return sorted(out, key=lambda r: r["rank_sum"])       # stable: ties keep the order of rows


@torch.no_grad()
def segment_metrics(model, segments, split_hz: float | None = None, metrics=None, batch_size: int = 8,
                    device=None, n_ffts=tuple(EVAL_DEFAULTS["n_ffts"]),
                    floor_db: float = EVAL_DEFAULTS["lsd_floor_db"]) -> dict:
    """Mean metrics of ``model`` (a 48 kHz decoder with ``.decode(codes)``) on validation
    ``segments`` (``[(codes, int16 target), ...]`` as `pipeline.data.segments.fixed_segments`
    gives), noise blocks off: ``{metric: mean over segments}`` for ``metrics`` (default: every
    `BETTER` metric but ViSQOL, which wants segments of a few seconds). ``split_hz`` defaults to
    the model's codec Nyquist frequency. Feed one dict per checkpoint to `rank_sum`."""
    from ..data.segments import collate
    metrics = tuple(metrics or (m for m in BETTER if m != "visqol"))
    unknown = set(metrics) - set(BETTER)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {', '.join(BETTER)}")
    geo = model.geometry
    split = float(split_hz if split_hz is not None else geo.codec_rate / 2)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums, n = dict.fromkeys(metrics, 0.0), 0
    try:
        with model.noise_disabled():
            for i in range(0, len(segments), batch_size):
                codes, target, mask = collate(segments[i:i + batch_size])
                pred = model.decode([c.to(device) for c in codes]).float()[..., :target.shape[-1]]
                for b in range(target.shape[0]):
                    real = int(mask[b].sum())          # a padded short utterance: its real part only
                    r = evaluate_pair(pred[b][..., :real], target[b][..., :real].to(device), geo.target_rate,
                                      split, n_ffts, floor_db, with_visqol="visqol" in metrics)
                    for m in metrics:
                        sums[m] += r[m]
                    n += 1
    finally:
        model.train(was_training)
    if not n:
        raise ValueError("no validation segments")
    return {m: v / n for m, v in sums.items()}
