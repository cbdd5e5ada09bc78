"""The one-writer rule: a pipeline process that writes holds an exclusive lock on the home.

DuckDB itself allows one writing process and then blocks even readers of other processes, so
catalog connections are kept short; this lock is what makes two pipeline runs on one home
exclusive for their whole duration. flock is released by the kernel when the process dies, so
kill -9 never leaves a stale lock behind.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from cache.errors import UserError


def lock_wait_seconds() -> float:
    """How long a process waits for another's hold on the home or the catalog before giving up
    (MSTA_LOCK_WAIT, seconds)."""
    return float(os.environ.get("MSTA_LOCK_WAIT", 10))


class HomeLock:
    def __init__(self, home: Path, wait_seconds: float | None = None) -> None:
        self.path = home / "lock"
        self.wait_seconds = wait_seconds if wait_seconds is not None else lock_wait_seconds()
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only home, or one below a file
            raise UserError(f"cannot write to the home {self.path.parent} (--home / MSTA_HOME): "
                            f"{exc.strerror or exc}", 1) from None
        deadline = time.monotonic() + self.wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise UserError(
                        f"another msta-pipe process (pid {holder}) is writing to {self.path.parent}; "
                        "wait for it to finish or use another --home",
                        exit_code=1,
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def holder(self) -> int | None:
        """The pid of the process holding the lock now, or None. A `running` row is live only if its
        pid holds the lock: a pid alone may be reused, or belong to a killed process not yet reaped."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            return int(text) if text.isascii() and text.isdigit() else None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "HomeLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
