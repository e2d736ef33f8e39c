"""Lock files held with flock: one per run directory (train) and one per sweep cell (sweep).

flock locks belong to the open file: the kernel drops them when the holder dies (even by SIGKILL),
so a killed process never leaves a stale lock behind.
Caveat: flock over NFS is only as reliable as the NFS locking setup of the cluster.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional


class FileLock:
    """A non-blocking exclusive lock on ``path`` (created if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd: Optional[int] = None

    def acquire(self) -> bool:
        """Take the lock; False (at once) if another process or descriptor holds it."""
        if self.fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        # who holds it, for a human looking at a stuck sweep (the lock itself is the flock)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {os.uname().nodename}\n".encode())
        self.fd = fd
        return True

    def holder(self) -> str:
        """'PID HOST' of whoever last took the lock (for messages), or '' if unknown."""
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FileLock":
        if not self.acquire():
            raise BlockingIOError(f"{self.path} is locked")
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(path: str | Path) -> bool:
    """Whether some process holds the lock at ``path`` right now."""
    if not Path(path).exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we just took
    return False
