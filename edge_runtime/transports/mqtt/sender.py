"""Publishes the on-disk outbox over the MQTT link in order, removing records once the broker acked them.

The sender thread never dies of an error: a failing read, removal or publish is counted in the
outbox's `faults`, logged at a bounded rate and retried with exponential backoff; a record that
can never be sent (unreadable row, a topic paho refuses) is moved to the dead-letter table.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from edge_runtime.core.errors import UsageError
from edge_runtime.state.outbox import Outbox

__all__ = ["OutboxSender", "Publisher"]


class Publisher(Protocol):
    """What OutboxSender needs from the MQTT link."""

    @property
    def connection_epoch(self) -> int:
        """Incremented on every successful (re)connect; 0 before the first one."""
        ...

    @property
    def session(self) -> int:
        """Incremented when the client is replaced: message ids in flight before it are never acked."""
        ...

    @property
    def connected(self) -> bool:
        """True while the broker accepted the connection."""
        ...

    def add_ack_listener(self, listener: Callable[[int, bool], None]) -> None:
        """Call `listener(mid, ok)` (on the network thread) whenever the broker acknowledges a publish."""
        ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> int | None:
        """Queue a message; its id, or None if paho could not take it."""
        ...


class OutboxSender:
    """A thread that publishes the outbox in order and removes records once the broker acked them.

    After a reconnect, paho re-sends the messages that were in flight itself; new records wait until
    those are acknowledged, so the broker sees every record in sequence order. When the link
    replaced its client (a new `session`), nothing in flight will be acked: those records are sent
    again from the oldest one.
    """

    def __init__(
        self,
        outbox: Outbox,
        link: Publisher,
        *,
        window: int = 16,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.outbox = outbox
        self.link = link
        self.window = window
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.refused = 0
        """Records the broker answered with a failure reason (removed, not retried)."""
        self.beat = time.monotonic()
        """When the thread last went round its loop (monotonic seconds)."""
        self._wake = threading.Condition()
        self._acks: list[tuple[int, bool]] = []
        self._inflight: dict[int, tuple[int, int]] = {}  # mid -> (seq, epoch)
        self._acked: list[int] = []  # seqs acknowledged but not removed from the file yet
        self._last_sent = 0
        self._delay = 0.0
        self._session = link.session
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="outbox-sender", daemon=True)
        link.add_ack_listener(self._on_ack)

    def start(self) -> None:
        """Start sending."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        """True while the thread runs (it ends only on `stop()`)."""
        return self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """Figures for telemetry: in flight, refused by the broker, current retry delay."""
        return {"inflight": len(self._inflight), "refused": self.refused, "retry_in_s": round(self._delay, 3)}

    def notify(self) -> None:
        """Wake the sender: a record was added or the connection changed."""
        with self._wake:
            self._wake.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; unacknowledged records stay on disk."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _on_ack(self, mid: int, ok: bool) -> None:
        """Called on paho's thread for every acknowledged publish: only queue it (unknown ids are ignored)."""
        with self._wake:
            self._acks.append((mid, ok))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
                acks, self._acks = self._acks, []
            self.beat = time.monotonic()
            try:
                self._apply_acks(acks)
                sent = self._send_some()
            except Exception as exc:  # the thread must outlive every error: count, back off, retry
                self.outbox.faults.note("sender", exc)
                self._delay = min(max(self._delay * 2, self.backoff_min_s), self.backoff_max_s)
                self._pause(self._delay)
                continue
            self._delay = 0.0
            with self._wake:
                if not self._acks and not self._stopping and not sent:
                    self._wake.wait(0.5)

    def _pause(self, seconds: float) -> None:
        """Wait `seconds` (acks keep queuing meanwhile), or less if stopping."""
        deadline = time.monotonic() + seconds
        with self._wake:
            while not self._stopping and (left := deadline - time.monotonic()) > 0:
                self._wake.wait(min(left, 1.0))
                self.beat = time.monotonic()

    def _apply_acks(self, acks: list[tuple[int, bool]]) -> None:
        for mid, ok in acks:
            entry = self._inflight.pop(mid, None)
            if entry is not None:
                self._acked.append(entry[0])
                self.refused += 0 if ok else 1
        if self._acked:
            self.outbox.remove(self._acked)  # on failure the seqs stay in _acked and are retried
            self._acked = []

    def _send_some(self) -> bool:
        """Publish the next records if the link is up and the window allows; True if any went out."""
        if self.link.session != self._session:
            self._session = self.link.session
            if self._inflight:
                self._last_sent = min(seq for seq, _ in self._inflight.values()) - 1
                self._inflight.clear()
        epoch = self.link.connection_epoch
        if not self.link.connected or any(e != epoch for _, e in self._inflight.values()):
            return False
        room = self.window - len(self._inflight)
        if room <= 0:
            return False
        records = self.outbox.peek(self._last_sent, room)
        for record in records:
            try:
                mid = self.link.publish(record.topic, record.payload, qos=record.qos, retain=record.retain)
            except UsageError as exc:  # this record can never be sent (topic or payload refused)
                self.outbox.bury(record.seq, str(exc))
                self._last_sent = record.seq
                continue
            if mid is None:
                return False
            if record.qos == 0:  # no acknowledgement will come: sent is done
                self._acked.append(record.seq)
            else:
                self._inflight[mid] = (record.seq, epoch)
            self._last_sent = record.seq
        return bool(records)
