"""`python -m pipeline gpu-check`: what a GPU changes, checked in one go on a CUDA machine.

  end to end      the snac_24khz preset through Snakemake on random weights of the official shapes
                  (codecs.shapes("snac_24khz") saved as a codec folder) and the demo audio: a few
                  steps a phase, every phase (each LoRA adapter of config/config.yaml: two),
                  evaluation, final.pt; warmup is stopped by SIGTERM after its first checkpoint and
                  the rerun resumes it
  cuda tests      pytest -m cuda (tests/), run beside the end-to-end run: metrics, losses,
                  checkpointed gradients on CUDA, host synchronisations per step, a killed run
                  resumed (default and deterministic kernels)
  bench memory    each phase's measured peak memory at the preset's micro-batch, and with
                  activation checkpointing the other way
  throughput      each phase's trainer beside its bound (pipeline/bench.py)
  precision       fp32, tf32 and bf16: step time and the 12-24 kHz SNR against fp32
  discriminators  the discriminators' passes, each lever alone: one pass over real and fake
                  against two, whole segments against crop_seconds windows (full's step)

It prints one table (a row per step; what a step measured in its figures) and writes everything
as JSON (results/gpu-check/gpu-check-<time>.json, after every step, so a run cut short keeps what
it did). Exit status 1 when a step fails; a goal not met is a figure, not a failure. On a machine
without CUDA it says so and exits 0. `--cpu` runs the same steps on the CPU at toy sizes (the
demo codec's shapes, two steps a phase) to try the check itself where there is no GPU.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
import yaml
from rich.table import Table

from .ui import console

ROOT = Path(__file__).resolve().parents[1]
PRESET = "config/snac_24khz.yaml"
WORKFLOW = ("Snakefile", "workflow", "config", "pipeline")

# Through Snakemake: the preset's micro-batches, a few steps a phase; warmup long enough to be
# stopped part way (its first checkpoint at step 2). Eager (compile: false): this run measures no
# speed, and compiling full's decoder and discriminators from a cold cache took 130 s of its 165 s
# on one H200 (2026-12-04); the throughput step trains compiled, through the trainer's own loop.
# full with activation checkpointing, which the preset no longer uses: the path that crashed on
# CUDA before issue 17 stays in the run.
E2E_YAML = {
    "manifest": "data/demo/manifest.jsonl", "heldout_manifest": "data/demo/heldout.jsonl",
    "codec": {"pretrained": "codec/snac_24khz"},
    "precompute": {"shards": 2, "heldout_shards": 1},
    "train": {"defaults": {"warmup_steps": 1, "val_every": 4, "val_batches": 1, "ckpt_every": 2, "log_every": 2,
                           "keep_best": 1, "num_workers": 4, "compile": False},
              "warmup": {"steps": 16, "val_every": 8}, "full": {"steps": 4, "activation_checkpointing": True},
              "lora": {"steps": 4}},
    "eval": {"visqol": False, "max_seconds": 30, "bootstrap": 100, "report_clips": 1},
}
# --cpu: the same steps at toy sizes, to try the check without a GPU
TOY = {"batch_size": 2, "grad_accum": 1, "segment_seconds": 0.5, "n_ffts": [256, 512], "n_mels": 40,
       "num_workers": 0}


def main(out: str | None = None, cpu: bool = False, skip=()) -> int:
    if not torch.cuda.is_available() and not cpu:
        console.print(f"gpu-check needs a CUDA device and this machine has none (torch {torch.__version__}, "
                      f"CUDA build {torch.version.cuda or 'none'}): nothing was checked. On a GPU machine: "
                      "python -m pipeline gpu-check")
        return 0
    work = Path("results/gpu-check").resolve()
    work.mkdir(parents=True, exist_ok=True)
    path = Path(out) if out else work / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = {"machine": machine(), "toy": cpu, "steps": {}}
    t_start = time.perf_counter()
    # the CUDA tests (small models) run beside the end-to-end run, which measures no speed
    tests = start_cuda_tests(work) if "cuda tests" not in skip else None
    for name, fn in (("end to end", end_to_end), ("cuda tests", lambda w, c: finish_cuda_tests(tests, c)),
                     ("bench memory", bench_memory), ("throughput", throughput), ("precision", precision),
                     ("discriminators", discriminators)):
        if name in skip:
            continue
        console.rule(f"gpu-check: {name}")
        t0 = time.perf_counter()
        try:
            result = fn(work, cpu)
        except Exception as e:
            result = {"ok": False, "summary": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                      "traceback": traceback.format_exc()}
        result.setdefault("seconds", round(time.perf_counter() - t0, 1))
        report["steps"][name] = result
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    gain = compile_gain(report["steps"])
    if gain:
        report["steps"]["torch.compile"] = gain
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    show(report)
    console.print(f"written: {path}")
    return 0 if all(r["ok"] for r in report["steps"].values()) else 1


def machine() -> dict:
    m = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
         "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count()}
    try:
        m["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip() or None
    except OSError:
        m["commit"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        m.update(gpu=p.name, gpu_gib=round(p.total_memory / 1024 ** 3, 1), gpus=torch.cuda.device_count())
    return m


def show(report: dict) -> None:
    m = report["machine"]
    where = f"{m.get('gpu', 'CPU (toy sizes)')}, torch {m['torch']}, Python {m['python']}, {m['date']}"
    t = Table(title=f"gpu-check: {where}", show_lines=True)
    for c in ("step", "", "figures", "s"):
        t.add_column(c, overflow="fold")
    for name, r in report["steps"].items():
        t.add_row(name, "[green]ok" if r["ok"] else "[bold red]FAIL", r["summary"].replace("; ", "\n"),
                  f"{r['seconds']:.0f}")
    t.add_row("total", "", "", f"{report.get('seconds', 0):.0f}")
    console.print(t, width=max(console.width, 120))


# ---- the steps ------------------------------------------------------------------------------------
def start_cuda_tests(work: Path):
    """pytest -m cuda in the background -> (process, junit xml, log, start time), or None without tests/."""
    if not (ROOT / "tests").is_dir():
        return None
    xml, log = work / "cuda-tests.xml", work / "cuda-tests.log"
    xml.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rs",
                          f"--junitxml={xml}", "tests"], cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return p, xml, log, time.perf_counter()


def finish_cuda_tests(started, cpu: bool) -> dict:
    if started is None:
        return {"ok": False, "summary": f"no tests/ beside {ROOT / 'pipeline'}: run from a source checkout"}
    p, xml, log, t0 = started
    rc = p.wait(timeout=1800)
    output = log.read_text()
    tests = []
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            tests.append({"test": f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}", "outcome": outcome,
                          "seconds": float(case.get("time", 0))})
    count = {o: sum(x["outcome"] == o for x in tests) for o in ("passed", "failure", "error", "skipped")}
    bad = [x["test"] for x in tests if x["outcome"] in ("failure", "error")]
    summary = (f"{count['passed']} passed, {count['failure'] + count['error']} failed, {count['skipped']} skipped"
               + (f": {', '.join(bad)}" if bad else "") + "; " + ", ".join(
                   f"{x['test'].split('::')[1]} {x['outcome']}" for x in tests if "resume" in x["test"]))
    return {"ok": rc in (0, 5) and not bad and (cpu or count["passed"] > 0), "summary": summary,
            "tests": tests, "output_tail": output[-4000:], "seconds": round(time.perf_counter() - t0, 1)}


def e2e_tree(work: Path, cpu: bool) -> Path:
    """A copy of the workflow with a random-weight codec of the official snac_24khz shapes (the
    demo codec's with --cpu) and the check's config over the preset."""
    from .model import codecs
    from .settings import merge
    root = work / "e2e"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for name in WORKFLOW:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, root / name)
    over = E2E_YAML
    if cpu:
        demo = yaml.safe_load((ROOT / "config/config.yaml").read_text())["codec"]["demo"]["config"]
        codecs.build(demo, 0).save(root / "codec/snac_24khz", official=True)
        over = merge(over, {"demo": {"n_train": 6, "n_heldout": 2, "min_seconds": 1.0, "max_seconds": 2.0},
                            "train": {"defaults": {**TOY, "warmup_steps": 1},
                                      "warmup": {"steps": 12, "val_every": 6, "batch_size": 2},
                                      "full": {"steps": 2, "batch_size": 2, "grad_accum": 2,
                                               "adversarial": {"period_channels": [8, 8], "stft_channels": 4}},
                                      "lora": {"steps": 2, "batch_size": 2}},
                            "eval": {"n_ffts": [256, 512], "max_seconds": 4}})
    else:
        codecs.build(codecs.shapes("snac_24khz"), 0).save(root / "codec/snac_24khz", official=True)
    (root / "gpucheck.yaml").write_text(yaml.safe_dump(over, sort_keys=False))
    return root


def snakemake(root: Path, targets, log: Path, extra=()) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("SNAKEMAKE_PROFILE", None)
    # --resources gpu=1: the GPU jobs one at a time (this process claimed the GPU for all of them)
    cmd = [sys.executable, "-m", "snakemake", *targets, "--cores", str(os.cpu_count() or 4), "--resources", "gpu=1",
           "--configfile", PRESET, "gpucheck.yaml", *extra]
    return subprocess.Popen(cmd, cwd=root, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def end_to_end(work: Path, cpu: bool) -> dict:
    """The preset through Snakemake: warmup stopped by SIGTERM after its first checkpoint (as SLURM
    stops a job), then the whole DAG, whose warmup must resume."""
    root = e2e_tree(work, cpu)
    phase = root / "results/phase11/warmup"
    t0 = time.perf_counter()
    # 1. warmup alone, stopped once its first step checkpoint exists
    p = snakemake(root, ["results/phase11/warmup/model.safetensors"], work / "e2e-1.log")
    stopped, deadline = None, time.monotonic() + 900
    while p.poll() is None and time.monotonic() < deadline:
        if list(phase.glob("checkpoints/step_*")) and (phase / ".lock").is_file():
            holder = re.match(r"pid (\d+)", (phase / ".lock").read_text())
            if holder:
                try:
                    os.kill(int(holder[1]), signal.SIGTERM)
                    stopped = int(holder[1])
                    break
                except ProcessLookupError:
                    pass
        time.sleep(0.05)
    first_rc = p.wait(timeout=600)
    warmup_log = root / "results/logs/train/warmup.log"
    first_log = warmup_log.read_text() if warmup_log.is_file() else ""
    # 2. the whole DAG: warmup resumes, then full, lora, evaluation, final.pt
    p = snakemake(root, ["results/phase11/final.pt"], work / "e2e-2.log", ["--rerun-incomplete"])
    rc = p.wait(timeout=3600)
    wall = time.perf_counter() - t0
    log = warmup_log.read_text() if warmup_log.is_file() else ""
    resumed = next((l.strip() for l in log.splitlines() if "resuming warmup from" in l), None)
    final = root / "results/phase11/final.pt"
    rates = {}
    for d in sorted((root / "results/phase11").glob("**/metrics.jsonl")):
        lines = [json.loads(l) for l in d.read_text().splitlines() if l.strip()]
        logged = [l["segments_per_s"] for l in lines if "segments_per_s" in l]
        if logged:
            rates[str(d.parent.relative_to(root / "results/phase11"))] = round(logged[-1], 1)
    ok = rc == 0 and final.is_file() and (root / "results/phase11/eval.json").is_file() and bool(resumed) \
        and first_rc != 0 and stopped is not None
    stop = (f"warmup stopped by SIGTERM (pid {stopped}, exit {first_rc}), " if stopped else
            f"warmup was NOT stopped (exit {first_rc}), ")
    summary = (stop + (f"rerun: {resumed.split('resuming ')[-1]}" if resumed else "rerun did NOT resume")
               + f"; final.pt {'written' if final.is_file() else 'MISSING'} (exit {rc}, {wall:.0f} s); "
               f"last logged segments/s: {rates}")
    if rc != 0:
        summary += f"; see {work / 'e2e-2.log'} and {root / 'results/logs'}"
    return {"ok": ok, "summary": summary, "stop_exit": first_rc, "rerun_exit": rc, "resumed": resumed,
            "segments_per_s": rates, "wall_s": wall, "first_log_tail": first_log[-3000:], "tree": str(root)}


def _preset_args(work: Path, cpu: bool) -> dict:
    if not cpu:
        return {"configfiles": [str(ROOT / PRESET)]}
    toy = yaml.safe_dump({"codec": {"pretrained": None},
                          "train": {"defaults": {**TOY, "ckpt_every": 1000, "log_every": 50},
                                    "full": {"batch_size": 2, "grad_accum": 2, "adversarial": {
                                        "period_channels": [8, 8], "stft_channels": 4}},
                                    "lora": {"batch_size": 2}, "warmup": {"batch_size": 2}}})
    (work / "toy.yaml").write_text(toy)
    return {"configfiles": [str(ROOT / PRESET), str(work / "toy.yaml")]}


def bench_memory(work: Path, cpu: bool) -> dict:
    from .bench import GPU_GB, memory
    rows = memory(_preset_args(work, cpu)["configfiles"], other_checkpointing=True, one_adapter=True)
    summary = "; ".join(f"{r['phase']} {r['micro_batch']} x {r['segment_seconds']:g} s x {r['grad_accum']}"
                        f"{' with' if r['checkpointing'] else ' without'} checkpointing: {r['peak_gib']:.1f} GiB"
                        f"{'' if r['fits'] else f' (does NOT fit {GPU_GB:g} GB - 10 %)'}" for r in rows)
    preset = [r for r in rows if "what if" not in r["phase"]]
    return {"ok": all(r["fits"] for r in preset) or cpu, "summary": summary, "rows": rows}


def throughput(work: Path, cpu: bool) -> dict:
    from . import bench
    rows = bench.throughput(**_preset_args(work, cpu), steps=2 if cpu else 3, rounds=2,
                            cache_hours=0.02 if cpu else 0.05, work=work / "bench")
    parts = []
    for r in rows:
        tr, bd = statistics.median(r["trainer_audio_s_per_s"]), statistics.median(r["bound_audio_s_per_s"])
        goal = r["goal_audio_s_per_s"]
        slow = max(r["parts_s"], key=r["parts_s"].get)
        parts.append(f"{r['phase']}: trainer {bench._num(tr)} / bound {bench._num(bd)} audio s/s ({r['ratio']:.3f}x"
                     f"{'' if r['ratio'] >= bench.GOAL_RATIO else f' < {bench.GOAL_RATIO}'}), goal {goal:g}"
                     f"{'' if goal is None or tr >= goal else ' NOT met'}; most time: {slow}"
                     + (f"; {r['peak_gib']:.1f} GiB" if "peak_gib" in r else ""))
    return {"ok": True, "summary": "; ".join(parts), "rows": rows}


def compile_gain(steps: dict) -> dict | None:
    """torch.compile's gain, measured alone: per phase, the compiled bound (throughput) against the
    eager fp32 step (precision), the same step on the same in-memory batch."""
    tp, pr = steps.get("throughput", {}).get("rows"), steps.get("precision", {}).get("rows")
    if not tp or not pr:
        return None
    parts, rows = [], []
    for r in tp:
        eager = [x["s_per_step"] for x in pr if x["phase"] == r["phase"] and x["precision"] == r["precision"]]
        if not eager or not r["compile"]:
            continue
        e, c = statistics.median(eager[0]), statistics.median(r["bound_s_per_step"])
        rows.append({"phase": r["phase"], "eager_s": e, "compiled_s": c, "gain": e / c})
        parts.append(f"{r['phase']}: eager {e:.3f} s a step, compiled {c:.3f} s ({e / c:.2f}x)")
    return {"ok": True, "summary": "; ".join(parts) or "not compiled here", "rows": rows, "seconds": 0.0} if rows else None


def precision(work: Path, cpu: bool) -> dict:
    from . import bench
    from .settings import TRAIN_DEFAULTS
    rows = bench.precision(**_preset_args(work, cpu), steps=1, rounds=2, cache_hours=0.02 if cpu else 0.05,
                           work=work / "bench")
    phases = sorted({r["phase"] for r in rows})
    fine = [p for p in ("fp32", "tf32", "bf16")
            if all(r["snr_new_band_db"] >= 45 or p == "fp32" for r in rows if r["precision"] == p)]
    speed = {p: statistics.mean(r["vs_fp32"] for r in rows if r["precision"] == p) for p in fine}
    best = max(speed, key=speed.get)
    parts = [f"{r['phase']} {r['precision']}: {r['vs_fp32']:.2f}x, 12-24 kHz "
             + ("exact" if r["precision"] == "fp32" else f"{r['snr_new_band_db']:.1f} dB")
             for r in rows if r["precision"] != "fp32"]
    return {"ok": True, "summary": "; ".join(parts) + f". Fastest keeping >= 45 dB in {len(phases)} phases: {best} "
            f"(default: {TRAIN_DEFAULTS['precision']})", "rows": rows, "fastest_ok": best}


def discriminators(work: Path, cpu: bool) -> dict:
    from . import bench
    rows = bench.discriminators(**_preset_args(work, cpu), steps=1, rounds=2, cache_hours=0.02 if cpu else 0.05,
                                work=work / "bench", crops=(0.25,) if cpu else (1.0, 0.5))
    parts = [f"{r['phase']} {r['variant']}{' (preset)' if r['preset'] else ''}: {bench._num(r['audio_s_per_s'])} "
             f"audio s/s ({r['vs_two_passes']:.2f}x)" for r in rows]
    return {"ok": True, "summary": "; ".join(parts), "rows": rows}
