"""The evaluation: metrics (LSD with a relative floor, per band; ViSQOL against the reference
implementation's conformance score; spread; rank-sum) and the evaluate stage (budget across
shards, progress, per-utterance figures, clips for the report)."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.training.metrics import (BETTER, evaluate_pair, log_spectral_distance, rank_sum, si_sdr,
                                         segment_metrics, summarize, visqol)
from pipeline.model import codecs
from test_losses import broadband          # tones plus white noise across the whole band

SR = 48000
SPLIT = 12000.0          # the band edge these synthetic tests use (a 24 kHz codec's Nyquist)
SMALL_FFTS = (256, 512, 1024)
DATA = Path(__file__).parent / "data"


def lowpass_fft(x, sr, cutoff):
    """Zero every FFT bin above ``cutoff`` Hz."""
    spec = torch.fft.rfft(x, dim=-1)
    freqs = torch.fft.rfftfreq(x.shape[-1], d=1.0 / sr)
    spec[..., freqs > cutoff] = 0
    return torch.fft.irfft(spec, n=x.shape[-1], dim=-1)


def test_identical_inputs_give_zero_distance():
    x = broadband()
    assert log_spectral_distance(x, x, SR) == pytest.approx(0.0, abs=1e-6)
    assert log_spectral_distance(x, x, SR, band=(12000, 24000)) == pytest.approx(0.0, abs=1e-6)
    assert si_sdr(x, x) > 60
    assert si_sdr(0.5 * x, x) > 60          # scale-invariant


def test_n_fft_larger_than_signal():
    x = broadband(seconds=0.01)  # 480 samples, far below 8192
    y = x + 0.05 * torch.randn_like(x)
    m = evaluate_pair(y, x, SR, SPLIT)
    assert all(math.isfinite(v) for v in m.values())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_metrics_with_visqol_are_finite(device):
    """1 s: ViSQOL refuses a reference shorter than its patch (45 frames, about 0.7 s at 48 kHz);
    the 0.1 s this test once used failed on CUDA and would have on CPU."""
    x = broadband(batch=1, seconds=1.0)
    y = x + 0.05 * torch.randn_like(x)
    m = evaluate_pair(y.to(device), x.to(device), SR, SPLIT, n_ffts=SMALL_FFTS, with_visqol=True)
    assert all(math.isfinite(v) for v in m.values()) and "visqol" in m


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
def test_si_sdr_matches_known_snr(snr_db):
    x = broadband(batch=3)[:, 0]
    x = x - x.mean(-1, keepdim=True)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    noise = noise - noise.mean(-1, keepdim=True)
    # Remove the noise's projection onto x so the SNR is exact, then scale to the target SNR.
    noise = noise - (noise * x).sum(-1, keepdim=True) / x.square().sum(-1, keepdim=True) * x
    scale = torch.sqrt(x.square().sum(-1, keepdim=True) / noise.square().sum(-1, keepdim=True) / 10 ** (snr_db / 10))
    assert si_sdr(x + scale * noise, x) == pytest.approx(snr_db, abs=1.0)


def test_shapes_are_interchangeable():
    x = broadband(batch=1)
    y = x + 0.01 * torch.randn_like(x)
    a = si_sdr(y, x)
    assert si_sdr(y[:, 0], x[:, 0]) == pytest.approx(a)
    assert si_sdr(y[0, 0], x[0, 0]) == pytest.approx(a)
    with pytest.raises(ValueError):
        si_sdr(y, x[..., :-1])


def test_lowpassed_signal_shows_in_the_high_band_only():
    x = broadband()
    lp = lowpass_fft(x, SR, SPLIT)
    m = evaluate_pair(lp, x, SR, SPLIT, n_ffts=SMALL_FFTS)
    assert set(m) == set(BETTER) - {"visqol"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    same = evaluate_pair(x, x, SR, SPLIT, n_ffts=SMALL_FFTS)
    assert same["lsd_hi_db"] == pytest.approx(0.0, abs=1e-6) and same["lsd_lo_db"] == pytest.approx(0.0, abs=1e-6)
    assert m["lsd_hi_db"] > 30.0 and m["lsd_lo_db"] < 1.0     # the bands split at SPLIT, nothing leaks
    hp = x - lp                                                 # the other way round
    m2 = evaluate_pair(hp, x, SR, SPLIT, n_ffts=SMALL_FFTS)
    assert m2["lsd_lo_db"] > 30.0 and m2["lsd_hi_db"] < 1.0
    assert m["mrstft"] > same["mrstft"] and m["mel_l1"] > same["mel_l1"]


def test_empty_band_gives_a_large_finite_comparable_lsd():
    """The floor is relative to the target's power: an empty band scores the target's level above
    the floor, whatever numerical dust it holds, and the figure follows floor_db."""
    x = broadband(batch=1)
    lp = lowpass_fft(x, SR, SPLIT)
    n = 1e-6 * torch.randn_like(x)
    dust = lp + n - lowpass_fft(n, SR, SPLIT)                     # -120 dB of noise in the empty band
    hi = (SPLIT, SR / 2)
    a, b = (log_spectral_distance(y, x, SR, band=hi) for y in (lp, dust))
    assert 40.0 < a < 120.0 and abs(a - b) < 0.5
    assert log_spectral_distance(lp, x, SR, band=hi, floor_db=-60.0) < a - 10.0
    # the same prediction against a quieter copy of the target: the floor moves with the target
    assert log_spectral_distance(0.01 * lp, 0.01 * x, SR, band=hi) == pytest.approx(a, abs=0.1)


def test_visqol_matches_the_reference_conformance_score():
    """google/visqol's conformance pair steely48_stereo vs steely48_stereo_lp7 (audio mode,
    conformance version 333; provenance in tests/data/visqol/README.md)."""
    ref, rate = sf.read(DATA / "visqol/steely48_stereo.flac", dtype="float32")
    deg, _ = sf.read(DATA / "visqol/steely48_stereo_lp7.flac", dtype="float32")
    score = visqol(torch.from_numpy(deg.mean(1)), torch.from_numpy(ref.mean(1)), rate)
    assert score == pytest.approx(2.2501683734385183, abs=1e-6)     # kConformanceSteelyLp7


def test_visqol_ranks_a_lost_high_band_below_the_intact_signal():
    x = broadband(batch=1, seconds=1.0)[0, 0]
    lp = lowpass_fft(x, SR, SPLIT)
    full, cut = visqol(x, x, SR), visqol(lp, x, SR)
    assert full > 4.5 and cut < full - 0.1
    # another rate is resampled (soxr) to ViSQOL's own rate first
    from pipeline.data.audio import resample
    y = broadband(batch=1, seconds=1.0, sr=32000)[0, 0]
    ylp = lowpass_fft(y, 32000, 6000.0)
    up = [torch.from_numpy(resample(v.numpy(), 32000, SR)) for v in (ylp, y)]
    assert visqol(ylp, y, 32000) == pytest.approx(visqol(*up, SR), abs=1e-9)


def test_a_split_above_nyquist_gives_nan_for_the_high_band():
    x = broadband(sr=24000, seconds=0.25)
    y = x + 0.01 * torch.randn_like(x)
    assert math.isfinite(evaluate_pair(y, x, 24000, 8000.0, n_ffts=SMALL_FFTS)["lsd_hi_db"])
    m = evaluate_pair(y, x, 24000, 13000.0, n_ffts=SMALL_FFTS)
    assert math.isnan(m["lsd_hi_db"]) and math.isfinite(m["lsd_lo_db"])


def test_summarize_gives_mean_std_and_a_bootstrap_interval():
    v = np.random.default_rng(0).normal(3.0, 1.0, 200)
    st = summarize(v, n_boot=2000)
    assert st["mean"] == pytest.approx(v.mean()) and st["std"] == pytest.approx(v.std(ddof=1))
    lo, hi = st["ci95"]
    assert lo < st["mean"] < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * v.std() / np.sqrt(len(v)), rel=0.15)   # normal theory
    assert summarize(v, n_boot=2000) == st                                              # seeded
    assert summarize([2.5]) == {"mean": 2.5, "std": 0.0, "ci95": [2.5, 2.5]}


def test_rank_sum_orders_by_summed_ranks_with_directions_ties_and_nan():
    rows = {"a": {"lsd": 10.0, "mos": 3.0}, "b": {"lsd": 8.0, "mos": 2.0},
            "c": {"lsd": 8.0, "mos": 4.0}, "d": {"lsd": float("nan"), "mos": 5.0}}
    r = rank_sum(rows, {"lsd": "min", "mos": "max"})
    assert [x["name"] for x in r] == ["c", "d", "b", "a"]
    by = {x["name"]: x for x in r}
    assert by["b"]["ranks"] == {"lsd": 1.5, "mos": 4.0} and by["c"]["rank_sum"] == 1.5 + 2.0
    assert by["d"]["ranks"]["lsd"] == 4.0                     # NaN ranks last
    assert [x["name"] for x in rank_sum({"p": {"x": 1}, "q": {"x": 1}}, {"x": "max"})] == ["p", "q"]
    with pytest.raises(ValueError):
        rank_sum(rows, {"lsd": "lower"})


# ---- the evaluate stage on a small held-out cache of two shards ---------------------------
@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    from conftest import tiny_codec
    from pipeline.data.demo import generate_demo
    from pipeline.data.precompute import run_shard
    from pipeline.model.codecs import snac as M
    d = tmp_path_factory.mktemp("evaluate")
    generate_demo(d / "demo", seed=5, n_train=1, n_heldout=6, min_seconds=1.0, max_seconds=1.5)
    codec = tiny_codec()
    codec.save(d / "codec")
    shards = [str(d / f"held/shard-{k:03d}.zarr") for k in range(2)]
    for k, p in enumerate(shards):
        run_shard(d / "demo/heldout.jsonl", k, 2, codecs.load(d / "codec"), p)
    codecs.save_model(M.from_codec(codec, SR, "smart"), d / "smart")
    codecs.save_model(M.from_codec(codec, SR, "random", seed=1), d / "random")
    return d, shards


def test_evaluation_is_bounded_across_shards_with_progress_and_per_utterance_figures(heldout, capsys):
    from pipeline.data.cache import Shard
    from pipeline.evaluation.evaluate import evaluate
    d, shards = heldout
    lengths = [n / SR for p in shards for n in Shard(p).table["samples"]]
    assert len(Shard(shards[0])) >= 2 and len(Shard(shards[1])) >= 1
    budget = sum(lengths[:len(Shard(shards[0])) - 1]) - 0.01      # crossed inside shard 0
    expect = len(Shard(shards[0])) - 1
    r = evaluate(d / "codec", shards, {"smart": d / "smart"}, d / "out/eval.json",
                 {"max_seconds": budget, "n_ffts": [256, 512], "report_clips": 2, "report_seconds": 0.5})
    assert r["utterances"] == expect and r["heldout_utterances"] == len(lengths)
    assert r["seconds"] == pytest.approx(sum(lengths[:expect]), abs=0.01)
    assert f"evaluate: {expect}/{expect} utterances" in capsys.readouterr().out
    assert json.loads((d / "out/eval.json").read_text()) == r

    names = list(BETTER)                                             # ViSQOL on by default
    lines = [json.loads(l) for l in (d / "out/eval_utterances.jsonl").read_text().splitlines()]
    assert len(lines) == expect * 2 and {l["model"] for l in lines} == {"baseline", "smart"}
    for name in ("baseline", "smart"):
        for m in names:
            v = [l[m] for l in lines if l["model"] == name]
            assert r["models"][name][m] == pytest.approx(np.mean(v), abs=1e-3)
            lo, hi = r["spread"][name][m]["ci95"]
            assert lo - 1e-3 <= r["models"][name][m] <= hi + 1e-3
    diff = r["vs_baseline"]["smart"]["lsd_hi_db"]
    assert diff["diff"] == pytest.approx(r["models"]["smart"]["lsd_hi_db"] - r["models"]["baseline"]["lsd_hi_db"], abs=1e-3)
    # the baseline (the codec's decode, upsampled) has nothing above the codec's Nyquist
    assert r["bands_hz"]["lsd_hi_db"] == [12000.0, 24000.0]
    assert r["models"]["baseline"]["lsd_hi_db"] > 40 and math.isfinite(r["models"]["baseline"]["lsd_hi_db"])

    index = json.loads((d / "out/eval_clips/index.json").read_text())
    assert len(index["clips"]) == 2 and index["models"] == ["baseline", "smart"]
    for clip in index["clips"]:
        assert set(clip["files"]) == {"target", "baseline", "smart"}
        for f in clip["files"].values():
            info = sf.info(d / "out/eval_clips" / f)
            assert info.samplerate == SR and info.frames == int(0.5 * SR)


class Oracle(torch.nn.Module):
    """A stand-in decoder that returns the validation targets it is fed, in order, plus noise (no
    noise blocks to switch off)."""

    def __init__(self, segs, noise, geometry):
        from pipeline.data.segments import collate
        super().__init__()
        self.w, self.geometry, self.noise, self.i = torch.nn.Parameter(torch.zeros(1)), geometry, noise, 0
        self.targets = collate(segs)[1]

    def decode(self, codes):
        y = self.targets[self.i:self.i + len(codes[0])]
        self.i += len(codes[0])
        g = torch.Generator().manual_seed(self.i)
        return torch.nn.functional.pad(y + self.noise * torch.randn(y.shape, generator=g), (0, 64))

    def noise_disabled(self):
        return contextlib.nullcontext(self)


def test_segment_metrics_rank_checkpoints(heldout):
    """What the trainer's rank-sum selection calls: the metrics of a model on validation segments."""
    from pipeline.data.cache import open_cache
    from pipeline.data.segments import fixed_segments
    from pipeline.settings import segment_frames
    from pipeline.model.codecs import load_model
    d, shards = heldout
    sh = open_cache(shards)
    segs = fixed_segments(sh, segment_frames(0.25, sh[0].geometry), 4)
    model = load_model(d / "smart").train()
    m = segment_metrics(model, segs, batch_size=2, n_ffts=(256, 512))
    assert model.training and set(m) == set(BETTER) - {"visqol"} and all(map(math.isfinite, m.values()))

    rows = {f"noise {n:g}": segment_metrics(Oracle(segs, n, sh[0].geometry), segs, batch_size=3, n_ffts=(256, 512))
            for n in (0.1, 0.0, 0.01)}
    assert rows["noise 0"]["lsd_db"] == pytest.approx(0.0, abs=1e-4) and rows["noise 0"]["si_sdr_db"] > 60
    assert [r["name"] for r in rank_sum(rows)] == ["noise 0", "noise 0.01", "noise 0.1"]
