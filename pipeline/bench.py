"""Throughput figures (benchmarks print numbers; no test times anything).

  bench precompute   x real time of each stage of a real shard job (read, resample, encode,
                     write) for the demo codec and a snac_24khz-sized codec (random weights: same
                     speed), so the slowest stage shows
  bench dag          wall and CPU seconds and peak RSS of Snakemake itself with a synthetic manifest
                     of --rows lines: dry run, no-op rerun, and a cluster job's own parse
  bench train        random segment reads from a synthetic cache of --cache-hours (built once
                     under results/bench/, reused): loader segments/s per worker and in total for
                     each worker count and reader (zarr-python, zarrs), and per CPU-second of a
                     worker (what a dedicated core sustains on a shared machine); rounds
                     alternate, median and spread; next to the demo-size trainer's segments/s
                     (decoder fwd/bwd + masked loss, the compute bound)
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.table import Table

from .data import audio as A
from .model import codecs
from .settings import PRECOMPUTE_DEFAULTS, segment_frames, segment_samples
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
        for name, cfg in (("demo", _demo_config()), ("snac_24khz size", codecs.shapes("snac_24khz"))):
            st = run_shard(tmp / "demo" / "manifest.jsonl", 0, 1, codecs.build(cfg, 0), tmp / f"{name}.zarr",
                           {"device": "cpu", "target_rate": TARGET_RATE})
            results[name] = {k: st["seconds_accepted"] / max(v, 1e-9) for k, v in st["stage_seconds"].items()}
            geo = codecs.geometry(cfg, TARGET_RATE)
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

def synthetic_cache(hours: float, shard_hours: float = 12.5, codec_config: dict | None = None,
                    out: Path | None = None, n_q: int | None = None) -> Path:
    """A cache of `hours` of speech-like 48 kHz audio with random codes for the geometry of
    `codec_config` (default: the demo codec's; its fingerprint is that of codecs.build(config, 0)),
    1-12 s utterances (some shorter than a 4 s segment), under results/bench/ (or `out`).
    Built once; complete shards of an interrupted build are kept."""
    from .data.cache import CACHE_FORMAT, CacheError, Shard, ShardWriter, open_cache, shard_name
    from .data.demo import generate_demo
    from .data.precompute import silence_codes
    out = Path(out) if out else BENCH_DIR / f"cache-{hours:g}h"
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
    codec = codecs.build(codec_config or _demo_config(), 0, n_q).eval()
    geo, fp = codec.geometry_at(TARGET_RATE), codec.fingerprint(TARGET_RATE, CACHE_FORMAT)
    silence = silence_codes(codec, geo, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        generate_demo(tmp, seed=7, n_train=24, n_heldout=0, rate=geo.target_rate, min_seconds=13, max_seconds=16)
        bank = [np.clip(A.read_mono(p)[0] * 32768, -32767, 32767).astype(np.int16)
                for p in sorted(Path(tmp, "audio").glob("*.wav"))]
    quantum = geo.pad_to // geo.hop                       # utterances are whole pad_to blocks, as the codec pads
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
    # "zarrs, unchecked": without the per-position chunk checksums, to measure what they cost
    paths = [(w, r) for w in workers for r in (("zarr-python", "zarrs", "zarrs, unchecked") if w else ("zarr-python",))]
    rates, per_cpu = {p: [] for p in paths}, {p: [] for p in paths}
    for r in range(rounds):                               # rounds alternate between the paths
        for j, (w, reader) in enumerate(paths):
            first = (r * len(paths) + j + 1) * 100_000        # fresh batches: no read repeats another's
            C.FAST_READS = fast if reader.startswith("zarrs") else None  # as the workers fork
            C.CHECK_READS = reader != "zarrs, unchecked"
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
    C.FAST_READS, C.CHECK_READS = fast, True
    model = codecs.from_codec(codecs.build(_demo_config(), 0), geo.target_rate).train()
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
    from .data.demo import generate_demo
    from .data.precompute import run_shard
    from .settings import phase_settings, run_settings, runtime_settings
    if batch_size % nproc:
        raise ValueError(f"batch {batch_size} does not split over {nproc} processes")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_demo(tmp / "demo", seed=1, n_train=8, n_heldout=2, min_seconds=2.0, max_seconds=3.0)
        codec = codecs.build(_demo_config(), 0)
        codec.save(tmp / "codec")
        run_shard(tmp / "demo/manifest.jsonl", 0, 1, codec, tmp / "cache/shard-000.zarr")
        run_shard(tmp / "demo/heldout.jsonl", 0, 1, codec, tmp / "heldout/shard-000.zarr")
        geo = codec.geometry_at(TARGET_RATE)
        s = phase_settings({"train": {"full": {
            "steps": steps, "batch_size": batch_size, "segment_seconds": 1.0, "warmup_steps": 1, "val_every": 10 ** 6,
            "ckpt_every": 10 ** 6, "log_every": 1, "num_workers": 0, "n_ffts": [512, 1024, 2048]}}}, "full")
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


# ---- bench dag: Snakemake's own cost with a large manifest ---------------------------------------
DAG_TARGET = "results/phase11/final.pt"
_REPO = Path(__file__).resolve().parents[1]
_WORKFLOW = ("Snakefile", "workflow", "config", "pipeline")
_SLURM_STUBS = {   # just enough of SLURM for snakemake-executor-plugin-slurm to submit one job
    "sbatch": 'cat >> "$STUB_LOG"; printf "%s\\n" "$@" | grep -- "--wrap=" >> "$STUB_LOG"; echo 4242',
    "sacctmgr": "echo bench", "sshare": "echo bench", "sinfo": "echo bench", "scontrol": "true",
    "squeue": "true", "sacct": "true", "scancel": "true",
}


def dag_tree(root, rows: int, shards: int = 64, files: int = 4, heldout: int = 200) -> Path:
    """A copy of the workflow with a synthetic corpus: `rows` manifest lines, each its own path, a
    hard link to one of `files` real 1 s 48 kHz WAVs (more for large `rows`: at most 50,000 links
    each; links cost no inode and stat() like real files), a held-out manifest, and a
    snac_24khz-sized codec folder whose weights file is a placeholder (the bench runs no job).
    Config: config/snac_24khz.yaml + bench.yaml."""
    import soundfile as sf
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in _WORKFLOW:
        src, dst = _REPO / name, root / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    c = root / "corpus"
    (c / "real").mkdir(parents=True, exist_ok=True)
    files = max(files, rows // 50_000 + 1)      # ext4 allows 65,000 links to one file
    rng = np.random.default_rng(0)
    real = []
    for i in range(files):
        p = c / "real" / f"real-{i}.wav"
        if not p.exists():
            sf.write(p, (0.1 * rng.standard_normal(48000)).astype(np.float32), 48000, subtype="PCM_16")
        real.append(p)

    def link(rel: str, i: int):
        dst = c / rel
        if not dst.exists():
            os.link(real[i % files], dst)

    with open(c / "train.jsonl", "w") as f:
        for i in range(rows):
            folder = c / "audio" / f"{i // 1000:04d}"
            if i % 1000 == 0:
                folder.mkdir(parents=True, exist_ok=True)
            rel = f"audio/{i // 1000:04d}/u{i:07d}.wav"
            link(rel, i)
            f.write(f'{{"audio": "{rel}", "id": "u{i:07d}", "text": "a few words", "dataset_id": {i % 2}}}\n')
    (c / "heldout").mkdir(exist_ok=True)
    with open(c / "heldout.jsonl", "w") as f:
        for i in range(heldout):
            link(f"heldout/h{i:05d}.wav", i)
            f.write(f'{{"audio": "heldout/h{i:05d}.wav", "id": "h{i:05d}"}}\n')
    codec = c / "codec"
    codec.mkdir(exist_ok=True)
    (codec / "config.json").write_text(json.dumps(codecs.shapes("snac_24khz")))
    (codec / "model.safetensors").write_bytes(b"placeholder: the bench runs no job")
    (root / "bench.yaml").write_text(yaml.safe_dump({
        "manifest": str(c / "train.jsonl"), "heldout_manifest": str(c / "heldout.jsonl"),
        "codec": {"pretrained": str(codec)}, "precompute": {"shards": shards, "heldout_shards": 1}}))
    return root


def _snakemake_args(extra=(), target=DAG_TARGET) -> list:
    # the target first: --configfile takes several values and would swallow it
    return [sys.executable, "-m", "snakemake", target, "--cores", "8",
            "--configfile", "config/snac_24khz.yaml", "bench.yaml", *extra]


# Runs a command and reports its rusage. A small process of its own: a child forked from this
# one (torch imported) would inherit its resident pages into ru_maxrss.
_RUSAGE = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.call(sys.argv[2:]); w = time.perf_counter() - t; "
           "ru = resource.getrusage(resource.RUSAGE_CHILDREN); "
           "open(sys.argv[1], 'w').write(json.dumps([rc, w, ru.ru_utime + ru.ru_stime, ru.ru_maxrss]))")


def _timed(cmd, cwd, env=None) -> dict:
    """Wall seconds, CPU seconds and peak RSS (the largest process of its tree) of one command."""
    env = {**os.environ, **(env or {})}
    env.pop("SNAKEMAKE_PROFILE", None)
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "rusage.json"
        p = subprocess.run([sys.executable, "-S", "-c", _RUSAGE, str(res), *cmd], cwd=cwd, env=env,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rc, wall, cpu, rss_kb = json.loads(res.read_text())
    return {"rc": rc, "out": p.stdout, "wall": wall, "cpu": cpu, "rss_mb": rss_kb / 1024}


def _check(r: dict, what: str, expect: str | None = None) -> dict:
    if r["rc"] != 0 or (expect and expect not in r["out"]):
        raise RuntimeError(f"bench dag: {what} failed (rc {r['rc']}):\n{r['out'][-3000:]}")
    return r


def _outputs(dry_run_text: str) -> list:
    """Every output path of the jobs a dry run lists."""
    out = []
    for line in dry_run_text.splitlines():
        if line.startswith("    output: "):
            out += line[len("    output: "):].split(", ")
    return out


def _fake_build(root: Path, dry_run_text: str) -> dict:
    """Everything built, as far as Snakemake knows: each output created (shards as folders), then
    `snakemake --touch --forceall` records them (params included) in DAG order. Outputs without a
    suffix (shards' `.zarr` aside) are the `directory()` outputs, such as the evaluation clips."""
    for o in _outputs(dry_run_text):
        p = root / o
        if o.endswith(".zarr") or not p.suffix:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
    env = {"PATH": f"{_slurm_stubs(root)}{os.pathsep}{os.environ['PATH']}"}
    return _check(_timed(_snakemake_args(["--touch", "--forceall", "--quiet"]), root, env), "snakemake --touch")


def _slurm_stubs(root: Path) -> Path:
    stubs = root / ".bench-slurm"
    stubs.mkdir(exist_ok=True)
    for name, body in _SLURM_STUBS.items():
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    return stubs


def _scontrol_seconds() -> float | None:
    """snakemake-executor-plugin-slurm runs `scontrol show config` when it is imported, i.e. in
    every snakemake invocation, whatever the executor (timeout 10 s)."""
    if not shutil.which("scontrol"):
        return None
    t0 = time.perf_counter()
    subprocess.run(["scontrol", "show", "config"], capture_output=True, timeout=30)
    return time.perf_counter() - t0


def _jobstep_command(root: Path, force: str) -> str:
    """The command snakemake-executor-plugin-slurm submits for the first job that runs after
    `--forcerun force`, captured from a stub sbatch (the stubs answer the plugin's account and
    partition queries). The main process is killed once the job is submitted, and .snakemake/ is
    put back as it was (the submission marked the job's output incomplete)."""
    stubs = _slurm_stubs(root)
    log, out = stubs / "sbatch.log", stubs / "snakemake.out"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log)}
    env.pop("SNAKEMAKE_PROFILE", None)
    args = _snakemake_args(["--executor", "slurm", "--jobs", "1", "--nolock", "--forcerun", force,
                            "--default-resources", "slurm_account=bench", "slurm_partition=bench"])
    saved = root / ".snakemake.bench-saved"
    shutil.rmtree(saved, ignore_errors=True)
    shutil.copytree(root / ".snakemake", saved, symlinks=True)
    try:
        with open(out, "w") as f:
            p = subprocess.Popen(args, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 900
            while "--wrap=" not in (log.read_text() if log.exists() else ""):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("bench dag: the SLURM plugin submitted no job:\n"
                                       + out.read_text()[-3000:])
                time.sleep(0.2)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    finally:
        shutil.rmtree(root / ".snakemake")
        saved.rename(root / ".snakemake")
    cmd = shlex.split(log.read_text().split("--wrap=", 1)[1].strip())
    # --wait-for-files lists the job's inputs (--wait-for-files-file: a list in the main process's
    # temporary folder, gone with it, when more than 20): they all exist here, so no wait
    for opt in ("--wait-for-files", "--wait-for-files-file"):
        if opt in cmd:
            i = cmd.index(opt)
            j = next((k for k in range(i + 1, len(cmd)) if cmd[k].startswith("--")), len(cmd))
            cmd = cmd[:i] + cmd[j:]
    return shlex.join(cmd)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def dag(rows: int = 100_000, shards: int = 64, rounds: int = 3, keep: str | None = None) -> dict:
    """Dry run, no-op rerun and a cluster job's own parse with a manifest of `rows` lines, each
    `rounds` times in alternation (the machine is shared: median and spread are printed)."""
    import contextlib
    load0 = os.getloadavg()[0]
    ctx = contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="bench-dag-")
    with ctx as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        dag_tree(root, rows, shards)
        console.print(f"bench dag: {rows:,} rows in {shards} shards, tree built in "
                      f"{time.perf_counter() - t0:.0f} s under {root}")
        shutil.rmtree(root / ".snakemake", ignore_errors=True)
        # every measured command sees the stubs first: a slow `scontrol` (a SLURM install whose
        # controller does not answer) would add its delay to each invocation
        stub_env = {"PATH": f"{_slurm_stubs(root)}{os.pathsep}{os.environ['PATH']}"}
        runs = {}

        def add(name, r):
            runs.setdefault(name, []).append(r)

        # the first dry run parses the manifest and checks the config; later ones find both under
        # .snakemake/ (the manifest index is rebuilt after every manifest edit)
        cold = _check(_timed(_snakemake_args(["-n"]), root, stub_env), "dry run")
        add("dry run, first (no caches)", cold)
        _fake_build(root, cold["out"])
        noop, edited = "no-op rerun", "dry run, index rebuilt"
        jobs = {"cluster job precompute_shard": _jobstep_command(root, "results/cache/shard-007.zarr"),
                "cluster job train": _jobstep_command(root, "results/phase11/warmup/model.safetensors")}
        for _ in range(rounds):
            shutil.rmtree(root / ".snakemake/phase11-manifest-index", ignore_errors=True)
            add(edited, _check(_timed(_snakemake_args(["-n"]), root, stub_env), edited, "Nothing to be done"))
            add("dry run", _check(_timed(_snakemake_args(["-n"]), root, stub_env), "dry run", "Nothing to be done"))
            add(noop, _check(_timed(_snakemake_args(), root, stub_env), noop, "Nothing to be done"))
            for name, cmd in jobs.items():
                add(name, _check(_timed(["bash", "-c", cmd + " --dry-run --printshellcmds"], root, stub_env), name))
    t = Table(title=f"Snakemake with a {rows:,}-row manifest, {shards} shards "
                    f"({os.cpu_count()} CPUs, load average {load0:.1f} at start, "
                    f"{os.getloadavg()[0]:.1f} at end)")
    for c in ("what", "runs", "wall s", "wall min-max", "CPU s", "peak RSS MB"):
        t.add_column(c, justify="right", no_wrap=True)
    result = {}
    for name, rs in runs.items():
        wall, cpu, rss = [r["wall"] for r in rs], [r["cpu"] for r in rs], max(r["rss_mb"] for r in rs)
        t.add_row(name, str(len(rs)), f"{_median(wall):.1f}", f"{min(wall):.1f}-{max(wall):.1f}",
                  f"{_median(cpu):.1f}", f"{rss:.0f}")
        result[name] = {"wall": wall, "cpu": cpu, "rss_mb": rss}
    console.print(t, width=max(console.width, 100))
    sc = _scontrol_seconds()
    if sc is not None:
        console.print(f"Not counted above: `scontrol show config` took {sc:.1f} s here; "
                      "snakemake-executor-plugin-slurm runs it on import, in every snakemake invocation "
                      "(a stub stood in for it).")
    console.print(
        f"dry run: snakemake -n {DAG_TARGET}; first: no caches under .snakemake/ (the manifest index, the "
        "passed parameter-group check: torch imported); index rebuilt: the manifest parsed again, as after "
        "any manifest edit. no-op rerun: snakemake without -n after everything was built (outputs "
        "created, then recorded by --touch). cluster job: the command snakemake-executor-plugin-slurm "
        "submits for that job (captured from a stub sbatch) with --dry-run --printshellcmds appended: "
        "everything but running the shell command (its --wait-for-files dropped: the files exist). "
        "wall and CPU s: medians; peak RSS: the largest process.")
    return result


# ---- bench throughput: the trainer beside its bound, per phase of a preset -------------------------
# Issue 17's goals on one H100/H200, audio seconds per second (segments x segment length)
GOALS = {"warmup": 800.0, "full": 250.0, "lora": 300.0}
GOAL_RATIO = 0.9          # the trainer against its bound


class _Bar:              # train.log's progress bar, silent
    def update(self, *a, **k):
        pass


@contextlib.contextmanager
def _quiet():
    """The trainer's own printing (preflight table, log lines) off: the bench prints its table."""
    was, console.quiet = console.quiet, True
    try:
        yield
    finally:
        console.quiet = was


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pinned(batch, device):
    codes, target, mask = batch
    pin = (lambda x: x.pin_memory()) if device.type == "cuda" else (lambda x: x)
    return [pin(c) for c in codes], pin(target), pin(mask)


def bench_trainer(phase: str, s: dict, codec_dir, shards: list, out: Path, adapter: str = "default"):
    """A Trainer as `python -m pipeline train` builds it (loader, precision, checkpointing,
    compile), on a synthetic cache, its run folder `out` emptied first."""
    from .gpus import pick_device
    from .settings import complete
    from .training import train as T
    from .training.distributed import Group
    shutil.rmtree(out, ignore_errors=True)
    with _quiet():
        return T.setup(phase, complete(s, f"train.{phase}"), group=Group(), device=pick_device(s["device"]),
                       codec_dir=codec_dir, target_rate=TARGET_RATE, cache_paths=shards, heldout_paths=shards, out=out,
                       adapter=adapter)


def phase_throughput(t, steps: int = 4, rounds: int = 2) -> dict:
    """The trainer's steady-state rate beside its bound, one phase, alternating rounds:
      trainer: `steps` train_steps on the loader's batches, ending with a logged step (log line,
               metrics.jsonl, TensorBoard), plus one step checkpoint's time spread over ckpt_every;
      bound:   the same train_step on one in-memory batch, repeated (no loader, no logging).
    A first window of `steps` (compilation, the loader's first batches) is timed on its own.
    -> figures per optimizer step, where the time goes, peak memory."""
    from .training import train as T
    from .training.device import use_compile
    s, device = t.s, t.device
    per_step = s["batch_size"] * s["grad_accum"]
    geo = t.model.geometry
    seg_s = segment_samples(s, geo) / geo.target_rate
    loader = t.batches
    memory = itertools.repeat(_pinned(next(loader), device))
    t.s = s = {**s, "log_every": steps}           # each window ends with a logged step
    step, logged = 0, []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def window(source, log: bool) -> float:
        nonlocal step
        t.batches = source
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step += 1
            record = T.train_step(t, step)
            if log and "segments_per_s" in record:
                with _quiet():
                    T.log(t, record, _Bar(), None)
                logged.append(record)
        _sync(device)
        return (time.perf_counter() - t0) / steps

    first = window(loader, True)
    times = {"trainer": [], "bound": []}
    for _ in range(rounds):
        times["trainer"].append(window(loader, True))
        times["bound"].append(window(memory, False))
    t0 = time.perf_counter()
    T.save(t)
    ckpt = time.perf_counter() - t0
    parts = step_parts(t, memory, step + 1)
    trainer = [x + ckpt / s["ckpt_every"] for x in times["trainer"]]
    rate = lambda xs: [per_step * seg_s / x for x in xs]
    row = {"micro_batch": s["batch_size"], "grad_accum": s["grad_accum"], "segment_s": round(seg_s, 3),
           "checkpointing": s["activation_checkpointing"], "precision": s["precision"],
           "compile": use_compile(s["compile"], device), "first_window_s_per_step": first,
           "trainer_s_per_step": trainer, "bound_s_per_step": times["bound"], "checkpoint_s": ckpt,
           "ckpt_every": s["ckpt_every"], "trainer_audio_s_per_s": rate(trainer), "bound_audio_s_per_s": rate(times["bound"]),
           "logged_segments_per_s": [r["segments_per_s"] for r in logged[1:]],
           "loader_wait": statistics.median(r["loader_wait"] for r in logged[1:]) if len(logged) > 1 else None,
           "parts_s": parts}
    row["ratio"] = statistics.median(row["trainer_audio_s_per_s"]) / statistics.median(row["bound_audio_s_per_s"])
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 1024 ** 3
    return row


def step_parts(t, batches, step: int) -> dict:
    """One optimizer step on in-memory batches, timed part by part (the device synchronised
    between parts, so the parts add up to more than a real step): where a step's time goes."""
    from .training import train as T
    s, device = t.s, t.device
    t.batches = batches
    parts, last = {}, [0.0]

    def mark(name):
        _sync(device)
        now = time.perf_counter()
        parts[name] = parts.get(name, 0.0) + now - last[0]
        last[0] = now
    t.model.train()
    t.opt.zero_grad(set_to_none=True)
    mark("start")
    for i in range(s["grad_accum"]):
        batch, pad, _ = T.next_batch(t)
        mark("batch to the device")
        T.micro_batch(t, step, i, batch, pad, mark)
    torch.nn.utils.clip_grad_norm_(t.trainable, s["grad_clip"] or float("inf"))
    t.opt.step()
    mark("gradient clip + optimizer")
    parts.pop("start")
    return parts


# ---------------------------------------------------------------------------------- memory

GPU_GB = 80          # an H100's memory: a preset must fit it with 10 % headroom


def preset(configfiles: list, one_adapter: bool = False) -> tuple:
    """A preset layered over config/config.yaml (as Snakemake does): (config with defaults, the
    codec's constructor config, where that came from, {job name: settings} for every training job
    of the chain, a LoRA adapter as lora:<name> (one_adapter: the first adapter alone)). Without the
    codec's weights here, a
    published codec's shapes by the folder's name (snac_24khz, mimi, ...: random weights, the same
    speed and memory)."""
    from .configdiff import load_config
    from .settings import phase_settings, training_jobs, with_defaults
    root = Path(__file__).resolve().parents[1]
    cfg = with_defaults(load_config([root / "config" / "config.yaml", *configfiles]))
    folder = cfg["codec"]["pretrained"]
    if folder and (Path(folder) / "config.json").is_file():
        codec_cfg, source = json.loads((Path(folder) / "config.json").read_text()), folder
    elif folder:
        if Path(folder).name not in codecs.shape_names():
            raise SystemExit(f"error: codec.pretrained {folder} has no config.json here, and its name is not one of "
                             f"the published codecs ({', '.join(codecs.shape_names())}) whose shape the benches know")
        codec_cfg, source = codecs.shapes(Path(folder).name), f"random weights shaped like {Path(folder).name}"
    else:
        codec_cfg, source = cfg["codec"]["demo"]["config"], "the demo codec's config"
    jobs = training_jobs(cfg)
    if one_adapter:             # the first adapter of each phase with adapters
        jobs = [j for j in jobs if j == next(k for k in jobs if k.phase == j.phase)]
    phases = {j.name: phase_settings(cfg, j.phase, j.adapter) for j in jobs}
    return cfg, codec_cfg, source, phases


def memory(configfiles: list, other_checkpointing: bool = False, one_adapter: bool = False) -> list:
    """bench memory: peak training memory per phase of a preset (layered over config/config.yaml,
    as Snakemake does; pipeline/training/memory.py measures on CUDA, estimates on the CPU), with a
    random-weight codec of the preset's shapes when its weights are not on this machine;
    other_checkpointing: each phase also with activation checkpointing the other way (marked
    "what if"), the figures that re-size a preset."""
    from .training.memory import GIB, peak_memory
    cfg, codec_cfg, source, phases = preset(configfiles, one_adapter)
    how = "measured" if torch.cuda.is_available() else "estimated on the CPU from saved tensors (no GPU here)"
    t = Table(title=f"peak training memory per process, {how}: {' '.join(map(str, configfiles))} ({source})")
    for c in ("phase", "micro-batch", "grad_accum", "checkpointing", "precision", "adversarial", "peak GiB",
              f"fits {GPU_GB:g} GB - 10 %"):
        t.add_column(c)
    rows = []
    if other_checkpointing:
        phases = {k: v for name, s in phases.items() for k, v in
                  ((name, s), (f"{name} (what if)", {**s, "activation_checkpointing": not s["activation_checkpointing"]}))}
    for name, s in phases.items():
        r = peak_memory(codec_cfg, cfg["codec"]["target_rate"], s, cfg["codec"].get("n_q"))
        row = {"phase": name, "micro_batch": s["batch_size"] // s["nproc_per_node"],
               "segment_seconds": s["segment_seconds"], "grad_accum": s["grad_accum"],
               "checkpointing": s["activation_checkpointing"], "precision": s["precision"],
               "adversarial": s["adversarial"]["enabled"], **r, "fits": r["peak_gib"] * GIB <= 0.9 * GPU_GB * 1e9}
        rows.append(row)
        t.add_row(name, f"{row['micro_batch']} x {s['segment_seconds']} s", str(s["grad_accum"]),
                  str(s["activation_checkpointing"]), s["precision"], str(s["adversarial"]["enabled"]),
                  f"{r['peak_gib']:.1f}", "yes" if row["fits"] else "[red]no")
    console.print(t, width=max(console.width, 130))
    return rows


def bench_setup(configfiles, work: Path, cache_hours: float, overrides: dict | None = None):
    """(preset config, phases' settings, codec folder, cache shards) for the GPU benches: a
    random-weight codec of the preset's shapes and a synthetic cache of its geometry under `work`.
    One LoRA adapter stands for all (the same step); every dataset's segments are used."""
    from .settings import merge
    cfg, codec_cfg, source, phases = preset(configfiles, one_adapter=True)
    codec_dir, n_q = work / "codec", cfg["codec"].get("n_q")
    if not (codec_dir / "config.json").is_file():
        codecs.build(codec_cfg, 0).save(codec_dir)
    cache = synthetic_cache(cache_hours, shard_hours=cache_hours, codec_config=codec_cfg,
                            out=work / f"cache-{cache_hours:g}h", n_q=n_q)
    fixed = {"preload": False, "val_batches": 1, "steps": 10 ** 6, "resume": False, "dataset_ids": None,
             **(overrides or {})}
    phases = {name: merge(s, fixed) for name, s in phases.items()}
    return cfg, source, phases, codec_dir, sorted(cache.glob("shard-*.zarr"))


def throughput(configfiles=("config/snac_24khz.yaml",), steps: int = 4, rounds: int = 2, cache_hours: float = 0.1,
               work: Path | None = None, overrides: dict | None = None, only=None) -> list:
    """Per phase of a preset at its micro-batch: the trainer's steady-state audio seconds per
    second (loader, logging and checkpoints included, validation excluded) beside its bound (the
    same training step on in-memory tensors); median (min-max) of alternating rounds."""
    work = Path(work or BENCH_DIR / "throughput")
    cfg, source, phases, codec_dir, shards = bench_setup(configfiles, work, cache_hours, overrides)
    rows = []
    for name, s in phases.items():
        if only and name.split(":")[0] not in only:
            continue
        phase, _, adapter = name.partition(":")
        t = bench_trainer(phase, s, codec_dir, shards, work / "runs" / name.replace(":", "-"), adapter or "default")
        row = {"phase": name, **phase_throughput(t, steps, rounds), "goal_audio_s_per_s": GOALS.get(phase)}
        rows.append(row)
        del t
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    show_throughput(rows, f"{' '.join(map(str, configfiles))} ({source})")
    return rows


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _med(xs) -> str:
    return f"{_num(statistics.median(xs))} ({_num(min(xs))}-{_num(max(xs))})" if xs else "-"


def show_throughput(rows: list, what: str) -> None:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    t = Table(title=f"training throughput, audio s per s, {dev}: {what}")
    for c in ("phase", "micro-batch", "trainer", "bound", "trainer/bound", "goal", "loader wait", "checkpoint",
              "first steps", "peak GiB"):
        t.add_column(c, justify="right")
    for r in rows:
        goal = r.get("goal_audio_s_per_s")
        tr = statistics.median(r["trainer_audio_s_per_s"])
        met = (goal is None or tr >= goal) and r["ratio"] >= GOAL_RATIO
        t.add_row(r["phase"], f"{r['micro_batch']} x {r['segment_s']:g} s x {r['grad_accum']}"
                  + (", ckpt" if r["checkpointing"] else "") + (", compiled" if r["compile"] else ""),
                  _med(r["trainer_audio_s_per_s"]), _med(r["bound_audio_s_per_s"]),
                  f"{'' if r['ratio'] >= GOAL_RATIO else '[red]'}{r['ratio']:.2f}",
                  f"{'' if met else '[red]'}{goal:g}" if goal else "-",
                  f"{100 * r['loader_wait']:.0f} %" if r["loader_wait"] is not None else "-",
                  f"{r['checkpoint_s']:.1f} s / {r['ckpt_every']} steps", f"{r['first_window_s_per_step']:.1f} s/step",
                  f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-")
    console.print(t, width=max(console.width, 150))
    for r in rows:
        total = sum(r["parts_s"].values())
        console.print(f"{r['phase']}: one step part by part (synchronised, {total:.2f} s): " + ", ".join(
            f"{k} {100 * v / total:.0f} %" for k, v in sorted(r["parts_s"].items(), key=lambda kv: -kv[1])))
    console.print(f"trainer: train_step on the loader's batches + one logged step per window + a step checkpoint's "
                  f"time over ckpt_every; bound: the same train_step on one in-memory batch; goal: issue 17's on one "
                  f"H100/H200 (trainer >= {GOAL_RATIO} x bound); loader wait: share of the trainer's time it waited "
                  "for data (logged as loader_wait)")


# ---- bench precision: speed and the new band's SNR of each precision -----------------------------
def band_snr(ref: torch.Tensor, x: torch.Tensor, rate: int, lo: float, hi: float) -> float:
    """SNR (dB) of x against ref within [lo, hi] Hz, over the whole batch."""
    R, X = torch.fft.rfft(ref.double(), dim=-1), torch.fft.rfft(x.double(), dim=-1)
    f = torch.fft.rfftfreq(ref.shape[-1], 1 / rate)
    k = (f >= lo) & (f <= hi)
    return float(10 * torch.log10((R[..., k].abs() ** 2).sum() / ((R[..., k] - X[..., k]).abs() ** 2).sum()))


def alternating(t, variants, use, steps: int, rounds: int) -> dict:
    """Trainer t's train_step under each variant (`use(v)` switches to it): one warm-up step each
    (cuDNN picks its kernels), then `rounds` rounds of `steps` steps, the variants in turn.
    -> {variant: [seconds per step, one per round]}."""
    from .training import train as T
    times, step = {v: [] for v in variants}, 0
    for v in variants:
        use(v)
        step += 1
        T.train_step(t, step)
    for _ in range(rounds):
        for v in variants:
            use(v)
            _sync(t.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step += 1
                T.train_step(t, step)
            _sync(t.device)
            times[v].append((time.perf_counter() - t0) / steps)
    return times


def precision(configfiles=("config/snac_24khz.yaml",), steps: int = 2, rounds: int = 2, cache_hours: float = 0.1,
              work: Path | None = None, overrides: dict | None = None, only=None) -> list:
    """Each precision (fp32, tf32, bf16) on each phase's training step, eager (so only the math
    differs), alternating rounds: seconds per optimizer step; and the 48 kHz output's SNR against
    IEEE fp32, whole band and codec Nyquist..target Nyquist (smart init, noise off)."""
    from .training.device import PRECISIONS, set_precision

    def use(p):                                           # the trainer's decoder path in precision p
        t.decoder.bf16 = set_precision(p, t.device, t.model)[0]
    work = Path(work or BENCH_DIR / "throughput")
    cfg, source, phases, codec_dir, shards = bench_setup(configfiles, work, cache_hours,
                                                         {**(overrides or {}), "compile": False})
    rows = []
    for name, s in phases.items():
        if only and name.split(":")[0] not in only:
            continue
        phase, _, adapter = name.partition(":")
        t = bench_trainer(phase, s, codec_dir, shards, work / "runs" / f"precision-{name.replace(':', '-')}",
                          adapter or "default")
        memory = itertools.repeat(_pinned(next(t.batches), t.device))
        t.batches, t.s = memory, {**t.s, "log_every": 10 ** 9}
        times = alternating(t, PRECISIONS, use, steps, rounds)
        codes = [c[:4].to(t.device) for c in next(memory)[0]]
        out = {}
        t.model.train()
        with torch.no_grad(), t.model.noise_disabled():
            for p in PRECISIONS:
                use(p)
                out[p] = t.decoder(t.model.latents(codes)).float().cpu()
        use(s["precision"])
        geo = t.model.geometry
        for p in PRECISIONS:
            rows.append({"phase": name, "precision": p, "s_per_step": times[p],
                         "vs_fp32": statistics.median(times["fp32"]) / statistics.median(times[p]),
                         "snr_db": band_snr(out["fp32"], out[p], geo.target_rate, 0, geo.target_rate / 2),
                         "snr_new_band_db": band_snr(out["fp32"], out[p], geo.target_rate, geo.codec_rate / 2,
                                                     geo.target_rate / 2)})
        del t
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (every precision is fp32 there)"
    tab = Table(title=f"precision, eager training step and 48 kHz output vs IEEE fp32, {dev}: "
                      f"{' '.join(map(str, configfiles))} ({source})")
    for c in ("phase", "precision", "s per step", "speed vs fp32", "SNR dB", "SNR 12-24 kHz dB"):
        tab.add_column(c, justify="right")
    for r in rows:
        snr = "exact" if r["precision"] == "fp32" else f"{r['snr_db']:.1f}"
        new = "exact" if r["precision"] == "fp32" else f"{'' if r['snr_new_band_db'] >= 45 else '[red]'}{r['snr_new_band_db']:.1f}"
        xs = r["s_per_step"]
        tab.add_row(r["phase"], r["precision"], f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})", f"{r['vs_fp32']:.2f}x",
                    snr, new)
    console.print(tab, width=max(console.width, 120))
    console.print("the default is the fastest precision whose new band stays >= 45 dB SNR against fp32 in every phase "
                  "(pipeline/training/device.py)")
    return rows


# ---- bench discriminators: what a phase's discriminator passes cost --------------------------------
def discriminators(configfiles=("config/snac_24khz.yaml",), steps: int = 2, rounds: int = 2, cache_hours: float = 0.1,
                   work: Path | None = None, overrides: dict | None = None, only=None,
                   crops=(None, 1.0, 0.5)) -> list:
    """Each phase with discriminators, its training step on one in-memory batch (the bound),
    eager, in alternating rounds, each lever alone: the discriminators' step as two passes (real,
    then fake) over whole segments, as one pass over both (Adversarial.joint), and over
    crop_seconds windows of each segment (`crops`, and the preset's own). -> seconds per
    optimizer step against the first."""
    from .training.discriminators import Adversarial
    work = Path(work or BENCH_DIR / "throughput")
    cfg, source, phases, codec_dir, shards = bench_setup(configfiles, work, cache_hours,
                                                         {**(overrides or {}), "compile": False})
    rows = []
    for name, s in phases.items():
        if not s["adversarial"]["enabled"] or (only and name.split(":")[0] not in only):
            continue
        phase, _, adapter = name.partition(":")
        t = bench_trainer(phase, s, codec_dir, shards, work / "runs" / f"discriminators-{name.replace(':', '-')}",
                          adapter or "default")
        t.batches, t.s = itertools.repeat(_pinned(next(t.batches), t.device)), {**t.s, "log_every": 10 ** 9}
        rate, seg = t.model.geometry.target_rate, segment_samples(t.s, t.model.geometry)
        own, joint = s["adversarial"]["crop_seconds"], Adversarial.joint
        wanted = [c for c in dict.fromkeys([*crops, own]) if c is not None and c * rate < seg]
        preset = (joint, round(own * rate) if own in wanted else None)
        variants = {"two passes, whole segments": (False, None), "one pass, whole segments": (True, None),
                    **{f"{'one pass' if joint else 'two passes'}, {c:g} s windows": (joint, round(c * rate))
                       for c in wanted}}

        def use(v):
            t.adv.joint, t.adv.window = variants[v]
        times = alternating(t, variants, use, steps, rounds)
        first = statistics.median(times[next(iter(variants))])
        audio = t.s["batch_size"] * t.s["grad_accum"] * seg / rate
        for v, xs in times.items():
            rows.append({"phase": name, "variant": v, "s_per_step": xs, "audio_s_per_s": audio / statistics.median(xs),
                         "vs_two_passes": first / statistics.median(xs),
                         "preset": variants[v] == preset})
        del t
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    tab = Table(title=f"discriminator passes, eager training step on one in-memory batch, {dev}: "
                      f"{' '.join(map(str, configfiles))} ({source})")
    for c in ("phase", "discriminators see", "s per step", "audio s per s", "speed vs two passes"):
        tab.add_column(c, justify="right")
    for r in rows:
        xs = r["s_per_step"]
        tab.add_row(r["phase"], r["variant"] + (" (the preset)" if r["preset"] else ""),
                    f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})", _num(r["audio_s_per_s"]),
                    f"{r['vs_two_passes']:.2f}x")
    console.print(tab, width=max(console.width, 120))
    return rows


# -------------------------------------------------------------------------------------- decode

FAMILY_NAMES = {"snac": "SNAC", "mimi": "Mimi"}


def decode(model_path: str | None = None, preset: str = "snac_24khz", seconds: float = 10.0, rounds: int = 3,
           push_frames: int = 4, pushes: int = 8, devices=None) -> dict:
    """bench decode: what a TTS server gets from the 48 kHz decoder, beside the codec's own decode of
    the same codes at the codec rate, on the CPU and on the GPU where there is one:
      offline   x real time of one decode of `seconds` of random codes at batch 1 (audio seconds /
                wall seconds, synchronized), after a warm-up decode;
      streaming the time from a push of `push_frames` finest frames (rounded up to whole quanta) to
                its audio on the host, over `pushes` pushes that return audio (after the first
                `right context` frames: the lag, printed in ms, that no compute removes).
    The model: `model_path` (a folder or final.pt), else random weights of a published codec's
    shapes (`preset`: pipeline.model.codecs.shapes, snac_24khz, mimi, ...: the speed of trained
    weights). The codec's side is its decoder with random weights of the same codec config. Rounds
    alternate the two paths; median and spread (min-max) over rounds (offline) or over every push
    (streaming)."""
    import math

    from .evaluation.decoder import Decoder, open_model

    devices = devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    load0 = os.getloadavg()[0]
    if model_path:
        base, _ = open_model(model_path, "cpu")
        what = str(model_path)
    else:
        codec = codecs.build(codecs.shapes(preset), 0)
        rate = codec.sampling_rate
        target = TARGET_RATE if TARGET_RATE % rate == 0 and TARGET_RATE // rate >= 2 else 2 * rate
        base = codecs.from_codec(codec, target)
        what = f"{preset} shapes, random weights"
    codec_cfg, n_q = base.config["codec"], base.config.get("n_q")

    class CodecRate(torch.nn.Module):
        """The codec's own decode, with what a stream needs (its geometry at the codec rate)."""
        def __init__(self, codec):
            super().__init__()
            self.codec, self.geometry = codec, codec.geometry_at(codec.sampling_rate)

        def decode(self, codes):
            return self.codec.decode(codes)

        def context(self, side):
            return self.codec.context(side)

    g = base.geometry
    q = g.quantum
    frames = max(1, round(seconds * g.codec_rate / g.hop / q)) * q
    push = math.ceil(push_frames / q) * q
    gen = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, g.codebook_size, (1, frames // s), generator=gen) for s in g.strides]
    audio_s = frames * g.hop / g.codec_rate
    rows, result = [], {}
    for dev in devices:
        sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
        paths = {f"{g.target_rate // 1000} kHz decoder": Decoder(base.to(dev).eval())}
        own = codecs.build(codec_cfg, 0, n_q).eval().to(dev)
        paths[f"{FAMILY_NAMES[own.FAMILY]} {g.codec_rate // 1000} kHz"] = Decoder(CodecRate(own))
        on_dev = [c.to(dev) for c in codes]
        offline = {k: [] for k in paths}
        latency = {k: [] for k in paths}

        def one_stream(dec):
            s, out = dec.stream(), []
            for a in range(0, frames, push):
                part = [c[:, a // st:(a + push) // st] for c, st in zip(on_dev, g.strides)]
                sync()
                t = time.perf_counter()
                y = s.push(part).cpu()
                dt = time.perf_counter() - t
                if y.shape[-1]:
                    out.append(dt)
                if len(out) == pushes:
                    break
            return out
        with torch.inference_mode():
            for dec in paths.values():          # warm-up: kernels, allocator, cuDNN's choices
                dec.decode(on_dev)
                one_stream(dec)
            for r in range(rounds):
                for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
                    dec = paths[name]
                    sync()
                    t = time.perf_counter()
                    dec.decode(on_dev)
                    sync()
                    offline[name].append(audio_s / (time.perf_counter() - t))
                    latency[name] += one_stream(dec)
        label = f"{dev} ({torch.get_num_threads()} threads)" if dev == "cpu" else torch.cuda.get_device_name(dev)
        for name, dec in paths.items():
            lag_ms = dec.lag_seconds * 1000
            ms = [x * 1000 for x in latency[name]]
            rows.append((label, name, _spread(offline[name]), f"{push} frames ({push * g.hop / g.codec_rate * 1000:.0f} ms)",
                         _spread(ms) if ms else "-", f"{lag_ms:.0f} ms ({dec.context[1]} frames)"))
            result[f"{dev}/{name}"] = {"x_real_time": offline[name], "push_ms": ms, "lag_ms": lag_ms}
        base.to("cpu")
    t = Table(title=f"decode: {what}; {audio_s:.1f} s of random codes, batch 1 "
                    f"(load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end)")
    for c in ("device", "path", "offline x real time", "push", "push -> audio ms", "lag (right context)"):
        t.add_column(c, justify="right", no_wrap=True)
    for row in rows:
        t.add_row(*row)
    console.print(t, width=max(console.width, 150))
    console.print(f"median (min-max): offline over {rounds} rounds, push latency over {rounds} x {pushes} pushes; "
                  "the lag is the decoder's look-ahead, measured from codes to audio (pipeline/evaluation/stream.py)")
    return result
