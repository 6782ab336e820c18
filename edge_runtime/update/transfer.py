"""The device side of the block transfer: pull the payload through a sliding window, check, write, sync.

The device keeps at most `window` blocks in flight (asked for, not yet in): once half of them
arrived it asks for the next lowest blocks it lacks (offset + bitmap), from the thread that
received the block, so the next request travels while the rest of the window still arrives. Each
block that arrives is decoded, checked against its sha256 from the offer and written at its offset
in the part file; once half of `save_bytes` arrived since the last sync the part file is
fdatasynced (in the job thread, while blocks keep arriving), and no more is asked for while
`save_bytes` wait for a sync.

The part file is its own record of progress: a download that resumes (after a kill -9, a power
cut, a restart) reads it back and keeps every block that matches its sha256 from the offer, so no
journal write is needed while blocks arrive, and the journal's bitmap (saved as the job enters
verifying) is only a summary. A kill -9 costs what was in flight (at most one window: the page
cache keeps what was written), a power cut at most `save_bytes` plus one window, and a broker
restart at most one window. Blocks in flight that stall (lost on a broker restart, a dropped link)
are asked for again; a reconnect asks at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edge_runtime.codecs.update_payloads import MAX_WINDOW, BlockRequest
from edge_runtime.core.errors import RequestError, TransientError, UpdateError
from edge_runtime.update.encoding import decode_block_data
from edge_runtime.update.machine import Interrupted, Job

__all__ = ["BlockReceiver", "has_block"]

log = logging.getLogger(__name__)


_WRITE_BACK: int | None = getattr(os, "POSIX_FADV_DONTNEED", None)
"""On Linux, DONTNEED on freshly written pages starts their writeback without waiting for it (the
pages stay cached until written), as PostgreSQL's flush-after does where sync_file_range is missing."""


def has_block(bitmap: bytearray, index: int) -> bool:
    """True if bit `index` is set."""
    return index // 8 < len(bitmap) and bool(bitmap[index // 8] >> (index % 8) & 1)


def _set(bitmap: bytearray, index: int) -> None:
    bitmap[index // 8] |= 1 << (index % 8)


def _count_bits(bitmap: bytes | bytearray) -> int:
    return sum(bin(byte).count("1") for byte in bitmap)


class BlockReceiver:
    """Receives the payload blocks of one job into its part file."""

    def __init__(
        self,
        job: Job,
        part_path: Path,
        *,
        request: Callable[[bytes], None],
        progress: Callable[[Job], None] = lambda job: None,
        window: int = 16,
        save_bytes: int = 4 << 20,
        stall_s: float = 5.0,
        give_up_s: float = 600.0,
        progress_s: float = 0.25,
    ) -> None:
        self.job = job
        self.offer = job.offer
        self.part_path = part_path
        self._request, self._progress = request, progress
        self.window, self.save_bytes = window, save_bytes
        self.stall_s, self.give_up_s, self.progress_s = stall_s, give_up_s, progress_s
        size = (self.offer.blocks + 7) // 8
        if len(job.have) != size:
            job.have = bytearray(size)
        self._received = bytearray(job.have)  # in memory; job.have only once fsynced
        self._received_count = self._saved_count = _count_bits(job.have)
        self._save_blocks = max(1, -(-save_bytes // self.offer.block_size))
        self._in_flight: set[int] = set()
        self._cursor = 0
        """Every block below it is received or in flight."""
        self._last_block = time.monotonic()
        self._changed = threading.Condition()
        self._kick = False
        self._abort: str | None = None
        self._cancel = False
        self._fd: int | None = None
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
            self.wake()  # ask for it again now
            raise RequestError(f"block {index} of job {offer.job} does not match its sha256; asked again")
        with self._changed:
            if has_block(self._received, index) or self._fd is None:
                return
            os.pwrite(self._fd, payload, index * offer.block_size)
            if _WRITE_BACK is not None:  # start writing it out now: the next fsync has less to wait for
                os.posix_fadvise(self._fd, index * offer.block_size, len(payload), _WRITE_BACK)
            _set(self._received, index)
            self._in_flight.discard(index)
            self._received_count += 1
            self._last_block = time.monotonic()
            self._count("received")
            fresh = self._refill_locked()
            self._changed.notify_all()
        if fresh:
            self._ask(fresh)

    def _refill_locked(self, *, at_least: int = 0) -> list[int]:
        """The next blocks to ask for, once half the window is free (or `at_least` blocks of it).

        Blocks in flight plus blocks received but not yet saved stay within `save_bytes` plus one
        window, so what a kill -9 loses stays bounded even while the job thread is in an fsync.
        """
        unsaved = self._received_count - self._saved_count
        room = min(self.window, self._save_blocks + self.window - unsaved) - len(self._in_flight)
        if self._abort is not None or room < (at_least or max(1, self.window // 2)):
            return []
        fresh: list[int] = []
        while self._cursor < self.offer.blocks and len(fresh) < room:
            if not has_block(self._received, self._cursor):
                fresh.append(self._cursor)
            self._cursor += 1
        self._in_flight.update(fresh)
        return fresh

    def _count(self, what: str) -> None:
        self.job.blocks[what] = self.job.blocks.get(what, 0) + 1

    def wake(self) -> None:
        """The link is back (or a block was damaged): ask for the blocks in flight again at once."""
        with self._changed:
            self._kick = True
            self._changed.notify_all()

    def abort(self, reason: str, *, cancel: bool = False) -> None:
        """Stop waiting: `run` raises Interrupted (the daemon stops; the job resumes at next start),
        or with `cancel` an UpdateError (the job fails with `reason`)."""
        with self._changed:
            self._abort, self._cancel = reason, cancel
            self._changed.notify_all()

    # -- the job thread ------------------------------------------------------------------------
    def run(self) -> None:
        """Fetch every missing block; returns when the whole payload is on disk and fsynced."""
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.part_path, flags, 0o600)
        try:
            existing = os.fstat(fd).st_size == self.offer.payload_size
            if not existing:
                os.ftruncate(fd, 0)  # a part file of another size holds nothing of this payload
                os.ftruncate(fd, self.offer.payload_size)
            self._recover(fd, scan=existing)
            with self._changed:
                self._fd = fd
                self._last_block = time.monotonic()
                first = self._refill_locked(at_least=1)
            if first:
                self._ask(first)
            self._pull()
            self._sync()  # done: the machine saves the job (and its bitmap) as it enters verifying
        finally:
            with self._changed:
                self._fd = None
                os.close(fd)

    def _pull(self) -> None:
        """Until every block is in: re-ask on a stall or a reconnect, save every `save_bytes`, report."""
        asked_at = reported_at = time.monotonic()
        while True:
            with self._changed:
                if self._cursor >= self.offer.blocks and not self._in_flight:
                    return
                if self._abort is not None:
                    raise (UpdateError if self._cancel else Interrupted)(self._abort)
                now = time.monotonic()
                quiet = now - max(asked_at, self._last_block)
                again = sorted(self._in_flight) if self._kick or quiet >= self.stall_s else []
                self._kick = False
                if not again:
                    self._changed.wait(min(self.progress_s, self.stall_s))
                idle = now - self._last_block
                unsaved = self._received_count - self._saved_count
            if again:
                if idle > self.give_up_s:
                    raise TransientError(
                        f"no block arrived for {self.give_up_s:g} s; is the host still serving?"
                    )
                self._ask(again)
                asked_at = time.monotonic()
            if unsaved >= max(1, self._save_blocks // 2):  # the fsync overlaps the other half arriving
                self._sync()
                with self._changed:  # refills held back while unsaved blocks piled up go out now
                    fresh = self._refill_locked(at_least=1)
                if fresh:
                    self._ask(fresh)
            if time.monotonic() - reported_at >= self.progress_s:
                self._progress(self.job)
                reported_at = time.monotonic()

    def _ask(self, indices: list[int]) -> None:
        self.requests += 1
        for start in range(0, len(indices), MAX_WINDOW):  # one request spans at most MAX_WINDOW blocks
            piece = indices[start : start + MAX_WINDOW]
            try:
                self._request(BlockRequest.of(self.offer.job, piece).encode())
            except Exception as exc:  # publishing while the link is down: the stall timer asks again
                log.debug("update %s: block request not sent (%s)", self.offer.job, exc)

    def _sync(self) -> None:
        """fdatasync the part file; what was written before it started now survives a power cut."""
        with self._changed:
            written = bytearray(self._received)
            fd = self._fd
        assert fd is not None
        os.fdatasync(fd)  # the size was set before the first block; data (and what finds it) is enough
        self.job.have = written
        with self._changed:
            self._saved_count = _count_bits(written)

    def _recover(self, fd: int, *, scan: bool) -> None:
        """With `scan`, keep the blocks of the part file that match their sha256 (a resumed download)."""
        offer, kept = self.offer, 0
        received = bytearray(len(self._received))
        for index in range(offer.blocks if scan else 0):
            data = os.pread(fd, offer.block_length(index), index * offer.block_size)
            if data.count(0) == len(data):  # never written (or zeros: fetched again, cheaply)
                continue
            if hashlib.sha256(data).hexdigest() == offer.block_sha256[index]:
                _set(received, index)
                kept += 1
        self._received = received
        self._received_count = self._saved_count = kept
        self.job.have = bytearray(received)
        if scan:
            log.info("update %s: resuming with %d of %d blocks on disk", offer.job, kept, offer.blocks)

    @property
    def percent(self) -> int:
        """Share of blocks received, 0-100."""
        return 100 * self._received_count // max(1, self.offer.blocks)
