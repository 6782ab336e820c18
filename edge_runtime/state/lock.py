"""An exclusive lock on a folder shared by processes and threads: flock(2) on a lock file in it.

Re-entrant within a thread (a writer that holds it may call another writer), exclusive between
threads of one process and between processes (the daemon, `edgectl store`, the update flow).
flock locks are released by the kernel when the holder dies, so a crash never leaves it stuck.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_runtime.core.errors import TransientError, UsageError

__all__ = ["FolderLock"]


class FolderLock:
    """``with lock.hold(): ...`` holds `path` (created if missing) exclusively."""

    def __init__(self, path: Path, *, timeout_s: float = 30.0, poll_s: float = 0.02) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._threads = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock for the body of the `with` block (waits up to `timeout_s`, then TransientError)."""
        if not self._threads.acquire(timeout=self.timeout_s):
            raise TransientError(f"{self.path} is held by another thread of this process")
        try:
            if self._depth == 0:
                self._fd = self._acquire()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    os.close(self._fd)  # closing the descriptor releases the flock
                    self._fd = None
        finally:
            self._threads.release()

    def _acquire(self) -> int:
        try:
            # Read-only is enough for flock(2), so a lock file another user created still works.
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise TransientError(
                        f"{self.path} is held by another writer for more than {self.timeout_s:g} s; "
                        "try again when it is done"
                    ) from None
                time.sleep(self.poll_s)
            except OSError as exc:
                os.close(fd)
                raise UsageError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
