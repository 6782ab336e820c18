"""Opening the outbox whatever state its file is in: damaged files are moved aside, and with no
usable file at all the records are kept in memory, so the daemon always starts and serves."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.core.errors import UsageError
from edge_runtime.state.outbox import DEFAULT_MAX_BYTES, Outbox, OutboxCorrupt

__all__ = ["KEEP_CORRUPT", "OutboxReset", "open_outbox"]

log = logging.getLogger(__name__)

KEEP_CORRUPT = 3
"""Damaged files kept aside (``<name>.corrupt-<time>``); older ones are deleted, so a failing card cannot fill up."""


@dataclass(frozen=True)
class OutboxReset:
    """Why `open_outbox` did not open the file as it was."""

    reason: str
    moved_to: str | None
    """Where the unusable file went (``outbox.sqlite.corrupt-<UTC time to the µs>``), if it was moved."""
    durable: bool
    """True: a fresh file was started; False: records are kept in memory only."""


def _move_aside(path: Path) -> Path:
    """Rename `path` (and its -wal/-shm) to ``<name>.corrupt-<UTC time>``; the new name."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    index = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{index}")
        index += 1
    os.replace(path, target)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, target.with_name(target.name + suffix))
    _prune_corrupt(path, target)
    return target


def _prune_corrupt(path: Path, newest: Path) -> None:
    """Delete all but the newest `KEEP_CORRUPT` damaged copies of `path` (with their -wal/-shm)."""
    copies = sorted(
        (p for p in path.parent.glob(f"{path.name}.corrupt-*") if not p.name.endswith(("-wal", "-shm"))),
        key=lambda p: p.name,  # the names hold the UTC time they were moved, to the microsecond
    )
    older = [p for p in copies if p != newest]
    for old in older[: max(0, len(older) - (KEEP_CORRUPT - 1))]:
        for item in (old, old.with_name(old.name + "-wal"), old.with_name(old.name + "-shm")):
            with contextlib.suppress(OSError):
                if item.is_dir():
                    shutil.rmtree(item)
                else:
                    item.unlink(missing_ok=True)


def open_outbox(
    path: Path, max_records: int, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[Outbox, OutboxReset | None]:
    """The outbox at `path`; a damaged file is moved aside for a fresh one, and with no usable file, one in memory."""
    path = Path(path)
    try:
        return Outbox(path, max_records, max_bytes=max_bytes), None
    except OutboxCorrupt as exc:
        reason = str(exc)
    except UsageError:  # the bounds in the settings: the operator's to fix
        raise
    except Exception as exc:  # cannot write there (or something unforeseen): never stop the daemon
        return _in_memory(max_records, max_bytes, str(exc), None)
    try:
        moved = _move_aside(path)
    except OSError as exc:
        return _in_memory(max_records, max_bytes, f"{reason}; cannot move it aside: {exc}", None)
    log.error("%s; moved it to %s and started a fresh one", reason, moved)
    try:
        return Outbox(path, max_records, max_bytes=max_bytes), OutboxReset(reason, str(moved), True)
    except Exception as exc:
        return _in_memory(max_records, max_bytes, f"{reason}; a fresh one failed too: {exc}", str(moved))


def _in_memory(
    max_records: int, max_bytes: int, reason: str, moved: str | None
) -> tuple[Outbox, OutboxReset]:
    log.error("%s; keeping telemetry and events in memory only (lost on restart)", reason)
    return Outbox(None, max_records, max_bytes=max_bytes), OutboxReset(reason, moved, False)
