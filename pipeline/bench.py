"""Throughput figures (benchmarks print numbers; no test times anything).

  bench precompute   x real time of each stage of a real shard job (read, resample, encode,
                     write) for the demo codec and a snac_24khz-sized codec (random weights: same
                     speed), so the slowest stage shows
  bench train        random segment reads from a synthetic cache of --cache-hours (built once
                     under results/bench/, reused): loader segments/s per worker and in total for
                     each worker count and reader (zarr-python, zarrs), and per CPU-second of a
                     worker (what a dedicated core sustains on a shared machine); rounds
                     alternate, median and spread; next to the demo-size trainer's segments/s
                     (decoder fwd/bwd + masked loss, the compute bound)
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.table import Table

from .data import audio as A
from .model.codec import OFFICIAL_CONFIGS, build_codec, geometry, save_codec
from .settings import PRECOMPUTE_DEFAULTS
from .ui import console, progress

BENCH_DIR = Path("results/bench")
TARGET_RATE = PRECOMPUTE_DEFAULTS["target_rate"]


def _demo_config() -> dict:
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())
    return cfg["codec"]["demo"]["config"]


def _spread(values) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


# ---------------------------------------------------------------------------------- precompute

def precompute(seconds: float = 20.0) -> None:
    """One shard job per codec on the same demo corpus; x real time = audio seconds / stage seconds."""
    from .data.demo import generate_demo
    from .data.precompute import STAGES, run_shard
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_demo(tmp / "demo", seed=1, n_train=max(4, int(seconds / 2.5)), n_heldout=0)
        results = {}
        for name, cfg in (("demo", _demo_config()), ("snac_24khz size", OFFICIAL_CONFIGS[TARGET_RATE // 2])):
            save_codec(build_codec(cfg, 0), tmp / name)
            st = run_shard(tmp / "demo" / "manifest.jsonl", 0, 1, tmp / name, tmp / f"{name}.zarr",
                           {"device": "cpu", "target_rate": TARGET_RATE})
            results[name] = {k: st["seconds_accepted"] / max(v, 1e-9) for k, v in st["stage_seconds"].items()}
            geo = geometry(cfg, TARGET_RATE)
            results[name]["rates"] = f"{geo.codec_rate} Hz codes, {geo.target_rate} Hz targets"
            results[name]["audio"] = st["seconds_accepted"]
    t = Table(title=f"precompute stages, x real time ({threads} threads, CPU; higher is faster)")
    t.add_column("stage")
    for name in results:
        t.add_column(f"{name}\n{results[name]['rates']}", justify="right")
    for stage in STAGES:
        cells = []
        for r in results.values():
            slowest = min(r[s] for s in STAGES) == r[stage]
            cells.append(f"{'[bold red]' if slowest else ''}{r[stage]:.1f}{' (slowest)' if slowest else ''}")
        t.add_row(stage, *cells)
    console.print(t)
    console.print(f"{results['demo']['audio']:.1f} s of demo audio per codec; read = soundfile, resample = soxr "
                  f"{PRECOMPUTE_DEFAULTS['resample_quality']} to both rates, write = int16 + crc32 + zarr (zstd, crc32c)")


# ---------------------------------------------------------------------------------- train

def synthetic_cache(hours: float, shard_hours: float = 12.5) -> Path:
    """A cache of `hours` of speech-like 48 kHz audio with random codes for the demo codec's
    geometry, 1-12 s utterances (some shorter than a 4 s segment), under results/bench/.
    Built once; complete shards of an interrupted build are kept."""
    from .data.cache import CACHE_FORMAT, CacheError, Shard, ShardWriter, open_cache, shard_name
    from .data.demo import generate_demo
    from .data.precompute import silence_codes
    from .model.codec import fingerprint
    out = BENCH_DIR / f"cache-{hours:g}h"
    count = max(1, round(hours / shard_hours))
    try:
        if len(open_cache(out)) == count:
            return out
    except CacheError:
        pass
    need = hours * 3600 * TARGET_RATE * 2 * 1.1
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < need:
        raise RuntimeError(f"a {hours:g} h cache needs up to {need / 1e9:.1f} GB, {out} has {free / 1e9:.1f} GB "
                           "free: use a smaller --cache-hours")
    codec = build_codec(_demo_config(), 0).eval()
    geo, fp = geometry(codec, TARGET_RATE), fingerprint(codec, TARGET_RATE, CACHE_FORMAT)
    silence = silence_codes(codec, geo, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        generate_demo(tmp, seed=7, n_train=24, n_heldout=0, rate=geo.target_rate, min_seconds=13, max_seconds=16)
        bank = [np.clip(A.read_mono(p)[0] * 32768, -32767, 32767).astype(np.int16)
                for p in sorted(Path(tmp, "audio").glob("*.wav"))]
    quantum = geo.pad_to // geo.hop                       # utterances are whole pad_to blocks, as SNAC pads
    per_frame = geo.hop_target
    with progress() as bar:
        task = bar.add_task(f"building {out}", total=hours * 3600)
        for k in range(count):
            if (out / shard_name(k)).is_dir():
                try:
                    Shard(out / shard_name(k))
                    bar.advance(task, hours * 3600 / count)
                    continue
                except CacheError:
                    pass
            rng, done, i = np.random.default_rng([7, k]), 0.0, 0
            w = ShardWriter(out / shard_name(k), fp, silence, k, count)
            while done < hours * 3600 / count:
                real = int(rng.uniform(1.0, 12.0) * geo.target_rate)
                frames = -(-real // (per_frame * quantum)) * quantum
                clip = bank[rng.integers(len(bank))]
                a0 = int(rng.integers(len(clip) - real))
                audio = np.zeros(frames * per_frame, np.int16)
                audio[:real] = clip[a0:a0 + real]
                codes = [rng.integers(geo.codebook_size, size=frames // s) for s in geo.strides]
                w.add(f"syn-{k}-{i}", audio, codes, dataset_id=0, source=0, source_rate=geo.target_rate,
                      samples=real, bandlimited=False, clipped=0)
                done += real / geo.target_rate
                i += 1
                bar.advance(task, real / geo.target_rate)
            w.close([], {"synthetic": True})
            if not console.is_terminal:
                console.print(f"built {out / shard_name(k)} ({i} utterances)")
    return out


def _cpu_seconds(it) -> float:
    """CPU seconds (all threads) used so far by the loader's workers, or by this process when
    it has none: what a worker needs per segment, whatever else shares the machine."""
    workers = getattr(it, "_workers", None)
    if not workers:
        return time.process_time()
    ticks = 0
    for w in workers:
        fields = Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])          # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def train(cache_hours: float = 1.0, workers=(0, 1, 2), segment_seconds: float = 4.0, batch_size: int = 8,
          rounds: int = 3, batches: int = 40, steps: int = 2) -> None:
    from .data import cache as C
    from .data.segments import SegmentBatches, build_pool, open_training_cache
    from .settings import segment_frames
    from .model.snac48 import from_codec
    from .training.losses import ReconstructionLoss
    cache = synthetic_cache(cache_hours)
    shards = open_training_cache(sorted(cache.glob("shard-*.zarr")), None, preload=False)
    geo = shards[0].geometry
    n = segment_frames(segment_seconds, geo)
    pool = build_pool(shards, n)
    data = SegmentBatches(shards, pool, n, batch_size, 0, 10**9)
    on_disk = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    console.print(f"{cache}: {len(shards)} shards, {len(pool.items)} utterances ({pool.padded} shorter than a "
                  f"segment), {sum(int(s.table['samples'].sum()) for s in shards) / geo.target_rate / 3600:.1f} h, "
                  f"{on_disk / 1e9:.1f} GB on disk; segments of {n * geo.hop_target / geo.target_rate:.2f} s, "
                  f"batch {batch_size}")
    fast = C.FAST_READS
    paths = [(w, r) for w in workers for r in (("zarr-python", "zarrs") if w else ("zarr-python",))]
    rates, per_cpu = {p: [] for p in paths}, {p: [] for p in paths}
    for r in range(rounds):                               # rounds alternate between the paths
        for j, (w, reader) in enumerate(paths):
            first = (r * len(paths) + j + 1) * 100_000        # fresh batches: no read repeats another's
            C.FAST_READS = fast if reader == "zarrs" else None  # as the workers fork
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(data, range(first, first + batches + max(1, w))), batch_size=None,
                num_workers=w, prefetch_factor=2 if w else None)
            it = iter(loader)
            for _ in range(max(1, w)):                      # workers started, first batches out
                next(it)
            t0, c0 = time.perf_counter(), _cpu_seconds(it)
            for _ in range(batches):
                next(it)
            rates[w, reader].append(batches * batch_size / (time.perf_counter() - t0))
            per_cpu[w, reader].append(batches * batch_size / (_cpu_seconds(it) - c0))
            del it, loader
    C.FAST_READS = fast
    codec = build_codec(_demo_config(), 0)
    model = from_codec(codec, geo.target_rate).train()
    params = [p for p in model.decoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5)
    loss_fn = ReconstructionLoss(geo.target_rate, {"l1": 1, "stft": 1, "mel": 1})
    batch = [data[k] for k in range(steps + 1)]
    t0 = 0.0
    for k, (codes, target, mask) in enumerate(batch):
        if k == 1:
            t0 = time.perf_counter()                      # step 0 warms up
        loss, _ = loss_fn(model.decode(codes), target, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trainer = steps * batch_size / (time.perf_counter() - t0)
    t = Table(title=f"training data: random {segment_seconds:g} s segments from zarr, {torch.get_num_threads()} "
                    f"threads, CPU (median (min-max) of {rounds} alternating rounds)")
    for c in ("loader workers", "reads", "segments/s total", "segments/s per worker",
              "segments per worker CPU-second", "x trainer"):
        t.add_column(c, justify="right")
    for (w, reader), v in rates.items():
        per = [x / max(1, w) for x in v]
        t.add_row(str(w) + (" (main process)" if not w else ""), reader, _spread(v), _spread(per),
                  _spread(per_cpu[w, reader]), f"{statistics.median(v) / trainer:.0f}x")
    t.add_row("trainer", "", f"{trainer:.2f}", "", "", "1x")
    console.print(t)
    console.print(f"trainer: demo-size decoder fwd/bwd + masked loss, batch {batch_size}, {steps} steps after one "
                  "warm-up; a GPU trainer is far faster: compare its segments/s with the loader's per worker")


def processes(nproc: int, rounds: int = 3, steps: int = 16, batch_size: int = 4) -> None:
    """Segments/s of a training phase run as 1 and as `nproc` processes (torchrun + DDP; gloo on
    CPU), side by side: the same phase through `python -m pipeline train`, alternating rounds."""
    import json
    import subprocess
    import sys

    from .data.demo import generate_demo
    from .data.precompute import run_shard
    from .settings import PHASE_DEFAULTS, TRAIN_DEFAULTS, merge, run_settings, runtime_settings
    if batch_size % nproc:
        raise ValueError(f"batch {batch_size} does not split over {nproc} processes")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_demo(tmp / "demo", seed=1, n_train=8, n_heldout=2, min_seconds=2.0, max_seconds=3.0)
        save_codec(build_codec(_demo_config(), 0), tmp / "codec")
        run_shard(tmp / "demo/manifest.jsonl", 0, 1, tmp / "codec", tmp / "cache/shard-000.zarr")
        run_shard(tmp / "demo/heldout.jsonl", 0, 1, tmp / "codec", tmp / "heldout/shard-000.zarr")
        geo = geometry(_demo_config(), TARGET_RATE)
        s = merge(merge(TRAIN_DEFAULTS, PHASE_DEFAULTS["full"]),
                  {"steps": steps, "batch_size": batch_size, "segment_seconds": 1.0, "warmup_steps": 1,
                   "val_every": 10 ** 6, "ckpt_every": 10 ** 6, "log_every": 1, "num_workers": 0,
                   "n_ffts": [512, 1024, 2048]})
        rates = {1: [], nproc: []}
        for r in range(rounds):
            for n in rates:
                out = tmp / f"run-{r}-{n}"
                cmd = [sys.executable, "-m", "pipeline", "train", "--phase", "full", "--settings",
                       json.dumps(run_settings(s)), "--runtime", json.dumps({**runtime_settings(s), "nproc_per_node": n}),
                       "--codec", str(tmp / "codec"), "--target-rate", str(geo.target_rate),
                       "--cache", str(tmp / "cache/shard-000.zarr"), "--heldout", str(tmp / "heldout/shard-000.zarr"),
                       "--out", str(out)]
                subprocess.run(cmd, check=True, capture_output=True)
                rates[n].append(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["segments_per_s"])
    t = Table(title=f"training segments/s, demo-size decoder (full phase), batch {batch_size} x 1 s, {steps} steps, "
                    f"CPU/gloo, {os.cpu_count()} cores (median (min-max) of {rounds} alternating rounds)")
    for c in ("processes", "segments/s", "vs 1 process"):
        t.add_column(c, justify="right")
    for n, v in rates.items():
        t.add_row(str(n), _spread(v), f"{statistics.median(v) / statistics.median(rates[1]):.2f}x")
    console.print(t)
