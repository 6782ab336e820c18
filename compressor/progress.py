"""What a long compression shows on the terminal: a progress line with ETA, library logs kept out
of the way in a debug log, and a scratch folder that SIGTERM/SIGINT remove like a normal exit."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

__all__ = ["Progress", "Terminated", "library_logs_to", "scratch_folder"]


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwinds like Ctrl-C, so every `finally` and temporary folder runs its cleanup.

    A KeyboardInterrupt (not an Exception) so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"


class Progress:
    """Numbered steps of known count, each printed with elapsed time and an estimate of the rest."""

    def __init__(
        self, total: int, write: Callable[[str], Any], *, clock: Callable[[], float] = time.monotonic
    ):
        self.total, self.done, self._write, self._clock = max(total, 1), 0, write, clock
        self._started = clock()

    def step(self, label: str) -> None:
        """Announce the next step; from the second step on, with the time the remaining ones need."""
        elapsed = self._clock() - self._started
        timing = f"elapsed {_clock(elapsed)}"
        if self.done:
            remaining = elapsed / self.done * (self.total - self.done)
            timing += f", about {_clock(remaining)} left"
        self.done += 1
        self._write(f"[{self.done}/{self.total}] {label} ({timing})")


@contextlib.contextmanager
def scratch_folder(prefix: str = "edgectl-compress-") -> Iterator[Path]:
    """A temporary folder that also holds every library's temporary files, removed on any exit,
    SIGTERM and SIGINT included (SIGTERM raises `Terminated` in the main thread)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    previous_tempdir = tempfile.tempdir
    handlers: dict[int, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    with contextlib.suppress(ValueError):  # not the main thread: no handler; still removed on return
        handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_signal)
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = previous_tempdir
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        shutil.rmtree(folder, ignore_errors=True)


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


@contextlib.contextmanager
def library_logs_to(path: Path) -> Iterator[Callable[[str], None]]:
    """Send everything written to file descriptors 1 and 2 (ONNX Runtime's and TensorFlow's C++ logs,
    Python warnings) into `path`; yields the writer for our own progress lines, which still reach the
    terminal. The log file is removed when nothing was written to it."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    terminal: TextIO | None = None
    if _fileno(sys.stderr) == 2:  # a real terminal or pipe: keep a copy of it for progress
        terminal = os.fdopen(os.dup(2), "w", buffering=1)
    write_here = terminal or sys.stderr
    saved = [os.dup(1), os.dup(2)]
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "ab")  # noqa: SIM115 - kept open across the yield, closed in finally
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)

    def write(line: str) -> None:
        write_here.write(line + "\n")
        write_here.flush()

    try:
        yield write
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log.close()
        if terminal is not None:
            terminal.close()
        if path.exists() and path.stat().st_size == 0:
            path.unlink()
