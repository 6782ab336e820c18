"""Publishes the on-disk outbox over the MQTT link in order, removing records once the broker acked them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

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

    def __init__(self, outbox: Outbox, link: Publisher, *, window: int = 16) -> None:
        self.outbox = outbox
        self.link = link
        self.window = window
        self.refused = 0
        """Records the broker answered with a failure reason (removed, not retried)."""
        self._wake = threading.Condition()
        self._acks: list[tuple[int, bool]] = []
        self._inflight: dict[int, tuple[int, int]] = {}  # mid -> (seq, epoch)
        self._last_sent = 0
        self._session = link.session
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="outbox-sender", daemon=True)
        link.add_ack_listener(self._on_ack)

    def start(self) -> None:
        """Start sending."""
        self._thread.start()

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
            self._apply_acks(acks)
            sent = self._send_some()
            with self._wake:
                if not self._acks and not self._stopping and not sent:
                    self._wake.wait(0.5)

    def _apply_acks(self, acks: list[tuple[int, bool]]) -> None:
        done = []
        for mid, ok in acks:
            entry = self._inflight.pop(mid, None)
            if entry is not None:
                done.append(entry[0])
                self.refused += 0 if ok else 1
        self.outbox.remove(done)

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
            mid = self.link.publish(record.topic, record.payload, qos=record.qos, retain=record.retain)
            if mid is None:
                return False
            self._inflight[mid] = (record.seq, epoch)
            self._last_sent = record.seq
        return bool(records)
