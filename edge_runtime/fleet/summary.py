"""Per device and model, from stored telemetry: requests, errors, latency over time, last seen, version.

The device's counters are cumulative since its daemon started (per model version), so requests in
a window are the sum of the increases between consecutive samples of one run (same ``started``
and version); a run that began inside the window counts from zero. Latency is the device's own:
each record's p50/p95/p99 over its recent requests; a time bucket shows the median p50 and the
highest p95 and p99 of the records in it.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.core.errors import UsageError
from edge_runtime.fleet.db import DeviceRow, SampleRow, Store

__all__ = ["Bucket", "ModelSummary", "Point", "parse_duration", "plot", "render", "summarize"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, option: str = "--since") -> float:
    """Seconds in ``90s``, ``15m``, ``1h``, ``2d`` or ``1w`` (UsageError otherwise)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"{option} '{text}' must be a duration like 90s, 15m, 1h, 2d or 1w")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


@dataclass(frozen=True)
class Point:
    """One telemetry sample with the increase since the previous one of the same run."""

    ts: float
    requests: int
    errors: int
    interval_s: float | None
    """Seconds since the previous sample of the run (None: first of its run in the window)."""
    p50: float | None
    p95: float | None
    p99: float | None


@dataclass(frozen=True)
class Bucket:
    """Requests and latency of one time slice."""

    start: float
    requests: int
    errors: int
    p50: float | None
    p95: float | None
    p99: float | None


@dataclass
class ModelSummary:
    """One (device, model) over the window."""

    device: str
    model: str
    version: str | None = None
    requests: int = 0
    errors: int = 0
    last_sample: float = 0.0
    points: list[Point] = field(default_factory=list)

    @property
    def p50(self) -> float | None:
        """Median of the samples' p50."""
        values = [p.p50 for p in self.points if p.p50 is not None]
        return statistics.median(values) if values else None

    @property
    def p95(self) -> float | None:
        """Highest p95 of the samples."""
        return max((p.p95 for p in self.points if p.p95 is not None), default=None)

    @property
    def p99(self) -> float | None:
        """Highest p99 of the samples."""
        return max((p.p99 for p in self.points if p.p99 is not None), default=None)

    def buckets(self, start: float, width: float) -> list[Bucket]:
        """The points in slices of `width` seconds from `start` (empty slices left out)."""
        groups: dict[int, list[Point]] = {}
        for point in self.points:
            groups.setdefault(int((point.ts - start) // width), []).append(point)
        return [_bucket(start + index * width, points) for index, points in sorted(groups.items())]


def _bucket(start: float, points: list[Point]) -> Bucket:
    p50s = [p.p50 for p in points if p.p50 is not None]
    return Bucket(
        start=start,
        requests=sum(p.requests for p in points),
        errors=sum(p.errors for p in points),
        p50=statistics.median(p50s) if p50s else None,
        p95=max((p.p95 for p in points if p.p95 is not None), default=None),
        p99=max((p.p99 for p in points if p.p99 is not None), default=None),
    )


def summarize(samples: Iterable[SampleRow], since: float) -> list[ModelSummary]:
    """One summary per (device, model), from samples sorted by device, model and time."""
    summaries: dict[tuple[str, str], ModelSummary] = {}
    previous: dict[tuple[str, str, float | None, str | None], SampleRow] = {}
    for row in samples:
        summary = summaries.setdefault((row.device, row.model), ModelSummary(row.device, row.model))
        run = (row.device, row.model, row.started, row.version)
        before = previous.get(run)
        previous[run] = row
        requests = _increase(before.requests if before else None, row.requests, row, since)
        errors = _increase(before.errors if before else None, row.errors, row, since)
        interval = row.ts - before.ts if before else None
        summary.points.append(Point(row.ts, requests, errors, interval, row.p50, row.p95, row.p99))
        summary.requests += requests
        summary.errors += errors
        summary.version = row.version
        summary.last_sample = row.ts
    return list(summaries.values())


def _increase(before: int | None, now: int | None, row: SampleRow, since: float) -> int:
    if now is None:
        return 0
    if before is None:  # first sample of this run in the window
        return now if row.started is not None and row.started >= since else 0
    return now - before if now >= before else now  # a lower count: the counter was reset


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _when(ts: float, now: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    return f"{stamp} ({max(0.0, now - ts):.0f} s ago)"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def render(summaries: list[ModelSummary], devices: list[DeviceRow], since: float, width: float) -> str:
    """The summary as text: one line per device and model, then latency over time per model."""
    now = time.time()
    seen = {row.device: row for row in devices}
    header = ["device", "model", "version", "requests", "errors", "p50_ms", "p95_ms", "p99_ms",
              "health", "presence", "last seen"]  # fmt: skip
    rows = [header]
    for s in summaries:
        device = seen.get(s.device)
        rows.append([s.device, s.model, s.version or "-", str(s.requests), str(s.errors), _ms(s.p50),
                     _ms(s.p95), _ms(s.p99), (device.health if device else None) or "-",
                     (device.presence if device else None) or "-",
                     _when(device.last_seen if device else s.last_sample, now)])  # fmt: skip
    for device in devices:  # devices with records but no model samples (status only, no models)
        if not any(s.device == device.device for s in summaries):
            rows.append([device.device, "-", "-", "0", "0", "-", "-", "-", device.health or "-",
                         device.presence or "-", _when(device.last_seen, now)])  # fmt: skip
    if len(rows) == 1:
        return "no records in the window"
    lines = _table(rows)
    for s in summaries:
        lines += ["", f"{s.device} / {s.model}: every {width:.0f} s"]
        bucket_rows = [["from", "requests", "errors", "p50_ms", "p95_ms", "p99_ms"]]
        for b in s.buckets(since, width):
            bucket_rows.append([time.strftime("%H:%M:%S", time.localtime(b.start)), str(b.requests),
                                str(b.errors), _ms(b.p50), _ms(b.p95), _ms(b.p99)])  # fmt: skip
        lines += ["  " + line for line in _table(bucket_rows)]
    return "\n".join(lines)


def plot(summaries: list[ModelSummary], path: Path) -> None:
    """Latency (p50, p95) and request rate over time per device and model, as a PNG (matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise UsageError("--plot needs matplotlib: pip install 'edge-runtime[fleet]'") from None
    from datetime import datetime

    figure, (latency, rate) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for s in summaries:
        label = f"{s.device}/{s.model}"
        times = [datetime.fromtimestamp(p.ts) for p in s.points]
        for name, style in (("p50", ".-"), ("p95", ".--")):
            values = [getattr(p, name) if getattr(p, name) is not None else float("nan") for p in s.points]
            latency.plot(times, values, style, label=f"{label} {name}")
        rates = [(datetime.fromtimestamp(p.ts), p.requests / p.interval_s) for p in s.points if p.interval_s]
        if rates:
            rate.plot([t for t, _ in rates], [r for _, r in rates], ".-", label=label)
    latency.set_ylabel("latency (ms)")
    latency.set_title("device latency percentiles")
    rate.set_ylabel("requests / s")
    rate.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
    for axis in (latency, rate):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    figure.tight_layout()
    try:
        figure.savefig(path, format="png", dpi=100)
    except OSError as exc:
        raise UsageError(f"cannot write --plot '{path}': {exc}") from None
    finally:
        plt.close(figure)


def load(store: Store, since: float, device: str | None) -> tuple[list[ModelSummary], list[DeviceRow]]:
    """Summaries and device rows from `store`."""
    return summarize(store.samples(since, device), since), store.devices(device)
