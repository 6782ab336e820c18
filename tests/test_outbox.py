"""The on-disk outbox: FIFO, bound with counted drops, survives a killed process, delivers in order."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_runtime.config.settings import MqttSettings
from edge_runtime.core.errors import UsageError
from edge_runtime.state.outbox import Outbox, OutboxError
from edge_runtime.transports.mqtt.link import MqttLink
from edge_runtime.transports.mqtt.sender import OutboxSender
from tests.broker import Broker, Probe, broker_fixture, eventually  # noqa: F401 (fixture)


def test_fifo_peek_and_remove(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite", max_records=10)
    seqs = [outbox.put("t", b"m%d" % i) for i in range(5)]
    assert seqs == sorted(seqs) and len(outbox) == 5
    assert [r.payload for r in outbox.peek(0, 3)] == [b"m0", b"m1", b"m2"]
    assert [r.payload for r in outbox.peek(seqs[2], 10)] == [b"m3", b"m4"]
    outbox.remove([seqs[0], seqs[1], 999])
    assert [r.payload for r in outbox.peek(0, 10)] == [b"m2", b"m3", b"m4"] and len(outbox) == 3


def test_bound_drops_oldest_and_counts_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    outbox = Outbox(path, max_records=4)
    for i in range(10):
        outbox.put("t", b"%d" % i)
    assert [r.payload for r in outbox.peek(0, 100)] == [b"6", b"7", b"8", b"9"]
    assert outbox.dropped == 6
    outbox.close()
    reopened = Outbox(path, max_records=4)
    assert reopened.dropped == 6 and len(reopened) == 4
    reopened.put("t", b"10")
    assert reopened.dropped == 7 and [r.payload for r in reopened.peek(0, 1)] == [b"7"]


ROOT = Path(__file__).resolve().parent.parent


def _strace() -> str:
    """The strace binary; skip without it, fail in CI (apt-get install strace)."""
    path = shutil.which("strace")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("strace is not installed; CI needs it to count the outbox's fsyncs")
        pytest.skip("strace is not installed")
    return path


def test_file_is_wal_with_full_sync(tmp_path: Path) -> None:
    """The settings in effect on the outbox's own connection (PRAGMA synchronous is per connection)."""
    outbox = Outbox(tmp_path / "o.sqlite", max_records=4)
    outbox.put("t", b"x")
    pragmas = outbox.pragmas()
    assert pragmas["journal_mode"] == "wal"
    assert pragmas["synchronous"] == 2, "synchronous=FULL is 2 (NORMAL is 1, OFF is 0)"
    db = sqlite3.connect(tmp_path / "o.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_every_put_is_synced_to_disk_before_it_returns(tmp_path: Path) -> None:
    """Count the kernel's fsync/fdatasync calls on the WAL file while a child process puts records.

    A SIGKILL cannot tell synchronous=FULL from OFF (the page cache survives the process); only the
    syncs can. FULL syncs the WAL on every commit; NORMAL only at checkpoints; OFF never.
    """
    path = tmp_path / "o.sqlite"
    script = textwrap.dedent(
        f"""
        from edge_runtime.state.outbox import Outbox
        box = Outbox({str(path)!r}, max_records=1000)
        print("opened", flush=True)
        for i in range(30):
            assert box.put("t", b"%d" % i) is not None
        """
    )
    trace = tmp_path / "trace.txt"
    result = subprocess.run(
        [_strace(), "-f", "-y", "-e", "trace=fsync,fdatasync", "-o", str(trace), sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    wal_syncs = [line for line in trace.read_text().splitlines() if re.search(r"sync\(\d+<[^>]*-wal>", line)]
    assert len(wal_syncs) >= 30, f"{len(wal_syncs)} syncs of the WAL for 30 puts"
    assert len(Outbox(path, max_records=1000)) == 30


def test_bad_bound_and_unusable_path(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="max_records"):
        Outbox(tmp_path / "o.sqlite", max_records=0)
    with pytest.raises(UsageError, match="max_bytes"):
        Outbox(tmp_path / "o.sqlite", max_records=4, max_bytes=10)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutboxError, match="cannot use outbox"):
        Outbox(tmp_path / "file" / "o.sqlite", max_records=4)


def test_records_survive_a_killed_process(tmp_path: Path) -> None:
    """Every put() that returned before SIGKILL is still in the file afterwards."""
    path = tmp_path / "o.sqlite"
    script = textwrap.dedent(
        f"""
        import sys
        from edge_runtime.state.outbox import Outbox
        box = Outbox({str(path)!r}, max_records=100000)
        for i in range(100000):
            seq = box.put("t", b"%d" % i)
            print(seq, flush=True)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acknowledged = [int(child.stdout.readline()) for _ in range(200)]  # type: ignore[union-attr]
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    stored = {record.seq for record in Outbox(path, max_records=100000).peek(0, 1_000_000)}
    assert set(acknowledged) <= stored


def test_sender_delivers_in_order_removes_acked_and_resends_after_restart(
    tmp_path: Path,
    broker: Broker,
) -> None:
    probe = Probe(broker)
    probe.subscribe("out/#")
    path = tmp_path / "o.sqlite"
    first = Outbox(path, max_records=1000)
    for i in range(50):
        first.put(f"out/{i % 3}", json.dumps({"i": i}).encode())
    first.close()  # "power cut" before anything was sent: the next process sends them
    outbox = Outbox(path, max_records=1000)
    link = MqttLink(MqttSettings(port=broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5), "outbox-test")
    sender = OutboxSender(outbox, link, window=8)
    link.add_connection_listener(lambda _up: sender.notify())
    link.start()
    sender.start()
    for i in range(50, 80):
        outbox.put(f"out/{i % 3}", json.dumps({"i": i}).encode())
        sender.notify()
    got = probe.wait_for(lambda items: len(items) >= 80)
    assert [json.loads(item.payload)["i"] for item in got] == list(range(80))
    eventually(lambda: len(outbox) == 0, what="acked records removed")
    sender.stop()
    link.stop()
    probe.close()
