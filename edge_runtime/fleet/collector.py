"""The telemetry collector: fleet topics in, records stored once, acknowledged only once stored.

Threads: the link's network thread only queues; one link worker hands each message to our bounded
queue (blocking when it is full: back-pressure, never a drop); the ``collector-writer`` thread
takes up to `batch` messages, decodes them, stores them in one transaction and only then
acknowledges them to the broker (paho's manual acks). With a persistent session (a fixed client id
and ``session_expiry_s`` > 0), whatever was not acknowledged when the collector died, and whatever
was published while it was away, the broker delivers when it returns; the store's ``ON CONFLICT DO
NOTHING`` on ``(device, key)`` turns that at-least-once delivery into each record stored once.

The broker never has more than the link's Receive Maximum (MQTT 5) unacknowledged messages out to
us, so the queues stay bounded however far behind the database is. A hostile or malformed message
is counted by reason, acknowledged and skipped. When the database is down, the batch is kept and
retried with growing delays (nothing is acknowledged meanwhile, so the broker holds the rest).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.client.broker import Broker
from edge_runtime.fleet.db import Store, StoreError
from edge_runtime.fleet.records import MAX_PAYLOAD_BYTES, BadRecord, Record, decode, subscriptions
from edge_runtime.transports.mqtt.link import Incoming, MqttLink, Refused

__all__ = ["Collector", "CollectorStats"]

log = logging.getLogger(__name__)

IN_FLIGHT = 256
"""The link's Receive Maximum: unacknowledged messages the broker should send us at most."""
QUEUE_MESSAGES = 4 * IN_FLIGHT
"""The link's work queue. A broker may overshoot the Receive Maximum (Mosquitto 2.0 did, by about
90 of 6,000 under load); what still does not fit is refused "busy", left unacknowledged, and got
again by reconnecting once the backlog is stored (MQTT re-sends only on a new connection)."""
_RETRY_MAX_S = 5.0


@dataclass
class CollectorStats:
    """What the collector did so far."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    bad: int = 0
    batches: int = 0
    store_errors: int = 0
    refused_busy: int = 0
    """Messages the link could not queue (left unacknowledged, got again after a reconnect)."""
    reconnects: int = 0
    bad_reasons: collections.Counter[str] = field(default_factory=collections.Counter)

    def line(self) -> str:
        """One line for the log or the terminal."""
        text = (
            f"received {self.received}, stored {self.stored}, duplicates {self.duplicates}, "
            f"bad {self.bad}, batches {self.batches}, store errors {self.store_errors}"
        )
        if self.refused_busy:
            text += f", refused busy {self.refused_busy} (got again after {self.reconnects} reconnects)"
        if self.bad_reasons:
            top = "; ".join(f"{reason} x{count}" for reason, count in self.bad_reasons.most_common(3))
            text += f" (bad: {top})"
        return text


class Collector:
    """Subscribes to the fleet topics (``$share/<share>/...`` with `share`) and stores what arrives."""

    def __init__(
        self,
        broker: Broker,
        store: Store,
        *,
        client_id: str,
        share: str | None = None,
        session_expiry_s: int = 86400,
        batch: int = 500,
        queue_messages: int = QUEUE_MESSAGES,
    ) -> None:
        self.store = store
        self.batch = max(1, batch)
        self.stats = CollectorStats()
        settings = broker.settings(
            session_expiry_s=session_expiry_s,
            workers=1,
            queue_size=queue_messages,
            queue_bytes=queue_messages * MAX_PAYLOAD_BYTES,
            reconnect_max_s=5.0,
        )
        self.link = MqttLink(settings, client_id, manual_ack=True)
        self.filters = subscriptions(share)
        for topic in self.filters:
            self.link.subscribe(
                topic, self._on_message, qos=1, on_refused=self._on_refused, max_bytes=MAX_PAYLOAD_BYTES
            )
        self._queue: queue.Queue[Incoming] = queue.Queue(maxsize=2 * self.batch)
        self._refused_busy = threading.Event()
        """Set when a message was refused busy: reconnect (to get it again) once the backlog is stored."""
        self._stopping = threading.Event()
        self._idle = threading.Event()
        self._writer = threading.Thread(target=self._run, name="collector-writer", daemon=True)

    def start(self) -> None:
        """Start storing and connect (in the background, retrying until the broker answers)."""
        self._writer.start()
        self.link.start()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected and subscribed."""
        return self.link.wait_connected(timeout)

    def stop(self, timeout: float = 10.0) -> CollectorStats:
        """Store everything received, disconnect, and return the final counts."""
        self.flush(timeout)
        self.link.stop(timeout)
        self._stopping.set()
        self._writer.join(timeout)
        return self.stats

    def flush(self, timeout: float) -> bool:
        """Wait until every message received so far is stored and acknowledged (False on timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (
                self._queue.empty()
                and self.link.queued == 0
                and self._idle.wait(0.05)
                and self._queue.empty()
            ):
                return True
            time.sleep(0.02)
        return False

    # -- link worker -------------------------------------------------------------------------
    def _on_message(self, message: Incoming) -> None:
        self._idle.clear()
        while True:
            try:
                self._queue.put(message, timeout=0.5)
                return
            except queue.Full:
                if self._stopping.is_set() or not self._writer.is_alive():
                    return  # not acknowledged: a persistent session gets it again

    def _on_refused(self, refused: Refused) -> None:
        """Too large: counted as bad and acknowledged (it never becomes valid). Busy: left
        unacknowledged, counted, and got again by reconnecting once the backlog is stored."""
        if str(refused.reason) == "too_large":
            self.stats.bad += refused.count
            self.stats.bad_reasons[str(refused.reason)] += refused.count
            if refused.message is not None:
                self.link.ack(refused.message)
            return
        self.stats.refused_busy += refused.count
        self._refused_busy.set()

    # -- writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                self._idle.set()
                if self._stopping.is_set():
                    return
                if self._refused_busy.is_set() and self.link.queued == 0 and self._queue.empty():
                    self._refused_busy.clear()
                    self.stats.reconnects += 1
                    self.link.reconnect("collector: messages were refused while busy")
                continue
            try:
                self._store(batch)
            except Exception:  # the writer must outlive any one batch
                log.exception("collector: storing a batch failed")

    def _take(self) -> list[Incoming]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self.batch:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _decode(self, batch: list[Incoming]) -> list[Record]:
        records = []
        for message in batch:
            try:
                records.append(decode(message.topic, message.payload))
            except BadRecord as exc:
                self.stats.bad += 1
                reason = str(exc)
                self.stats.bad_reasons[reason[:60]] += 1
                if self.stats.bad == 1 or self.stats.bad % 1000 == 0:
                    log.warning("collector: skipped a bad message on %r: %s (%d so far)",
                                message.topic[:80], reason, self.stats.bad)  # fmt: skip
        return records

    def _store(self, batch: list[Incoming]) -> None:
        """Store the batch (retrying while the database is down), then acknowledge it."""
        self.stats.received += len(batch)
        records = self._decode(batch)
        delay = 0.1
        while records:
            try:
                stored = self.store.add(records)
            except StoreError as exc:
                self.stats.store_errors += 1
                log.warning("collector: %s; retrying in %.1f s", exc, delay)
                if self._stopping.wait(delay):
                    log.error(
                        "collector: stopped with %d records not stored (not acknowledged)", len(records)
                    )
                    return
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            self.stats.stored += stored
            self.stats.duplicates += len(records) - stored
            break
        self.stats.batches += 1
        for message in batch:
            self.link.ack(message)

    def summary(self) -> dict[str, Any]:
        """The counts as plain data."""
        stats = self.stats
        return {
            "received": stats.received,
            "stored": stats.stored,
            "duplicates": stats.duplicates,
            "bad": stats.bad,
            "store_errors": stats.store_errors,
        }
