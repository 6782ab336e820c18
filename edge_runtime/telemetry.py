"""Periodic telemetry: device figures read from /proc and /sys, per-model serving metrics, health.

No psutil (not a device dependency): Linux exposes everything we report as text files. Figures
the OS does not expose (no thermal zones in a VM, no /proc on macOS) are reported as null.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime.payloads import EventKind, encode_event, encode_telemetry

if TYPE_CHECKING:  # the outbox (sqlite3) is only imported when MQTT is on
    from edge_runtime.outbox import Outbox

__all__ = ["DeviceSampler", "Health", "TelemetryLoop", "assess_health"]

log = logging.getLogger(__name__)
_PROC = Path("/proc")
_THERMAL = Path("/sys/class/thermal")


class Health(StrEnum):
    """The daemon's health as data: each state says whether it serves and whether it is healthy."""

    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    """Serving, but a model was refused or the broker is unreachable."""
    ERRORED = "errored"
    """No model serving."""
    STOPPING = "stopping"

    @property
    def is_serving(self) -> bool:
        """True when inference requests are answered."""
        return self in (Health.RUNNING, Health.DEGRADED)

    @property
    def is_healthy(self) -> bool:
        """True when nothing needs attention."""
        return self in (Health.STARTING, Health.RUNNING, Health.STOPPING)


def assess_health(*, ready: bool, serving: int, refused: int, broker_up: bool, stopping: bool) -> Health:
    """The health state from the facts telemetry knows."""
    if stopping:
        return Health.STOPPING
    if not ready:
        return Health.STARTING
    if serving == 0:
        return Health.ERRORED
    return Health.RUNNING if refused == 0 and broker_up else Health.DEGRADED


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def _cpu_totals() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    text = _read(_PROC / "stat")
    if not text:
        return None
    fields = [float(value) for value in text.split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def _process_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _meminfo_bytes(key: str, text: str | None) -> int | None:
    for line in (text or "").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def _temperatures() -> dict[str, float]:
    """Degrees Celsius per thermal zone type, where the OS exposes them."""
    temps: dict[str, float] = {}
    for zone in sorted(_THERMAL.glob("thermal_zone*")):
        raw = _read(zone / "temp")
        kind = (_read(zone / "type") or zone.name).strip()
        if raw and raw.strip().lstrip("-").isdigit():
            temps[kind] = int(raw) / 1000.0
    return temps


class DeviceSampler:
    """Device figures; CPU percentages are over the time since the previous sample."""

    def __init__(self) -> None:
        self.started = time.time()
        self._cpu = _cpu_totals()
        self._proc_cpu = _process_cpu_seconds()
        self._wall = time.monotonic()

    def sample(self) -> dict[str, Any]:
        """CPU %, process CPU %, RSS, available memory, temperatures, uptimes, load averages."""
        cpu, proc_cpu, wall = _cpu_totals(), _process_cpu_seconds(), time.monotonic()
        cpu_percent = None
        if cpu and self._cpu and cpu[1] > self._cpu[1]:
            cpu_percent = round(100.0 * (cpu[0] - self._cpu[0]) / (cpu[1] - self._cpu[1]), 1)
        elapsed = wall - self._wall
        process_percent = round(100.0 * (proc_cpu - self._proc_cpu) / elapsed, 1) if elapsed > 0 else None
        self._cpu, self._proc_cpu, self._wall = cpu, proc_cpu, wall
        uptime = _read(_PROC / "uptime")
        try:
            load = [round(value, 2) for value in os.getloadavg()]
        except OSError:
            load = None
        return {
            "cpu_percent": cpu_percent,
            "process_cpu_percent": process_percent,
            "rss_bytes": _meminfo_bytes("VmRSS", _read(_PROC / "self" / "status")),
            "mem_available_bytes": _meminfo_bytes("MemAvailable", _read(_PROC / "meminfo")),
            "temperature_c": _temperatures() or None,
            "uptime_s": float(uptime.split()[0]) if uptime else None,
            "process_uptime_s": round(time.time() - self.started, 1),
            "load": load,
        }


class TelemetryLoop:
    """A thread that queues one telemetry record per interval in the outbox, plus drop events."""

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
    ) -> None:
        self.device_id = device_id
        self.topic = topic
        self.events_topic = events_topic
        self.outbox = outbox
        self.interval_s = interval_s
        self.sources = sources
        self.health = health
        self.on_queued = on_queued
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
        doc["outbox"] = {"queued": len(self.outbox), "dropped_total": self.outbox.dropped}
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
