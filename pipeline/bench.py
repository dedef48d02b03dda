"""Throughput figures (benchmarks print numbers; no test times anything).

  bench precompute   x-real-time per CPU core of read+resample and of the frozen encode, for the
                     demo codec and for a snac_24khz-sized codec (random weights: same speed)
  bench dag          wall and CPU seconds and peak RSS of Snakemake itself with a synthetic manifest
                     of --rows lines: dry run, no-op rerun, and a cluster job's own parse
  bench train        segments/s of the loader alone, of the cached trainer, of an online trainer
                     (read WAV + resample + encode inside the loop) and of decoder fwd/bwd on
                     in-memory tensors (the compute bound), with their ratios
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
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
    (codec / "config.json").write_text(json.dumps(SNAC_24KHZ))
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
    `snakemake --touch --forceall` records them (params included) in DAG order."""
    for o in _outputs(dry_run_text):
        p = root / o
        if o.endswith(".zarr"):
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
