"""The PostgreSQL fleet store (``postgresql://`` URLs; needs ``psycopg``, the ``fleet`` extra).

Schema and semantics as `fleet.db`. A batch is one statement per table, ``INSERT ... SELECT FROM
unnest(<one array per column>) ON CONFLICT DO NOTHING``, in one transaction: one round trip per
table however large the batch, and the row count says how many records were new. Several
collectors may write one database at once (the primary key settles who stores a record).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from edge_runtime.core.errors import UsageError
from edge_runtime.fleet.db import (
    RECORD_COLUMNS,
    SAMPLE_COLUMNS,
    QueryStore,
    StoreError,
    record_rows,
)
from edge_runtime.fleet.records import Record

try:
    import psycopg
except ModuleNotFoundError:  # pragma: no cover - the fleet extra is not installed
    psycopg = None  # type: ignore[assignment]

__all__ = ["PostgresStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    device TEXT NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL,
    received DOUBLE PRECISION NOT NULL, topic TEXT NOT NULL, state TEXT, model TEXT, version TEXT,
    job TEXT, body TEXT NOT NULL, PRIMARY KEY (device, key)
);
CREATE INDEX IF NOT EXISTS records_device_kind_ts ON records (device, kind, ts);
CREATE TABLE IF NOT EXISTS samples (
    device TEXT NOT NULL, key TEXT NOT NULL, model TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL,
    started DOUBLE PRECISION, version TEXT, state TEXT, requests BIGINT, errors BIGINT,
    p50 DOUBLE PRECISION, p95 DOUBLE PRECISION, p99 DOUBLE PRECISION, PRIMARY KEY (device, key, model)
);
CREATE INDEX IF NOT EXISTS samples_ts ON samples (ts);
"""
_TYPES = {
    "ts": "float8", "received": "float8", "started": "float8", "p50": "float8", "p95": "float8",
    "p99": "float8", "requests": "int8", "errors": "int8",
}  # fmt: skip


def _insert(table: str, columns: Sequence[str]) -> str:
    arrays = ", ".join(f"%s::{_TYPES.get(column, 'text')}[]" for column in columns)
    return f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays}) ON CONFLICT DO NOTHING"


_INSERT_RECORD = _insert("records", RECORD_COLUMNS)
_INSERT_SAMPLE = _insert("samples", SAMPLE_COLUMNS)


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows turned into one list per column (what unnest takes)."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


class PostgresStore(QueryStore):
    """Fleet records in a PostgreSQL database (tables created on first use)."""

    placeholder = "%s"

    def __init__(self, url: str) -> None:
        if psycopg is None:
            raise UsageError("a postgresql:// store needs psycopg: pip install 'edge-runtime[fleet]'")
        self.url = _redacted(url)
        self._conninfo = url
        self._lock = threading.Lock()
        """One connection, used from the collector's writer and any reader: one operation at a time."""
        try:
            self._db = self._connect()
            with self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(7212)")  # two collectors creating at once
                self._db.execute(_SCHEMA)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the PostgreSQL store {self.url}: {_brief(exc)}") from exc

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self._conninfo, connect_timeout=10, autocommit=True)

    def _live(self) -> psycopg.Connection[Any]:
        """The connection, opened again if the server dropped it (a restart, a failover)."""
        if self._db.closed or self._db.broken:
            self._db = self._connect()
        return self._db

    def add(self, records: Sequence[Record]) -> int:
        """Store `records` in one transaction; how many were new."""
        rows, samples = record_rows(records)
        try:
            with self._lock, self._live().transaction() as tx:
                db = tx.connection
                cursor = db.execute(_INSERT_RECORD, _columns(rows, len(RECORD_COLUMNS)))
                stored = max(cursor.rowcount, 0)
                if samples:
                    db.execute(_INSERT_SAMPLE, _columns(samples, len(SAMPLE_COLUMNS)))
        except psycopg.Error as exc:
            raise StoreError(f"cannot write the PostgreSQL store {self.url}: {_brief(exc)}") from exc
        return stored

    def _rows(self, query: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            with self._lock, self._live().transaction() as tx:
                return list(tx.connection.execute(query, args).fetchall())
        except psycopg.Error as exc:
            raise StoreError(f"cannot read the PostgreSQL store {self.url}: {_brief(exc)}") from exc

    def close(self) -> None:
        """Close the connection."""
        self._db.close()


def _redacted(url: str) -> str:
    """`url` without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


def _brief(exc: BaseException) -> str:
    """The first line of a driver error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
