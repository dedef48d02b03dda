"""Exclusive file locks (fcntl.flock) that name their holder: one writer of a cache shard, one
trainer of a phase folder. The kernel releases a lock when its holder dies, however it dies; the
lock file says who holds it (PID, host, since when), so a refusal can name the holder."""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path


class Held(RuntimeError):
    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


class FileLock:
    """`with FileLock(path):` or acquire()/release(). A second taker fails at once with `Held`.
    unlink=True removes the lock file on release (nothing left beside what it guarded)."""

    def __init__(self, path, unlink: bool = False):
        self.path, self.unlink, self.fd = Path(path), unlink, None

    def acquire(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise Held(self.path, holder) from None
            try:        # a holder that just released may have unlinked the file: hold the one that is there
                st, now = os.fstat(fd), os.stat(self.path)
                if (st.st_ino, st.st_dev) == (now.st_ino, now.st_dev):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise Held(self.path, "a file that keeps being replaced")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            if self.unlink:
                self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
