"""The report's files (evaluation table, listening pages, training curves), opened in a real
headless Chromium, and the TensorBoard samples. The whole `snakemake --report` page is opened
by tests/test_workflow.py::test_snakemake_report_opens_in_a_browser on the demo build."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from browser import CHROMIUM, PAGE_CONTENT, Chromium

from pipeline.evaluation import report as R
from pipeline.training import figures as F
from pipeline.model import codecs

SR = 48000
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")


def tone_sweep(seconds=1.0, rate=SR, top=20000.0, seed=0):
    t = np.arange(int(seconds * rate)) / rate
    f = 200 + (top - 200) * t / seconds
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / rate) + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A real evaluation (tiny codec, two models, ViSQOL off for speed) and phase folders."""
    from conftest import tiny_codec
    from pipeline.data.demo import generate_demo
    from pipeline.data.precompute import run_shard
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.model.codecs import snac as M
    d = tmp_path_factory.mktemp("report")
    generate_demo(d / "demo", seed=3, n_train=1, n_heldout=3, min_seconds=1.0, max_seconds=1.5)
    codec = tiny_codec()
    codec.save(d / "codec")
    run_shard(d / "demo/heldout.jsonl", 0, 1, codecs.load(d / "codec"), d / "held/shard-000.zarr")
    for name, init in (("warmup", "smart"), ("full", "random")):
        codecs.save_model(M.from_codec(codec, SR, init), d / name)
        steps = range(2, 21, 2)
        (d / name / "metrics.jsonl").write_text("".join(json.dumps(
            {"step": s, "lr": 1e-3, "train/loss": 1 / s, "train/l1": 0.3 / s, **({"val/loss": 1.1 / s} if s % 10 == 0 else {})})
            + "\n" for s in steps))
    result = evaluate(d / "codec", [d / "held/shard-000.zarr"], {"warmup": d / "warmup", "full": d / "full"},
                      d / "phase11/eval.json", {"visqol": False, "n_ffts": [256, 512], "report_clips": 2,
                                                "report_seconds": 1.0})
    items = R.write_report_items(d / "phase11/eval.json", {"warmup": d / "warmup", "full": d / "full"},
                                 d / "report", clips=3)
    return d, result, items


def test_report_items_are_written(evaluated):
    d, result, items = evaluated
    assert [p.name for p in items] == ["evaluation.html", "clip-00.html", "clip-01.html", "clip-02.html",
                                       "curves-warmup.png", "curves-full.png"]
    assert all(p.stat().st_size > 0 for p in items)
    assert "No clip 3" in (d / "report/clip-02.html").read_text()        # the evaluation kept two
    for p in items:
        assert p.stat().st_size <= R.MAX_ITEM_BYTES


@needs_chromium
def test_report_items_render_in_chromium(evaluated, tmp_path):
    """Table rows, decoded images and playable audio, as a browser sees them."""
    d, result, items = evaluated
    with Chromium(tmp_path / "profile") as b:
        b.open((d / "report/evaluation.html").as_uri())
        page = b.eval(PAGE_CONTENT)
        assert page["tables"] == ["means", "vs-baseline"] and page["rows"] == ["baseline", "warmup", "full"]
        b.screenshot(tmp_path / "evaluation.png")

        b.open((d / "report/clip-00.html").as_uri())
        page = b.eval(PAGE_CONTENT)
        assert page["images"] == page["decoded"] == 4                 # target, baseline, warmup, full
        assert page["audio"] == 4 and page["errors"] == 0
        assert all(s == pytest.approx(1.0, abs=0.01) for s in page["seconds"]), page["seconds"]
        png = b.screenshot(tmp_path / "clip.png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

        b.open((d / "report/curves-warmup.png").as_uri())
        assert b.eval("document.images[0].naturalWidth") > 300


def test_a_clip_page_is_cropped_to_fit_one_report_item(evaluated):
    d, _, _ = evaluated
    full = R.clip_page_html(d / "phase11/eval_clips", 0)
    small = R.clip_page_html(d / "phase11/eval_clips", 0, max_bytes=int(0.85 * len(full)))
    assert len(small) <= 0.85 * len(full) and "Cropped to" in small and "Cropped to" not in full


def test_spectrogram_marks_the_codec_nyquist_and_spans_the_target_band():
    """A sweep to 20 kHz against its copy low-passed at 12 kHz: the drawn images differ mostly
    in their upper half (the plot spans 0 to 24 kHz), and the 12 kHz line is drawn when asked."""
    import matplotlib.pyplot as plt
    import io
    x = tone_sweep()
    spec = np.fft.rfft(x)
    spec[np.fft.rfftfreq(len(x), 1 / SR) > 12000] = 0
    lp = np.fft.irfft(spec, len(x)).astype(np.float32)
    ref = F.power_db(x).max()
    a, b = (plt.imread(io.BytesIO(F.spectrograms_png({"x": y}, SR, None, ref_db=ref)))[..., :3] for y in (x, lp))
    diff = np.abs(a - b).sum(-1) > 0.1
    h = a.shape[0]
    assert diff.sum() > 1000 and diff[: h // 2].sum() > 0.8 * diff.sum()    # image row 0 is the top
    with_line = plt.imread(io.BytesIO(F.spectrograms_png({"x": lp}, SR, 12000.0, ref_db=ref)))[..., :3]
    cyan = (with_line[..., 0] < 0.3) & (with_line[..., 1] > 0.7) & (with_line[..., 2] > 0.7)
    assert cyan.any(1).sum() >= 1 and not ((b[..., 0] < 0.3) & (b[..., 1] > 0.7) & (b[..., 2] > 0.7)).any()


def test_tb_log_samples_writes_audio_and_spectrograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    target = torch.from_numpy(np.stack([tone_sweep(0.5, seed=s) for s in range(3)]))[:, None]
    preds = {"baseline": 0.5 * target, "final": target + 0.01}
    with SummaryWriter(tmp_path) as w:
        F.tb_log_samples(w, 7, preds, target, SR, mark_hz=12000.0, max_items=2)
    ev = EventAccumulator(str(tmp_path), size_guidance={"audio": 0, "images": 0}).Reload()
    audio, images = set(ev.Tags()["audio"]), set(ev.Tags()["images"])
    assert audio == {f"samples/{i}/{n}" for i in (0, 1) for n in ("target", "baseline", "final")}
    assert images == {"samples/0/spectrogram", "samples/1/spectrogram"}
    a = ev.Audio("samples/1/final")[0]
    assert a.step == 7 and a.sample_rate == SR and a.length_frames == target.shape[-1]
    img = ev.Images("samples/0/spectrogram")[0]
    assert img.step == 7 and img.width > 2.5 * img.height           # three panels side by side
