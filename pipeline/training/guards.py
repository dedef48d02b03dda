"""What keeps a training job safe from its surroundings.

PhaseLock   one trainer per phase folder: an exclusive lock on <phase>/.lock (flock: the kernel
            releases it when the holder dies, however it dies); a second trainer fails at once,
            naming the holder's PID.
StopRequest SIGTERM or SIGUSR1 (what SLURM sends before it kills or requeues a job), SIGINT, or
            the death of the Snakemake process that started the job: the trainer finishes the
            current step, writes a checkpoint and exits non-zero, so the rerun loses no step.
            Watching Snakemake means a job does not outlive the Snakemake that started it (an
            orphaned trainer would otherwise keep writing the phase folder next to the rerun's).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from ..locks import FileLock, Held

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Locked(RuntimeError):
    pass


class Stopped(RuntimeError):
    """Raised after the checkpoint of a requested stop is written."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class PhaseLock(FileLock):
    def __init__(self, folder):
        super().__init__(Path(folder) / ".lock")

    def __enter__(self):
        try:
            return self.acquire()
        except Held as e:
            raise Locked(f"another trainer is writing {self.path.parent} ({e.holder}); stop it first "
                         f"(kill <pid>: it writes a checkpoint and exits) or wait for it") from None


class StopRequest:
    """`requested` becomes a reason string when the job is asked to stop."""

    def __init__(self, watch_snakemake: bool = True):
        self.requested, self.code = None, 0
        self.watch = watch_snakemake

    def __enter__(self):
        self.old = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        parent = snakemake_ancestor()
        if self.watch and parent:
            threading.Thread(target=self._watch, args=parent, daemon=True).start()
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def _on_signal(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt          # a second Ctrl-C: stop now
        self.requested = self.requested or f"{signal.Signals(signum).name} received"
        self.code = self.code or 128 + signum

    def _watch(self, pid: int, started: str):
        while not self.requested:
            time.sleep(1.0)
            if _start_time(pid) != started:
                self.requested, self.code = f"the Snakemake process that started this job (pid {pid}) is gone", 1


def ignore_stop_signals(*_) -> None:
    """DataLoader workers: the main process handles stop signals (a worker killed by SIGTERM
    would fail the step in progress instead of letting it finish)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def snakemake_ancestor():
    """(pid, start time) of the nearest ancestor process running Snakemake, or None."""
    pid = os.getppid()
    for _ in range(8):
        if pid <= 1:
            return None
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if any(b"snakemake" in part.rsplit(b"/", 1)[-1] for part in cmd[:3]):
            return pid, _start_time(pid)
        pid = _ppid(pid)
    return None


def _stat(pid: int) -> list:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()     # fields after the command name


def _ppid(pid: int) -> int:
    try:
        return int(_stat(pid)[1])
    except (OSError, ValueError):
        return 0


def _start_time(pid: int) -> str | None:
    try:
        return _stat(pid)[19]
    except (OSError, IndexError):
        return None
