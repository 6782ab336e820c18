"""Serving metrics per model and version: requests, errors, latency percentiles, Prometheus text."""

from __future__ import annotations

import bisect
import collections
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LATENCY_BUCKETS", "Metrics"]

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Upper bounds (seconds) of the Prometheus latency histogram buckets; +Inf is implied."""
WINDOW = 2048
"""Percentiles are computed over the last this many requests of a model version."""


@dataclass
class _Series:
    """Counters of one (model, version)."""

    requests: int = 0
    errors: int = 0
    latency_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    recent: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=WINDOW))


def _escape(value: str) -> str:
    """A Prometheus label value with backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Thread-safe counters the dataplane updates and telemetry / `/metrics` read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], _Series] = {}
        self._latest: dict[str, str] = {}
        self._rejected = 0
        self._shed: dict[str, int] = {}

    def observe(self, model: str, version: str, seconds: float, ok: bool) -> None:
        """Count one request to a loaded model, with its latency and whether it succeeded."""
        slot = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            series = self._series.get((model, version))
            if series is None:
                series = self._series[(model, version)] = _Series()
            self._latest[model] = version
            series.requests += 1
            series.errors += 0 if ok else 1
            series.latency_sum += seconds
            series.buckets[slot] += 1
            series.recent.append(seconds)

    def reject(self) -> None:
        """Count a request that named no loaded model."""
        with self._lock:
            self._rejected += 1

    def shed(self, model: str | None) -> None:
        """Count a request refused unread because a transport was over capacity."""
        with self._lock:
            key = model or ""
            self._shed[key] = self._shed.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """Plain data: per model (its current version) requests, errors and latency p50/p95/p99 in ms."""
        with self._lock:
            current = {model: self._series[(model, version)] for model, version in self._latest.items()}
            copies = {
                model: (self._latest[model], series.requests, series.errors, list(series.recent))
                for model, series in current.items()
            }
            rejected = self._rejected
            shed = dict(self._shed)
        models: dict[str, Any] = {}
        for model, (version, requests, errors, recent) in sorted(copies.items()):
            latency: dict[str, float | None] = {"p50": None, "p95": None, "p99": None}
            if recent:
                values = np.percentile(np.asarray(recent) * 1000.0, [50, 95, 99])
                latency = {key: round(float(value), 4) for key, value in zip(latency, values, strict=True)}
            models[model] = {
                "version": version,
                "requests": requests,
                "errors": errors,
                "latency_ms": latency,
                "window": len(recent),
            }
        return {"models": models, "rejected": rejected, "shed": sum(shed.values())}

    def prometheus_text(self) -> str:
        """Every counter in the Prometheus text exposition format (version 0.0.4)."""
        lines = [
            "# HELP edge_requests_total Inference requests per model version.",
            "# TYPE edge_requests_total counter",
        ]
        with self._lock:
            items = sorted(
                (key, _Series(series.requests, series.errors, series.latency_sum, list(series.buckets)))
                for key, series in self._series.items()
            )
            rejected = self._rejected
            shed = sorted(self._shed.items())
        labels = {key: f'model="{_escape(key[0])}",version="{_escape(key[1])}"' for key, _ in items}
        lines += [f"edge_requests_total{{{labels[key]}}} {series.requests}" for key, series in items]
        lines += [
            "# HELP edge_request_errors_total Inference requests answered with an error.",
            "# TYPE edge_request_errors_total counter",
        ]
        lines += [f"edge_request_errors_total{{{labels[key]}}} {series.errors}" for key, series in items]
        lines += [
            "# HELP edge_request_latency_seconds Time from validation to outputs, per request.",
            "# TYPE edge_request_latency_seconds histogram",
        ]
        for key, series in items:
            cumulative = 0
            for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), series.buckets, strict=True):
                cumulative += count
                lines.append(
                    f'edge_request_latency_seconds_bucket{{{labels[key]},le="{bound}"}} {cumulative}'
                )
            lines.append(f"edge_request_latency_seconds_sum{{{labels[key]}}} {series.latency_sum:.6f}")
            lines.append(f"edge_request_latency_seconds_count{{{labels[key]}}} {series.requests}")
        lines += [
            "# HELP edge_requests_rejected_total Requests naming no loaded model.",
            "# TYPE edge_requests_rejected_total counter",
            f"edge_requests_rejected_total {rejected}",
            "# HELP edge_requests_shed_total Requests refused unread because the device was over capacity.",
            "# TYPE edge_requests_shed_total counter",
        ]
        lines += [f'edge_requests_shed_total{{model="{_escape(model)}"}} {count}' for model, count in shed]
        return "\n".join(lines) + "\n"
