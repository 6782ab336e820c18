"""A bounded on-disk queue (SQLite) for messages that must survive a broker outage or a power cut.

Records stay in the file until the broker acknowledged them (QoS 1 PUBACK); ``OutboxSender``
publishes them in order whenever the link is up. When the bound is hit, the oldest records are
dropped and counted; the count is kept in the same file, so it survives restarts too.

Durability: WAL journal with ``synchronous=FULL``: every commit is fsynced before ``put`` returns,
so a record the daemon accepted is still there after a power cut. With ``NORMAL`` a WAL commit is
only durable at the next checkpoint, which loses exactly the records written just before an
outage. The cost is one fsync per record, which is fine at telemetry rates (a few per second);
acknowledgements are deleted in batches to keep that cost per burst, not per message.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.core.errors import UsageError

__all__ = ["Outbox", "Record"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('dropped', 0);
"""


@dataclass(frozen=True)
class Record:
    """One queued message; `seq` grows by one per record, across restarts."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox:
    """The SQLite file holding unacknowledged messages, oldest first, at most `max_records`."""

    def __init__(self, path: Path, max_records: int) -> None:
        if max_records < 1:
            raise UsageError(f"outbox max_records must be at least 1, got {max_records}")
        self.path = Path(path)
        self.max_records = max_records
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise UsageError(f"cannot open outbox {self.path}: {exc}") from exc
        self._count = self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def put(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Append a message and return its sequence number; drops the oldest beyond the bound."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cursor = self._db.execute(
                "INSERT INTO records (topic, payload, qos, retain) VALUES (?, ?, ?, ?)",
                (topic, payload, qos, int(retain)),
            )
            self._count += 1
            excess = self._count - self.max_records
            if excess > 0:
                self._db.execute(
                    "DELETE FROM records WHERE seq IN (SELECT seq FROM records ORDER BY seq LIMIT ?)",
                    (excess,),
                )
                self._db.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (excess,))
                self._count -= excess
            return int(cursor.lastrowid or 0)

    def peek(self, after: int, limit: int) -> list[Record]:
        """Up to `limit` records with a sequence number above `after`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, qos, retain FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [
            Record(seq, topic, bytes(payload), qos, bool(retain)) for seq, topic, payload, qos, retain in rows
        ]

    def remove(self, seqs: list[int]) -> None:
        """Delete acknowledged records (unknown sequence numbers are ignored)."""
        if not seqs:
            return
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            deleted = self._db.executemany("DELETE FROM records WHERE seq = ?", [(s,) for s in seqs]).rowcount
            self._count -= max(deleted, 0)

    @property
    def dropped(self) -> int:
        """How many records were dropped because the bound was hit, over the file's lifetime."""
        with self._lock:
            return int(self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()[0])

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        """Close the file (records stay on disk)."""
        with self._lock:
            self._db.close()
