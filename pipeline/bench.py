"""Throughput figures (benchmarks print numbers; no test times anything).

  bench precompute   x-real-time per CPU core of read+resample and of the frozen encode, for the
                     demo codec and for a snac_24khz-sized codec (random weights: same speed)
  bench train        segments/s of the loader alone, of the cached trainer, of an online trainer
                     (read WAV + resample + encode inside the loop) and of decoder fwd/bwd on
                     in-memory tensors (the compute bound), with their ratios
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.table import Table

from .data import audio as A
from .model.codec import build_codec, geometry, save_codec
from .ui import console

SNAC_24KHZ = dict(sampling_rate=24000, encoder_dim=48, encoder_rates=[2, 4, 8, 8], decoder_dim=1024,
                  decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096, codebook_dim=8,
                  vq_strides=[4, 2, 1], noise=True, depthwise=True)


def _demo_config() -> dict:
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())
    return cfg["codec"]["demo"]["config"]


def _corpus(tmp: Path, seconds: float):
    from .data.demo import generate_demo
    from .data.manifest import parse_manifest
    n = max(4, int(seconds / 2.5))
    generate_demo(tmp / "demo", seed=1, n_train=n, n_heldout=2)
    return tmp / "demo" / "manifest.jsonl", parse_manifest(tmp / "demo" / "manifest.jsonl").rows


def precompute(seconds: float = 20.0) -> None:
    from .data.precompute import encode_items
    cores = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        _, rows = _corpus(Path(tmp), seconds)
        t0 = time.perf_counter()
        items, total = [], 0.0
        for r in rows:
            x, sr = A.read_mono(r.audio)
            items.append({"x": A.resample(x, sr, 24000)})
            A.resample(x, sr, 48000)
            total += len(x) / sr
        t_read = time.perf_counter() - t0
        t = Table(title=f"precompute throughput, {total:.0f} s of audio, {cores} threads")
        for c in ("stage", "codec", "x real time", "x real time per core"):
            t.add_column(c, justify="right")
        t.add_row("read + resample (soxr HQ)", "-", f"{total / t_read:.0f}", f"{total / t_read / cores:.0f}")
        for name, cfg in (("demo", _demo_config()), ("snac_24khz size", SNAC_24KHZ)):
            codec = build_codec(cfg, 0).eval()
            geo = geometry(codec)
            for it in items:
                it.pop("codes", None)
            encode_items(codec, geo, items[:1], 64.0, "cpu")          # warm-up
            t0 = time.perf_counter()
            encode_items(codec, geo, items, 64.0, "cpu")
            dt = time.perf_counter() - t0
            t.add_row("encode (inference_mode)", name, f"{total / dt:.1f}", f"{total / dt / cores:.1f}")
        console.print(t)


def train(seconds: float = 20.0, steps: int = 6, batch_size: int = 4, segment_seconds: float = 1.0) -> None:
    from .data.cache import CACHE_FORMAT, open_cache
    from .model.codec import fingerprint, load_codec
    from .data.segments import SegmentBatches, build_pool, segment_frames
    from .training.losses import ReconstructionLoss
    from .model.snac48 import from_codec
    from .data.precompute import run_shard
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest, rows = _corpus(tmp, seconds)
        save_codec(build_codec(_demo_config(), 0), tmp / "codec")
        run_shard(manifest, 0, 1, tmp / "codec", tmp / "shard-000.zarr")
        codec = load_codec(tmp / "codec")
        fp = fingerprint(codec, 48000, CACHE_FORMAT)
        shards = open_cache([tmp / "shard-000.zarr"], preload=True, expect=fp)
        n = segment_frames(segment_seconds, shards[0].geometry)
        batches = SegmentBatches(shards, build_pool(shards, n), n, batch_size, 0, 10**6)
        model = from_codec(codec, 48000).train()
        params = [p for p in model.decoder.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-5)
        loss_fn = ReconstructionLoss(48000, {"l1": 1, "stft": 1, "mel": 1}, n_ffts=[1024, 2048, 4096])

        def step(codes, target):
            loss, _ = loss_fn(model.decode(codes), target)
            opt.zero_grad()
            loss.backward()
            opt.step()

        def online_batch(k):
            rng = np.random.default_rng([1, k])
            codes, target = [], []
            hop_c, hop_t = fp["hop"], fp["hop_target"]
            for r in (rows[i] for i in rng.integers(len(rows), size=batch_size)):
                x, sr = A.read_mono(r.audio)
                x24, x48 = A.resample(x, sr, 24000), A.resample(x, sr, 48000)
                frames = (len(x24) // hop_c - n) // 4 * 4
                off = int(rng.integers(max(1, frames // 4))) * 4
                c = model.encode(torch.from_numpy(x24)[None, None])
                codes.append([ci[0, off // s:(off + n) // s] for ci, s in zip(c, fp["strides"])])
                target.append(torch.from_numpy(x48[off * hop_t:(off + n) * hop_t]))
            return [torch.stack([c[i] for c in codes]) for i in range(len(codes[0]))], torch.stack(target)[:, None]

        def rate(fn, k0=0):
            fn(k0)
            t0 = time.perf_counter()
            for k in range(1, steps + 1):
                fn(k0 + k)
            return steps * batch_size / (time.perf_counter() - t0)

        fixed = batches[0]
        results = {
            "loader only (zarr segments)": rate(lambda k: batches[k]),
            "cached trainer (loader + fwd/bwd)": rate(lambda k: step(*batches[k]), 100),
            "online trainer (WAV + resample + encode + fwd/bwd)": rate(lambda k: step(*online_batch(k))),
            "decoder fwd/bwd on in-memory tensors": rate(lambda k: step(*fixed)),
        }
    bound = results["decoder fwd/bwd on in-memory tensors"]
    t = Table(title=f"training throughput: batch {batch_size} x {segment_seconds} s, demo-size decoder, "
                    f"{torch.get_num_threads()} threads, CPU")
    for c in ("path", "segments/s", "vs compute bound"):
        t.add_column(c, justify="right")
    for name, v in results.items():
        t.add_row(name, f"{v:.1f}", f"{v / bound:.2f}x")
    console.print(t)
    cached, online = results["cached trainer (loader + fwd/bwd)"], results["online trainer (WAV + resample + encode + fwd/bwd)"]
    console.print(f"cached / online = {cached / online:.2f}x; loader / cached trainer = "
                  f"{results['loader only (zarr segments)'] / cached:.1f}x (the loader keeps up when > 1)")
