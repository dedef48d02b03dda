"""Step checkpoints you can trust.

    <phase>/checkpoints/step_NNNNNNN/   model.safetensors, optimizer.pt, scheduler.pt, rng.pt
                                        (+ one .pt per extra part, e.g. discriminators.pt),
                                        trainer_state.json (written last)
    <phase>/checkpoints/superseded/<run>-<time>/   checkpoints moved aside, never deleted

Writing: every file and the folder are fsynced inside a temp folder, which is then renamed into
place, so a kill or a full disk never leaves a half checkpoint under a step name; a full disk is
reported as such, naming the file. trainer_state.json lists the parts written (`parts`).
Reading: a checkpoint that fails to read (a truncated file, bad JSON) or lacks a part a resume
needs (`REQUIRED`, and every part its state lists: a file deleted or lost in a copy) is skipped
with a warning naming it, and the one before it is used. Everything loads onto the CPU
(`map_location`), so a run moves between GPU and CPU machines.

A run's checkpoints carry its identity (`trainer_state.json: run`). Checkpoints of another run
(its settings or inputs changed) are moved aside under `superseded/`, with a message saying where
and how to go back to them. A run that finished marks its last checkpoint `finished` after its
outputs are written: when such a run is asked for again (Snakemake only does that when forced or
when the outputs were deleted) it trains again from step 0; a run without the mark was
interrupted and resumes.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..ui import console

STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"
REQUIRED = ("optimizer", "scheduler", "rng")     # what every resume loads besides the weights


class DiskFull(OSError):
    pass


@dataclass
class Checkpoint:
    path: Path
    state: dict
    weights: dict       # model state dict (CPU)
    parts: dict         # name -> torch-loaded object (optimizer, scheduler, rng, ...)


def step_dir(ckdir: Path, step: int) -> Path:
    return ckdir / f"step_{step:07d}"


def step_of(d: Path) -> int:
    return int(d.name.split("_")[1])


def save(ckdir: Path, step: int, weights: dict, parts: dict, state: dict) -> Path:
    """Write step checkpoint `step` atomically: weights (safetensors), each of `parts`
    (torch.save), then the trainer state; fsync, rename, fsync the parent."""
    from safetensors.torch import save_file
    final = step_dir(ckdir, step)
    tmp = ckdir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    current = tmp / WEIGHTS
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, current)
        _fsync(current)
        for name, obj in parts.items():
            current = tmp / f"{name}.pt"
            torch.save(obj, current)
            _fsync(current)
        current = tmp / STATE
        current.write_text(json.dumps({**state, "parts": sorted(parts)}, indent=2))
        _fsync(current)
        _fsync(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(ckdir)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e, ckdir):
            raise DiskFull(errno.ENOSPC, f"disk full while writing {current} (checkpoint of step {step}); "
                           "earlier checkpoints are intact: free space and rerun to resume", str(current)) from None
        raise
    return final


def _disk_full(e: Exception, where: Path) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch's zip writer reports a full disk as "unexpected pos N vs M"
    try:
        return "unexpected pos" in str(e) or shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(d: Path) -> Checkpoint:
    """Everything of one checkpoint, on the CPU; raises (OSError, ValueError, RuntimeError...)
    when a file is missing or damaged, a part a resume needs included (`REQUIRED` and those the
    state lists; the list itself is not part of the returned state)."""
    from safetensors.torch import load_file
    state = json.loads((d / STATE).read_text())
    if not isinstance(state, dict):
        raise ValueError(f"{d / STATE} holds no JSON object")
    listed = state.pop("parts", [])
    missing = [f"{p}.pt" for p in dict.fromkeys([*REQUIRED, *listed]) if not (d / f"{p}.pt").is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing")
    weights = load_file(d / WEIGHTS, device="cpu")
    parts = {p.stem: torch.load(p, map_location="cpu", weights_only=True) for p in sorted(d.glob("*.pt"))}
    return Checkpoint(d, state, weights, parts)


def read_state(d: Path) -> dict | None:
    try:
        return json.loads((d / STATE).read_text())
    except (OSError, ValueError):
        return None


def newest_readable(ckdir: Path, run: str) -> Checkpoint | None:
    """The newest checkpoint of `run` that reads completely; damaged ones are skipped with a
    warning. Checkpoints of other runs are moved aside; leftover temp folders removed."""
    if not ckdir.is_dir():
        return None
    for d in ckdir.glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)
    others = [d for d in step_dirs(ckdir) if (read_state(d) or {}).get("run", run) != run]
    if others:
        move_aside(ckdir, others, "their settings or inputs differ from this run's")
    for d in reversed(step_dirs(ckdir)):
        try:
            ck = read(d)
        except Exception as e:      # a truncated safetensors/pickle/JSON raises many types
            console.print(f"[yellow]skipping checkpoint {d}: it does not read ({type(e).__name__}: "
                          f"{str(e).strip()[:200]}); trying the one before")
            continue
        if ck.state.get("run") == run:
            return ck
    return None


def step_dirs(ckdir: Path) -> list:
    return sorted((d for d in ckdir.glob("step_*") if d.is_dir()), key=step_of)


def move_aside(ckdir: Path, dirs: list, why: str) -> Path | None:
    """Move checkpoints under ckdir/superseded/<run>-<time>/ and say where and how to use them."""
    if not dirs:
        return None
    by_run = {}
    for d in dirs:
        by_run.setdefault((read_state(d) or {}).get("run", "unreadable"), []).append(d)
    dest = None
    for run, ds in by_run.items():
        dest = ckdir / "superseded" / f"{run}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.mkdir(parents=True, exist_ok=True)
        for d in ds:
            os.replace(d, dest / d.name)
        newest = max(ds, key=step_of).name
        console.print(
            f"[yellow]moved {len(ds)} checkpoint(s) of run {run} to {dest}: {why}.[/] Nothing was deleted. "
            f"To continue that run, restore the settings recorded in {dest / newest / STATE} and move the "
            f"folders back (or pass --resume-from {dest / newest}); to start a new run from its weights, "
            f"set init_checkpoint: {dest / newest}")
    return dest


def mark_finished(d: Path) -> None:
    """Record that the run finished and wrote its outputs (see the module docstring)."""
    state = json.loads((d / STATE).read_text())
    state["finished"] = True
    tmp = d / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    _fsync(tmp)
    os.replace(tmp, d / STATE)


def prune(ckdir: Path, keep: set) -> None:
    """Remove this run's step checkpoints whose step is not in `keep`."""
    for d in step_dirs(ckdir):
        if step_of(d) not in keep:
            shutil.rmtree(d, ignore_errors=True)
