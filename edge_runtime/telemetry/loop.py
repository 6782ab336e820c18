"""Periodic telemetry: device figures read from /proc and /sys, per-model serving metrics, health.

No psutil (not a device dependency): Linux exposes everything we report as text files. Figures
the OS does not expose (no thermal zones in a VM, no /proc on macOS) are reported as null.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge_runtime.codecs.payloads import EventKind, encode_event, encode_telemetry
from edge_runtime.telemetry.health import Health
from edge_runtime.telemetry.sampler import DeviceSampler

if TYPE_CHECKING:  # the outbox (sqlite3) is only imported when MQTT is on
    from edge_runtime.state.outbox import Outbox

__all__ = [
    "TelemetryLoop",
]

log = logging.getLogger(__name__)


class TelemetryLoop:
    """A thread that queues one telemetry record per interval in the outbox, plus drop events.

    `outbox.put` never raises (a full disk is counted in the outbox's faults and reported in the
    next record), and any other failure of a tick is logged: the thread runs until `stop()`.
    """

    def __init__(
        self,
        device_id: str,
        topic: str,
        events_topic: str,
        outbox: Outbox,
        *,
        interval_s: float,
        sources: dict[str, Callable[[], Any]],
        health: Callable[[], Health],
        on_queued: Callable[[], None] = lambda: None,
        outbox_stats: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.device_id = device_id
        self.topic = topic
        self.events_topic = events_topic
        self.outbox = outbox
        self.interval_s = interval_s
        self.sources = sources
        self.health = health
        self.on_queued = on_queued
        self.outbox_stats = outbox_stats
        """Extra figures for the record's `outbox` section (the sender's)."""
        self.sampler = DeviceSampler()
        self.count = 0
        self._reported_drops = outbox.dropped
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)

    def record(self) -> dict[str, Any]:
        """One telemetry record (without queuing it)."""
        self.count += 1
        health = self.health()
        doc: dict[str, Any] = {
            "device": self.device_id,
            "n": self.count,
            "started": round(self.sampler.started, 3),
            "ts": round(time.time(), 3),
            "health": health.value,
            "is_serving": health.is_serving,
            "is_healthy": health.is_healthy,
            "system": self.sampler.sample(),
        }
        doc.update({name: source() for name, source in self.sources.items()})
        doc["outbox"] = {**self.outbox.stats(), **self.outbox_stats()}
        return doc

    def tick(self) -> None:
        """Queue one record, and an event if records were dropped since the last one."""
        self.outbox.put(self.topic, encode_telemetry(self.record()), qos=1)
        dropped = self.outbox.dropped
        if dropped > self._reported_drops:
            event = encode_event(
                EventKind.TELEMETRY_DROPPED,
                self.device_id,
                dropped=dropped - self._reported_drops,
                dropped_total=dropped,
                max_records=self.outbox.max_records,
            )
            self.outbox.put(self.events_topic, event, qos=1)
            self._reported_drops = dropped
        self.on_queued()

    @property
    def alive(self) -> bool:
        """True while the periodic thread runs."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Start the periodic thread (the first record goes out at once)."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # telemetry must never take the daemon down
                log.exception("telemetry tick failed")
            next_at += self.interval_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))
