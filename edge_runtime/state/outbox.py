"""A bounded on-disk queue (SQLite) for messages that must survive a broker outage or a power cut.

Records stay in the file until the broker acknowledged them (QoS 1 PUBACK); ``OutboxSender``
publishes them in order whenever the link is up. The file is bounded in records and in bytes:
beyond either bound the oldest records are dropped and counted (the count survives restarts).

Durability: WAL journal with ``synchronous=FULL``: every commit is fsynced before ``put`` returns,
so a record the daemon accepted is still there after a power cut. With ``NORMAL`` a WAL commit is
only durable at the next checkpoint, which loses exactly the records written just before an
outage. The WAL is checkpointed and truncated when the queue drains (and every few hundred
removals), and ``journal_size_limit`` caps what a checkpoint leaves behind, so the WAL stays small.

Every JSON-object payload gets ``"key": "<outbox id>-<seq>"`` when it is queued: the outbox id is
random per file, the sequence number grows by one per record, so the key is unique per device and
stable across re-deliveries. Delivery is at-least-once (a record acknowledged by the broker just
before a crash is sent again after the restart); consumers drop duplicates by ``key``.

Nothing here raises into a producer: a failed ``put`` (disk full, I/O error) is counted in
``faults`` and logged at a bounded rate. `state.outbox_recovery.open_outbox` moves a damaged file
aside and starts a fresh one, or keeps records in memory when no file can be created at all.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.core.errors import TransientError, UsageError

__all__ = ["DEFAULT_MAX_BYTES", "Faults", "Outbox", "OutboxCorrupt", "OutboxError", "Record"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
WAL_LIMIT_BYTES = 1024 * 1024
"""What a checkpoint may leave of the WAL file (``journal_size_limit``)."""
_WAL_AUTOCHECKPOINT_PAGES = 256
_CHECKPOINT_EVERY = 256
"""Removed records between two explicit checkpoints while the queue is not empty."""
_MAX_DEAD_LETTERS = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY, topic BLOB, payload BLOB, reason TEXT NOT NULL, ts REAL NOT NULL
);
INSERT OR IGNORE INTO counters VALUES ('dropped', 0);
INSERT OR IGNORE INTO counters VALUES ('dead', 0);
"""
_COLUMNS = ["seq", "topic", "payload", "qos", "retain"]
_SIZE = "length(CAST(topic AS BLOB)) + length(CAST(payload AS BLOB))"


class OutboxError(TransientError):
    """The outbox file cannot be read or written (disk full, I/O error, permissions)."""


class OutboxCorrupt(OutboxError):
    """The outbox file is not a usable outbox (garbage, truncated, a directory, another schema)."""


@dataclass(frozen=True)
class Record:
    """One queued message; `seq` grows by one per record, across restarts."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Faults:
    """Errors counted, the last one kept, each place logged at most once per `every_s` seconds."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self.count = 0
        self.last: str | None = None
        self._lock = threading.Lock()
        self._logged: dict[str, tuple[float, int]] = {}  # place -> (logged at, suppressed since)

    def note(self, where: str, exc: BaseException) -> None:
        """Count `exc`, keep it as the last error, and log it unless `where` was logged recently."""
        message = f"{where}: {type(exc).__name__}: {exc}"
        now = time.monotonic()
        with self._lock:
            self.count += 1
            self.last = message
            at, suppressed = self._logged.get(where, (float("-inf"), 0))
            if now - at < self.every_s:
                self._logged[where] = (at, suppressed + 1)
                return
            self._logged[where] = (now, 0)
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        log.warning("outbox %s; will retry%s", message, more)


def _damaged(exc: sqlite3.Error) -> bool:
    """True when SQLite says the file is damaged or not a database."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name == "SQLITE_NOTADB" or name.startswith("SQLITE_CORRUPT") or "malformed" in str(exc)


def _with_key(payload: bytes, key: str) -> bytes:
    """`payload` with ``"key"`` added when it is a JSON object; anything else unchanged."""
    if payload[:1] != b"{":
        return payload
    field = b'"key":"' + key.encode("ascii") + b'"'
    return b"{" + field + b"}" if payload.strip() == b"{}" else b"{" + field + b"," + payload[1:]


def _parse_row(row: tuple[Any, ...]) -> Record | str:
    """A record from a raw row, or why it cannot be sent (rows are outside bytes: check every field)."""
    seq, topic, payload, qos, retain = row
    if not isinstance(topic, bytes):
        return "topic is missing"
    try:
        text = topic.decode("utf-8")
    except UnicodeDecodeError:
        return "topic is not UTF-8"
    if not text:
        return "topic is empty"
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if not isinstance(payload, bytes):
        return f"payload is {type(payload).__name__}, not bytes"
    if type(qos) is not int or qos not in (0, 1, 2):
        return f"qos {qos!r} is not 0, 1 or 2"
    if type(retain) is not int or retain not in (0, 1):
        return f"retain {retain!r} is not 0 or 1"
    return Record(seq, text, payload, qos, bool(retain))


class Outbox:
    """The SQLite file holding unacknowledged messages, oldest first, within `max_records` and `max_bytes`.

    `path` None keeps the records in memory (`durable` is then False): the fallback when no file
    can be created.
    """

    def __init__(self, path: Path | None, max_records: int, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_records < 1:
            raise UsageError(f"outbox max_records must be at least 1, got {max_records}")
        if max_bytes < 1024:
            raise UsageError(f"outbox max_bytes must be at least 1024, got {max_bytes}")
        self.path = None if path is None else Path(path)
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.faults = Faults()
        self._lock = threading.Lock()
        self._removed_since_checkpoint = 0
        self._db = self._connect()
        try:
            self._load()
        except sqlite3.Error as exc:
            self._db.close()
            raise self._translate(exc) from exc
        except (ValueError, TypeError, KeyError) as exc:  # counters that are not numbers
            self._db.close()
            raise OutboxCorrupt(f"outbox {self.path} has unreadable counters: {exc!r}") from exc

    @property
    def durable(self) -> bool:
        """True when records are in a file (False: in memory, lost on restart)."""
        return self.path is not None

    def _translate(self, exc: sqlite3.Error | OSError) -> OutboxError:
        where = self.path or "(memory)"
        if isinstance(exc, sqlite3.Error) and _damaged(exc):
            return OutboxCorrupt(f"outbox {where} is damaged: {exc}")
        return OutboxError(f"cannot use outbox {where}: {exc}")

    def _connect(self) -> sqlite3.Connection:
        if self.path is not None and self.path.is_dir():
            raise OutboxCorrupt(f"outbox {self.path} is a directory, not a file")
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            target = ":memory:" if self.path is None else str(self.path)
            db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, timeout=5.0)
        except (sqlite3.Error, OSError) as exc:
            raise self._translate(exc) from exc
        try:
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file only
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            db.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT_PAGES}")
            check = db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if check != "ok":
                raise OutboxCorrupt(f"outbox {self.path} is damaged: {check}")
            db.executescript(_SCHEMA)
            columns = [row[1] for row in db.execute("PRAGMA table_info(records)")]
            if columns != _COLUMNS:
                raise OutboxCorrupt(f"outbox {self.path} holds another table 'records' ({columns})")
        except BaseException as exc:
            db.close()
            if isinstance(exc, sqlite3.Error | OSError):
                raise self._translate(exc) from exc
            raise
        return db

    def _load(self) -> None:
        db = self._db
        db.execute("INSERT OR IGNORE INTO counters VALUES ('id', ?)", (secrets.randbits(48),))
        counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
        self.id = f"{int(counters['id']):012x}"
        """Random per file: with the sequence number it makes the record key."""
        self._dropped = int(counters["dropped"])
        self._dead = int(counters["dead"])
        self._recount()

    def _recount(self) -> None:
        """Count the records and their bytes from the file (at open, and after a rare repair)."""
        count, size = self._db.execute(f"SELECT COUNT(*), COALESCE(SUM({_SIZE}), 0) FROM records").fetchone()
        self._count, self._bytes = int(count), int(size)

    # -- writing ------------------------------------------------------------------------------
    def put(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        """Append a message (keyed), dropping the oldest beyond the bounds; its seq, or None if it failed."""
        size = len(topic.encode("utf-8")) + len(payload) + 40  # the key
        if size > self.max_bytes:
            self.faults.note("put", OutboxError(f"a {size}-byte record is over outbox.max_bytes"))
            with self._lock:
                self._dropped += 1
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("UPDATE counters SET value = value + 1 WHERE name = 'dropped'")
            return None
        try:
            with self._lock:
                return self._insert(topic, payload, qos, retain)
        except (sqlite3.Error, OSError) as exc:
            self.faults.note("put", self._translate(exc))
            return None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on any exception."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def _insert(self, topic: str, payload: bytes, qos: int, retain: bool) -> int:
        with self._transaction() as db:
            last = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
            top = db.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0]
            seq = max(int(last[0]) if last else 0, int(top)) + 1
            body = _with_key(payload, f"{self.id}-{seq}")
            db.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?)", (seq, topic, body, qos, int(retain)))
            count, size = self._count + 1, self._bytes + len(topic.encode("utf-8")) + len(body)
            dropped, freed = self._trim(count, size)
            if dropped:
                db.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (dropped,))
        self._count, self._bytes = count - dropped, size - freed
        self._dropped += dropped
        return seq

    def _trim(self, count: int, size: int) -> tuple[int, int]:
        """Delete the oldest records until both bounds hold (inside the caller's transaction)."""
        if count <= self.max_records and size <= self.max_bytes:
            return 0, 0
        dropped = freed = 0
        cutoff = None
        cursor = self._db.execute(f"SELECT seq, {_SIZE} FROM records ORDER BY seq")
        for seq, row_size in cursor:
            if count - dropped <= self.max_records and size - freed <= self.max_bytes:
                break
            dropped, freed, cutoff = dropped + 1, freed + int(row_size or 0), seq
        cursor.close()
        if cutoff is not None:
            self._db.execute("DELETE FROM records WHERE seq <= ?", (cutoff,))
        return dropped, freed

    def remove(self, seqs: list[int]) -> None:
        """Delete acknowledged records (unknown sequence numbers are ignored); OutboxError if it fails."""
        if not seqs:
            return
        chunks = [seqs[start : start + 500] for start in range(0, len(seqs), 500)]  # SQLite's variable limit
        count = size = 0
        with self._lock:
            try:
                with self._transaction() as db:
                    for chunk in chunks:
                        marks = ",".join("?" * len(chunk))
                        found, found_size = db.execute(
                            f"SELECT COUNT(*), COALESCE(SUM({_SIZE}), 0) FROM records WHERE seq IN ({marks})",
                            chunk,
                        ).fetchone()
                        db.execute(f"DELETE FROM records WHERE seq IN ({marks})", chunk)
                        count, size = count + int(found), size + int(found_size)
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc
            self._count -= count
            self._bytes -= size
            if self._count < 0 or self._bytes < 0:  # another process wrote to the file
                with contextlib.suppress(sqlite3.Error):
                    self._recount()
            self._removed_since_checkpoint += count
            if self._count == 0 or self._removed_since_checkpoint >= _CHECKPOINT_EVERY:
                self._checkpoint()

    def _checkpoint(self) -> None:
        """Give freed pages back and truncate the WAL (a failure is counted, never raised)."""
        self._removed_since_checkpoint = 0
        try:
            self._db.executescript("PRAGMA incremental_vacuum;")  # sqlite3_exec: all steps, not one page
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            self.faults.note("checkpoint", self._translate(exc))

    def bury(self, seq: int, reason: str) -> None:
        """Move a record that cannot be sent to the dead-letter table (the last 100 are kept), and count it."""
        with self._lock:
            self._bury([(seq, reason)])

    def _bury(self, items: list[tuple[int, str]]) -> None:
        count = 0
        try:
            with self._transaction() as db:
                for seq, reason in items:
                    if db.execute("SELECT 1 FROM records WHERE seq = ?", (seq,)).fetchone() is None:
                        continue
                    db.execute(
                        "INSERT OR REPLACE INTO dead_letters SELECT seq, CAST(topic AS BLOB), payload, ?, ? "
                        "FROM records WHERE seq = ?",
                        (reason, time.time(), seq),
                    )
                    db.execute("DELETE FROM records WHERE seq = ?", (seq,))
                    db.execute("UPDATE counters SET value = value + 1 WHERE name = 'dead'")
                    count += 1
                db.execute(
                    "DELETE FROM dead_letters WHERE seq NOT IN "
                    "(SELECT seq FROM dead_letters ORDER BY seq DESC LIMIT ?)",
                    (_MAX_DEAD_LETTERS,),
                )
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        self._dead += count
        with contextlib.suppress(sqlite3.Error):  # rows we did not write may be among them: count again
            self._recount()
        for seq, reason in items:
            log.error("outbox record %d cannot be sent (%s): moved to dead_letters", seq, reason)

    # -- reading ------------------------------------------------------------------------------
    def peek(self, after: int, limit: int) -> list[Record]:
        """Up to `limit` records with a sequence number above `after`, oldest first; unreadable rows are buried."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT seq, CAST(topic AS BLOB), payload, qos, retain FROM records "
                    "WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc
            parsed = [(row[0], _parse_row(row)) for row in rows]
            bad = [(seq, item) for seq, item in parsed if isinstance(item, str)]
            if bad:
                self._bury(bad)
        return [item for _, item in parsed if isinstance(item, Record)]

    def dead_letters(self) -> list[tuple[int, str]]:
        """(seq, reason) of the buried records still kept, oldest first."""
        with self._lock:
            try:
                rows = self._db.execute("SELECT seq, reason FROM dead_letters ORDER BY seq").fetchall()
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc
        return [(int(seq), str(reason)) for seq, reason in rows]

    def pragmas(self) -> dict[str, Any]:
        """The journal settings in effect on this connection (journal_mode, synchronous, limits)."""
        names = ("journal_mode", "synchronous", "journal_size_limit", "wal_autocheckpoint", "auto_vacuum")
        with self._lock:
            return {name: self._db.execute(f"PRAGMA {name}").fetchone()[0] for name in names}

    @property
    def dropped(self) -> int:
        """How many records were dropped because a bound was hit, over the file's lifetime."""
        return self._dropped

    @property
    def buried(self) -> int:
        """How many records were moved to dead_letters, over the file's lifetime."""
        return self._dead

    def stats(self) -> dict[str, Any]:
        """Figures for telemetry: queued records and bytes, drops, dead letters, errors."""
        return {
            "queued": self._count,
            "bytes": self._bytes,
            "dropped_total": self._dropped,
            "dead_letters_total": self._dead,
            "errors": self.faults.count,
            "last_error": self.faults.last,
            "durable": self.durable,
        }

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        """Close the file (records stay on disk)."""
        with self._lock:
            self._db.close()
