"""The outbox under faults: damaged files moved aside, no file at all, a full disk, bad rows, the WAL
and the file bounded, every record keyed."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.state.outbox import WAL_LIMIT_BYTES, Outbox
from edge_runtime.state.outbox_recovery import KEEP_CORRUPT, open_outbox

ROOT = Path(__file__).resolve().parent.parent


def _filled(path: Path, count: int = 200) -> None:
    """An outbox file holding `count` records (written in one transaction: quick)."""
    Outbox(path, max_records=10_000).close()
    db = sqlite3.connect(path)
    rows = [("t/x", json.dumps({"i": i, "pad": "x" * 200}).encode(), 1, 0) for i in range(count)]
    db.executemany("INSERT INTO records (topic, payload, qos, retain) VALUES (?, ?, ?, ?)", rows)
    db.commit()
    db.close()


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def _truncated(path: Path) -> None:
    _filled(path, 3000)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_text("kept")


def _other_schema(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE records (id INTEGER, body TEXT)")
    db.commit()
    db.close()


def _header_only(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + b"\x00" * 84)


def _bad_counters(path: Path) -> None:
    _filled(path, 3)
    db = sqlite3.connect(path)
    db.execute("UPDATE counters SET value = 'many' WHERE name = 'dropped'")
    db.commit()
    db.close()


@pytest.mark.parametrize(
    "damage",
    [_garbage, _truncated, _directory, _other_schema, _header_only, _bad_counters],
    ids=lambda f: f.__name__[1:],
)
def test_a_damaged_outbox_is_moved_aside_and_a_fresh_one_started(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    path = tmp_path / "outbox.sqlite"
    damage(path)
    outbox, reset = open_outbox(path, max_records=100)
    assert reset is not None and reset.durable and reset.moved_to is not None
    moved = Path(reset.moved_to)
    assert moved.name.startswith("outbox.sqlite.corrupt-") and moved.exists()
    if damage is _directory:
        assert (moved / "inside").read_text() == "kept"
    assert outbox.durable and len(outbox) == 0
    seq = outbox.put("t", b'{"v":1}')
    assert seq == 1 and [r.payload for r in outbox.peek(0, 10)] == [
        b'{"key":"%s-1","v":1}' % outbox.id.encode()
    ]
    outbox.close()
    again, second = open_outbox(path, max_records=100)
    assert second is None and len(again) == 1, "the fresh file is a good outbox on the next start"


def test_only_the_newest_damaged_copies_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    moved = []
    for _ in range(KEEP_CORRUPT + 3):
        _garbage(path)
        outbox, reset = open_outbox(path, max_records=10)
        assert reset is not None and reset.durable and reset.moved_to is not None
        moved.append(Path(reset.moved_to).name)
        outbox.close()
    kept = sorted(
        p.name for p in tmp_path.glob("outbox.sqlite.corrupt-*") if not p.name.endswith(("-wal", "-shm"))
    )
    assert kept == sorted(moved[-KEEP_CORRUPT:]), "the newest copies are kept, the older deleted"


def test_a_good_outbox_is_opened_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    _filled(path, 5)
    outbox, reset = open_outbox(path, max_records=100)
    assert reset is None and len(outbox) == 5
    assert not [p for p in tmp_path.iterdir() if "corrupt" in p.name]


def test_no_file_possible_keeps_records_in_memory(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("")
    outbox, reset = open_outbox(tmp_path / "not-a-folder" / "outbox.sqlite", max_records=3)
    assert reset is not None and not reset.durable and reset.moved_to is None
    assert "cannot use outbox" in reset.reason
    assert not outbox.durable and outbox.stats()["durable"] is False
    for i in range(5):
        outbox.put("t", b'{"i":%d}' % i)
    assert [json.loads(r.payload)["i"] for r in outbox.peek(0, 10)] == [2, 3, 4] and outbox.dropped == 2


def _child(script: str) -> dict:
    """Run `script` in a fresh interpreter (resource limits stay there); its last stdout line as JSON."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_full_disk_on_put_is_counted_never_raised_and_the_outbox_recovers(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes the kernel refuse to grow any file, as a full partition does."""
    path = tmp_path / "outbox.sqlite"
    got = _child(
        f"""
        import json, os, resource, signal
        from edge_runtime.state.outbox import Outbox
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        box = Outbox({str(path)!r}, max_records=1000)
        first = [box.put("t", b'{{"i":%d}}' % i) for i in range(3)]
        sizes = [os.path.getsize(p) for p in ({str(path)!r}, {str(path)!r} + "-wal")]
        resource.setrlimit(resource.RLIMIT_FSIZE, (max(sizes), resource.RLIM_INFINITY))
        full = [box.put("t", b'{{"i":%d}}' % i) for i in range(3, 6)]
        stats = box.stats()
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        after = box.put("t", b'{{"i":6}}')
        kept = [json.loads(r.payload)["i"] for r in box.peek(0, 100)]
        print(json.dumps({{"first": first, "full": full, "stats": stats, "after": after, "kept": kept}}))
        """
    )
    assert got["first"] == [1, 2, 3]
    assert got["full"] == [None, None, None], "a put on a full disk returns None, it never raises"
    assert got["stats"]["errors"] == 3 and "put" in got["stats"]["last_error"]
    assert got["after"] is not None and got["kept"] == [0, 1, 2, 6]
    assert [json.loads(r.payload)["i"] for r in Outbox(path, max_records=1000).peek(0, 100)] == [0, 1, 2, 6]


def test_a_full_disk_at_first_start_gives_an_outbox_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    got = _child(
        f"""
        import json, resource, signal
        from edge_runtime.state.outbox_recovery import open_outbox
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        box, reset = open_outbox({str(path)!r}, max_records=10)
        seq = box.put("t", b'{{"a":1}}')
        print(json.dumps({{"durable": box.durable, "reset": reset.reason, "fresh": reset.durable, "seq": seq}}))
        """
    )
    assert got["durable"] is False and got["fresh"] is False and got["seq"] == 1, got
    outbox, _ = open_outbox(path, max_records=10)  # disk space back: the next start is durable
    assert outbox.durable and len(outbox) == 0


def test_bad_rows_are_buried_and_never_block_the_queue(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, max_records=100)
    outbox.put("good/1", b'{"i":1}')
    raw = sqlite3.connect(path, isolation_level=None)
    bad_rows = [
        (b"\xff\xfe", b"{}", 1, 0),  # topic not UTF-8
        ("t", 10**12, 1, 0),  # payload an integer (bytes() of it would allocate a terabyte)
        ("t", b"{}", 7, 0),  # qos out of range
        ("", b"{}", 1, 0),  # empty topic
        ("t", b"{}", 1, "yes"),  # retain not 0/1
    ]
    raw.executemany("INSERT INTO records (topic, payload, qos, retain) VALUES (?, ?, ?, ?)", bad_rows)
    raw.close()
    outbox.close()
    outbox = Outbox(path, max_records=100)
    outbox.put("good/2", b'{"i":2}')
    got = outbox.peek(0, 100)
    assert [r.topic for r in got] == ["good/1", "good/2"]
    assert outbox.buried == 5 and len(outbox) == 2
    reasons = [reason for _, reason in outbox.dead_letters()]
    assert reasons == [
        "topic is not UTF-8",
        "payload is int, not bytes",
        "qos 7 is not 0, 1 or 2",
        "topic is empty",
        "retain 'yes' is not 0 or 1",
    ]
    assert Outbox(path, max_records=100).buried == 5, "the count survives a restart"


def test_the_wal_is_truncated_when_the_queue_drains(tmp_path: Path) -> None:
    """3 MB through the outbox: the WAL stays near its limit while queuing and is emptied on drain."""
    path = tmp_path / "outbox.sqlite"
    wal = Path(str(path) + "-wal")
    outbox = Outbox(path, max_records=100_000)
    largest = 0
    seqs = []
    for i in range(1500):
        seqs.append(outbox.put("t", json.dumps({"i": i, "pad": "x" * 2000}).encode()))
        largest = max(largest, wal.stat().st_size)
    assert largest <= 2 * WAL_LIMIT_BYTES, f"WAL reached {largest} bytes"
    for start in range(0, len(seqs), 16):
        outbox.remove([s for s in seqs[start : start + 16] if s is not None])
    assert len(outbox) == 0
    assert wal.stat().st_size == 0, "drained: the WAL is checkpointed and truncated"
    assert path.stat().st_size < 256 * 1024, "drained: the freed pages are given back"


def test_the_file_is_bounded_in_bytes(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, max_records=100_000, max_bytes=64 * 1024)
    for i in range(1000):
        outbox.put("t", json.dumps({"i": i, "pad": "x" * 1000}).encode())
    stats = outbox.stats()
    assert stats["bytes"] <= 64 * 1024 and stats["queued"] < 70
    assert outbox.dropped == 1000 - stats["queued"]
    assert [json.loads(r.payload)["i"] for r in outbox.peek(0, 1000)][-1] == 999, "the newest are kept"
    assert path.stat().st_size < 4 * 64 * 1024
    assert outbox.put("t", b"x" * (65 * 1024)) is None and outbox.stats()["errors"] == 1


def test_every_json_record_carries_a_stable_unique_key(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, max_records=100)
    outbox.put("t", b'{"v":1,"n":1}')
    outbox.put("t", b"{}")
    outbox.put("t", b"raw bytes")
    outbox.close()
    reopened = Outbox(path, max_records=100)
    reopened.put("t", b'{"v":1,"n":2}')
    records = reopened.peek(0, 10)
    keys = [json.loads(r.payload)["key"] for r in records if r.payload.startswith(b"{")]
    assert keys == [f"{reopened.id}-1", f"{reopened.id}-2", f"{reopened.id}-4"]
    assert records[2].payload == b"raw bytes", "a payload that is not a JSON object is left alone"
    assert json.loads(records[0].payload) == {"key": keys[0], "v": 1, "n": 1}
    assert Outbox(tmp_path / "other.sqlite", max_records=1).id != reopened.id


_VALUE = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(_VALUE, _VALUE, _VALUE, _VALUE), min_size=1, max_size=5))
def test_any_row_in_the_file_is_sent_or_buried_never_raised(tmp_path_factory, rows) -> None:
    """Rows are outside bytes (another tool, a damaged card): peek returns good ones and buries the rest."""
    path = tmp_path_factory.mktemp("rows") / "outbox.sqlite"
    Outbox(path, max_records=100).close()
    raw = sqlite3.connect(path, isolation_level=None)
    raw.executemany("INSERT INTO records (topic, payload, qos, retain) VALUES (?, ?, ?, ?)", rows)
    raw.close()
    outbox = Outbox(path, max_records=100)
    outbox.put("good", b'{"last":true}')
    got = outbox.peek(0, 100)
    assert got[-1].topic == "good" and len(got) + outbox.buried == len(rows) + 1
    assert all(isinstance(r.payload, bytes) and r.qos in (0, 1, 2) and r.topic for r in got)
    assert len(outbox) == len(got) and len(outbox.peek(0, 100)) == len(got)
    outbox.close()
