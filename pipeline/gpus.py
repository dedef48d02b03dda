"""GPU jobs on one machine never share a GPU: each claims its own, and CUDA_VISIBLE_DEVICES says which.

Snakemake's `gpu` resource (`resources: gpu: N` in workflow/profiles/default/config.yaml) caps how
many GPUs the running jobs ask for in all, but not which ones: every job would open cuda:0. So a
command that uses a GPU first claims free devices here, one lock file per device locked with
fcntl.flock (exclusive), held until the process ends (the kernel releases it when the process
dies, however it dies), and sets CUDA_VISIBLE_DEVICES to the claimed devices before torch
initialises CUDA. A job that finds too few free devices waits for them; it never shares one.

Which devices: CUDA_VISIBLE_DEVICES when it is set (SLURM sets it to a job's allocation; a user
may give a run some of the GPUs), else PHASE11_GPUS (a count standing in for the machine's GPUs:
the tests use it to fake some on CPU), else the NVIDIA driver's list (/proc/driver/nvidia/gpus,
read without initialising CUDA). No device: nothing to claim, the command runs on CPU.

Where the locks live: PHASE11_GPU_LOCKS, else /tmp/phase11-gpus (shared by every run and user of
the machine); inside a SLURM job, in a folder of that job alone, since SLURM already keeps jobs
apart and numbers each job's devices its own way. A process started by one that claimed
(PHASE11_GPU_CLAIMED is set) or by torchrun (a rank: its launcher decides) claims nothing.
"""
from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
from pathlib import Path

CLAIMED = "PHASE11_GPU_CLAIMED"
_held: list[int] = []          # fds of the locks this process holds, open until it exits


def devices(env=None) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (indices or UUIDs)."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        out = []
        for d in (d.strip() for d in visible.split(",")):
            if not d or d.startswith("-"):        # CUDA stops at the first invalid entry
                break
            out.append(d)
        return out
    if env.get("PHASE11_GPUS", "").strip():
        return [str(i) for i in range(int(env["PHASE11_GPUS"]))]
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        return []


def lock_dir(env=None) -> Path:
    env = os.environ if env is None else env
    base = Path(env.get("PHASE11_GPU_LOCKS") or "/tmp/phase11-gpus")
    job = env.get("SLURM_JOB_ID")
    return base / f"slurm-{job}" if job else base


def _mkdir_shared(d: Path, env) -> None:
    for p in ([d.parent, d] if env.get("SLURM_JOB_ID") else [d]):
        try:
            p.mkdir(mode=0o1777, parents=True)
            os.chmod(p, 0o1777)                       # every user's jobs lock here (sticky, like /tmp)
        except FileExistsError:
            pass


def _try_lock(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:                           # another user's file: a read-only fd locks too
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    try:                                              # who holds it, for the waiting message
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass
    return fd


def _holders(d: Path, devs: list[str]) -> str:
    out = []
    for dev in devs:
        try:
            out.append(f"{dev}: pid {(d / _name(dev)).read_text().strip() or '?'}")
        except OSError:
            out.append(f"{dev}: ?")
    return ", ".join(out)


def _name(dev: str) -> str:
    return "gpu-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in dev) + ".lock"


def claim(n: int = 1, env=None, poll: float = 1.0, log=None) -> list[str] | None:
    """Claim n free devices for the rest of this process's life and set CUDA_VISIBLE_DEVICES to
    them. Returns the claimed devices, or None where there is nothing to claim (no GPU, n <= 0,
    or an ancestor or torchrun's launcher already decided). Waits while too few are free."""
    env = os.environ if env is None else env
    if n <= 0 or env.get(CLAIMED) or "TORCHELASTIC_RUN_ID" in env or "LOCAL_RANK" in env:
        return None
    devs = devices(env)
    if not devs:
        return None
    if n > len(devs):
        raise RuntimeError(f"this job needs {n} GPUs but the machine offers {len(devs)} ({','.join(devs)})")
    d = lock_dir(env)
    _mkdir_shared(d, env)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    waiting_since = None
    while True:
        got = []
        for dev in devs:                  # all or nothing: two 2-GPU jobs never hold one each
            fd = _try_lock(d / _name(dev))
            if fd is not None:
                got.append((dev, fd))
                if len(got) == n:
                    break
        if len(got) == n:
            break
        for _, fd in got:
            os.close(fd)
        if waiting_since is None:
            waiting_since = time.monotonic()
            log(f"waiting for {n} free GPU(s) of {len(devs)} (held: {_holders(d, devs)})")
        time.sleep(poll)
    if waiting_since is not None:
        log(f"got GPU(s) {','.join(dev for dev, _ in got)} after {time.monotonic() - waiting_since:.0f} s")
    _held.extend(fd for _, fd in got)
    claimed = [dev for dev, _ in got]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(claimed)
    env[CLAIMED] = "1"
    return claimed


def pick_device(name: str = "auto"):
    """auto: CUDA when there is one, else the CPU; a CUDA device asked for where none is, refused.
    (Every command that computes picks its device here; torch is imported only when called.)"""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is available")
    return dev
