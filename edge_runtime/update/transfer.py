"""The device side of the block transfer: pull the payload a window at a time, check, write, persist.

The device asks for the lowest blocks it lacks, at most `window` at once (offset + bitmap); each
block that arrives is decoded, checked against its sha256 from the offer and written at its offset
in the part file. When a window is complete the next one is asked for; while it travels, once
`save_bytes` were received since the last save (and at the end), the part file is fsynced and only
then the job's bitmap saved. So at most one window is ever in flight (a broker restart costs at
most one window again) and a kill -9 costs at most `save_bytes` plus one window. A window that
stalls (lost on a broker restart, a dropped link) is asked for again; a reconnect asks at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edge_runtime.codecs.update_payloads import BlockRequest
from edge_runtime.core.errors import RequestError, TransientError
from edge_runtime.update.encoding import decode_block_data
from edge_runtime.update.machine import Interrupted, Job

__all__ = ["BlockReceiver", "has_block", "missing_blocks"]

log = logging.getLogger(__name__)


def has_block(bitmap: bytearray, index: int) -> bool:
    """True if bit `index` is set."""
    return index // 8 < len(bitmap) and bool(bitmap[index // 8] >> (index % 8) & 1)


def _set(bitmap: bytearray, index: int) -> None:
    bitmap[index // 8] |= 1 << (index % 8)


def missing_blocks(bitmap: bytearray, blocks: int, limit: int) -> list[int]:
    """The lowest `limit` block indices not set in `bitmap`."""
    missing: list[int] = []
    for index in range(blocks):
        if not has_block(bitmap, index):
            missing.append(index)
            if len(missing) == limit:
                break
    return missing


class BlockReceiver:
    """Receives the payload blocks of one job into its part file."""

    def __init__(
        self,
        job: Job,
        part_path: Path,
        *,
        request: Callable[[bytes], None],
        persist: Callable[[Job], None],
        progress: Callable[[Job], None] = lambda job: None,
        window: int = 16,
        save_bytes: int = 4 << 20,
        stall_s: float = 5.0,
        give_up_s: float = 600.0,
    ) -> None:
        self.job = job
        self.offer = job.offer
        self.part_path = part_path
        self._request, self._persist, self._progress = request, persist, progress
        self.window, self.save_bytes = window, save_bytes
        self.stall_s, self.give_up_s = stall_s, give_up_s
        size = (self.offer.blocks + 7) // 8
        if len(job.have) != size:
            job.have = bytearray(size)
        self._received = bytearray(job.have)  # in memory; job.have only once fsynced
        self._wanted: list[int] = []
        self._changed = threading.Condition()
        self._kick = False
        self._abort: str | None = None
        self.requests = 0
        for key in ("received", "duplicate", "bad"):
            job.blocks.setdefault(key, 0)

    # -- fed from MQTT worker threads --------------------------------------------------------
    def receive(self, index: int, data: bytes) -> None:
        """A block arrived: check and write it (RequestError if out of range or damaged)."""
        offer = self.offer
        if not 0 <= index < offer.blocks:
            raise RequestError(f"block {index} is out of range (job {offer.job} has {offer.blocks} blocks)")
        with self._changed:
            if has_block(self._received, index):
                self._count("duplicate")  # re-sent after a stall or a reconnect: nothing to do
                return
        payload = decode_block_data(data, offer.compression, offer.block_length(index))
        if hashlib.sha256(payload).hexdigest() != offer.block_sha256[index]:
            self._count("bad")
            with self._changed:
                self._kick = True  # ask for it again now
                self._changed.notify_all()
            raise RequestError(f"block {index} of job {offer.job} does not match its sha256; asked again")
        with self._changed:
            if has_block(self._received, index) or self._fd is None:
                return
            os.pwrite(self._fd, payload, index * offer.block_size)
            _set(self._received, index)
            self._count("received")
            self._changed.notify_all()

    def _count(self, what: str) -> None:
        self.job.blocks[what] = self.job.blocks.get(what, 0) + 1

    def wake(self) -> None:
        """The link is back: ask for the current window again at once."""
        with self._changed:
            self._kick = True
            self._changed.notify_all()

    def abort(self, reason: str) -> None:
        """Stop waiting (the daemon stops): `run` raises Interrupted; the job resumes at next start."""
        with self._changed:
            self._abort = reason
            self._changed.notify_all()

    # -- the job thread ------------------------------------------------------------------------
    _fd: int | None = None

    def run(self) -> None:
        """Fetch every missing block; returns when the whole payload is on disk and fsynced."""
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.part_path, flags, 0o600)
        try:
            os.ftruncate(self._fd, self.offer.payload_size)
            wanted = missing_blocks(self._received, self.offer.blocks, self.window)
            if wanted:
                self._ask(wanted)
            while wanted:
                self._await_window(wanted)
                following = missing_blocks(self._received, self.offer.blocks, self.window)
                if following:  # the next window travels while this one is fsynced
                    self._ask(following)
                if not following:  # done: fsync; the machine saves the job as it enters verifying
                    self._commit_window(save=False)
                    break
                if self._unsaved_bytes() >= self.save_bytes:
                    self._commit_window(save=True)
                self._progress(self.job)
                wanted = following
        finally:
            fd, self._fd = self._fd, None
            with self._changed:
                os.close(fd)

    def _await_window(self, wanted: list[int]) -> None:
        """Wait until every block of `wanted` (already asked for) is in; re-ask on a stall or a reconnect."""
        asked_at = last_progress = time.monotonic()
        remaining = len(wanted)
        while True:
            with self._changed:
                left = [index for index in wanted if not has_block(self._received, index)]
                now = time.monotonic()
                if len(left) < remaining:
                    remaining, last_progress = len(left), now
                if not left:
                    return
                if self._abort is not None:
                    raise Interrupted(self._abort)
                again = self._kick or now - asked_at >= self.stall_s
                self._kick = False
                if not again:
                    self._changed.wait(min(0.5, self.stall_s))
                    continue
            if now - last_progress > self.give_up_s:
                raise TransientError(f"no block arrived for {self.give_up_s:g} s; is the host still serving?")
            self._ask(left)
            asked_at = time.monotonic()

    def _ask(self, indices: list[int]) -> None:
        self.requests += 1
        try:
            self._request(BlockRequest.of(self.offer.job, indices).encode())
        except Exception as exc:  # publishing while the link is down: the stall timer asks again
            log.debug("update %s: block request not sent (%s)", self.offer.job, exc)

    def _unsaved_bytes(self) -> int:
        """Payload bytes received but not yet recorded in the journal."""
        with self._changed:
            count = sum(
                bin(a & ~b & 0xFF).count("1") for a, b in zip(self._received, self.job.have, strict=True)
            )
        return count * self.offer.block_size

    def _commit_window(self, *, save: bool) -> None:
        """fsync the part file, then note (and with `save`, persist) which blocks it holds."""
        assert self._fd is not None
        with self._changed:  # what was written before the fsync starts is what the fsync makes durable
            written = bytearray(self._received)
        os.fsync(self._fd)
        self.job.have = written
        if save:
            self._persist(self.job)

    @property
    def percent(self) -> int:
        """Share of blocks received, 0-100."""
        done = sum(bin(byte).count("1") for byte in self._received)
        return 100 * done // max(1, self.offer.blocks)
