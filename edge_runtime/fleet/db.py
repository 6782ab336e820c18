"""Where the collector keeps fleet records: one small interface, SQLite or PostgreSQL behind it.

`open_db(url)`: a path or ``sqlite:///path`` opens SQLite (the default, no server); a
``postgresql://`` (or ``postgres://``) URL opens PostgreSQL (the ``psycopg`` driver, the
``fleet`` extra). Both keep the same two tables:

- ``records``: one row per record, keyed by ``(device, key)`` (device from the topic, so one
  device can never shadow another's records), with the fields summaries filter on as columns
  (kind, ts, state, model, version, job) and the whole payload as JSON text in ``body``;
- ``samples``: one row per (record, model) of telemetry: version, state, requests, errors and the
  device's own latency p50/p95/p99, indexed by time, for `edgectl telemetry summary`.

`Store.add` writes a batch in one transaction with ``INSERT ... ON CONFLICT DO NOTHING``, so a
record delivered twice (at-least-once delivery, a retained status seen again) is stored once, and
returns how many were new.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from edge_runtime.core.errors import TransientError, UsageError
from edge_runtime.fleet.records import Record

__all__ = [
    "RECORD_COLUMNS",
    "SAMPLE_COLUMNS",
    "DeviceRow",
    "QueryStore",
    "SampleRow",
    "Store",
    "StoreError",
    "open_db",
]

RECORD_COLUMNS = (
    "device",
    "key",
    "kind",
    "ts",
    "received",
    "topic",
    "state",
    "model",
    "version",
    "job",
    "body",
)
SAMPLE_COLUMNS = (
    "device", "key", "model", "ts", "started", "version", "state", "requests", "errors", "p50", "p95", "p99",
)  # fmt: skip


class StoreError(TransientError):
    """The database cannot be reached or written (the collector keeps the batch and retries)."""


@dataclass(frozen=True)
class SampleRow:
    """One model's figures from one telemetry record."""

    device: str
    model: str
    ts: float
    started: float | None
    version: str | None
    requests: int | None
    errors: int | None
    p50: float | None
    p95: float | None
    p99: float | None


@dataclass(frozen=True)
class DeviceRow:
    """What the store knows of a device: last record, last health, last presence."""

    device: str
    last_seen: float
    health: str | None
    presence: str | None


class Store(Protocol):
    """A fleet record store (`SqliteStore`, `PostgresStore`)."""

    url: str

    def add(self, records: Sequence[Record]) -> int:
        """Store `records` in one transaction; how many were new (the rest were duplicates)."""
        ...

    def count(self, kind: str | None = None) -> int:
        """Records stored (of `kind`, or all)."""
        ...

    def samples(self, since: float, device: str | None = None) -> list[SampleRow]:
        """Telemetry samples at or after `since`, oldest first (of `device`, or all)."""
        ...

    def devices(self, device: str | None = None) -> list[DeviceRow]:
        """Every device with a record (or `device`), by id."""
        ...

    def close(self) -> None:
        """Close the connection."""
        ...


def record_rows(records: Sequence[Record]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The ``records`` and ``samples`` rows of a batch (in `RECORD_COLUMNS` / `SAMPLE_COLUMNS` order)."""
    now = time.time()
    rows: list[tuple[Any, ...]] = []
    samples: list[tuple[Any, ...]] = []
    for r in records:
        rows.append(
            (r.device, r.key, r.kind.value, r.ts, now, r.topic, r.state, r.model, r.version, r.job, r.body)
        )
        samples.extend(
            (r.device, r.key, s.model, r.ts, r.started, s.version, s.state, s.requests, s.errors,
             s.p50_ms, s.p95_ms, s.p99_ms)
            for s in r.models
        )  # fmt: skip
    return rows, samples


SAMPLES_SQL = (
    "SELECT device, model, ts, started, version, requests, errors, p50, p95, p99 FROM samples "
    "WHERE ts >= {p} {device} ORDER BY device, model, ts"
)
DEVICES_SQL = """
SELECT r.device, r.last_seen,
  (SELECT state FROM records t WHERE t.device = r.device AND t.kind = 'telemetry' ORDER BY ts DESC LIMIT 1),
  (SELECT state FROM records s WHERE s.device = r.device AND s.kind = 'status' ORDER BY ts DESC LIMIT 1)
FROM (SELECT device, MAX(ts) AS last_seen FROM records {where} GROUP BY device) r ORDER BY r.device
"""


def samples_query(placeholder: str, device: str | None) -> str:
    """The samples query for a driver's placeholder style."""
    return SAMPLES_SQL.format(p=placeholder, device=f"AND device = {placeholder}" if device else "")


def devices_query(placeholder: str, device: str | None) -> str:
    """The per-device query for a driver's placeholder style."""
    return DEVICES_SQL.format(where=f"WHERE device = {placeholder}" if device else "")


class QueryStore:
    """The read side both stores share: the same queries, each driver's placeholder and `_rows`."""

    placeholder = "?"

    def _rows(self, query: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def count(self, kind: str | None = None) -> int:
        """Records stored (of `kind`, or all)."""
        if kind is None:
            return int(self._rows("SELECT COUNT(*) FROM records", ())[0][0])
        return int(self._rows(f"SELECT COUNT(*) FROM records WHERE kind = {self.placeholder}", (kind,))[0][0])

    def samples(self, since: float, device: str | None = None) -> list[SampleRow]:
        """Telemetry samples at or after `since`, by device, model and time."""
        args = (since, device) if device else (since,)
        return [SampleRow(*row) for row in self._rows(samples_query(self.placeholder, device), args)]

    def devices(self, device: str | None = None) -> list[DeviceRow]:
        """Every device with a record (or `device`), by id."""
        query = devices_query(self.placeholder, device)
        return [DeviceRow(*row) for row in self._rows(query, (device,) if device else ())]


def open_db(url: str) -> Store:
    """The store at `url`: a path or ``sqlite:///path`` (SQLite), or ``postgresql://...``."""
    if url.startswith(("postgresql://", "postgres://")):
        from edge_runtime.fleet.store_postgres import PostgresStore

        return PostgresStore(url)
    if "://" in url and not url.startswith("sqlite://"):
        raise UsageError(f"--db '{url}': use a file path, sqlite:///PATH or postgresql://...")
    from edge_runtime.fleet.store_sqlite import SqliteStore

    return SqliteStore(url.removeprefix("sqlite://"))
