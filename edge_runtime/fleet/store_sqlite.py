"""The SQLite fleet store (the default: one file, no server). Schema and semantics: `fleet.db`.

WAL journal with ``synchronous=FULL``: a batch is on disk when `add` returns, which is when the
collector acknowledges its messages to the broker, so an acknowledged record survives a power cut.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_runtime.fleet.db import (
    RECORD_COLUMNS,
    SAMPLE_COLUMNS,
    QueryStore,
    StoreError,
    record_rows,
)
from edge_runtime.fleet.records import Record

__all__ = ["SqliteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    device TEXT NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL, ts REAL NOT NULL, received REAL NOT NULL,
    topic TEXT NOT NULL, state TEXT, model TEXT, version TEXT, job TEXT, body TEXT NOT NULL,
    PRIMARY KEY (device, key)
);
CREATE INDEX IF NOT EXISTS records_device_kind_ts ON records (device, kind, ts);
CREATE TABLE IF NOT EXISTS samples (
    device TEXT NOT NULL, key TEXT NOT NULL, model TEXT NOT NULL, ts REAL NOT NULL, started REAL,
    version TEXT, state TEXT, requests INTEGER, errors INTEGER, p50 REAL, p95 REAL, p99 REAL,
    PRIMARY KEY (device, key, model)
);
CREATE INDEX IF NOT EXISTS samples_ts ON samples (ts);
"""


def _insert(table: str, columns: Sequence[str]) -> str:
    marks = ", ".join("?" for _ in columns)
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) ON CONFLICT DO NOTHING"


_INSERT_RECORD = _insert("records", RECORD_COLUMNS)
_INSERT_SAMPLE = _insert("samples", SAMPLE_COLUMNS)


class SqliteStore(QueryStore):
    """Fleet records in one SQLite file (created with its folder's permissions)."""

    def __init__(self, path: str) -> None:
        self.url = f"sqlite://{path}"
        try:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._lock = threading.Lock()
            """One connection, used from the collector's writer and any reader: one operation at a time."""
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the SQLite store '{path}': {exc}") from exc

    def add(self, records: Sequence[Record]) -> int:
        """Store `records` in one transaction; how many were new."""
        rows, samples = record_rows(records)
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    before = self._db.total_changes
                    self._db.executemany(_INSERT_RECORD, rows)
                    stored = self._db.total_changes - before
                    self._db.executemany(_INSERT_SAMPLE, samples)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the SQLite store {self.url}: {exc}") from exc
        return stored

    def _rows(self, query: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            with self._lock:
                return self._db.execute(query, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the SQLite store {self.url}: {exc}") from exc

    def close(self) -> None:
        """Close the file."""
        self._db.close()
