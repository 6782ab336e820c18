"""Device figures read from /proc and /sys (no psutil: it is not a device dependency).

Figures the OS does not expose (no thermal zones in a VM, no /proc on macOS) are reported as null.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

__all__ = ["DeviceSampler"]

_PROC = Path("/proc")
_THERMAL = Path("/sys/class/thermal")


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
