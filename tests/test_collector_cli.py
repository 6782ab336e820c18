"""`edgectl telemetry collect` and `summary` as an operator runs them (issue 12, item 2): a collector
process killed with SIGKILL mid-stream loses nothing (acks follow the commit; the persistent session
re-delivers), SIGTERM stores what it has and exits 0 with its counts; the summary of known data
prints the right numbers, and `--plot` writes a PNG."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from edge_runtime.cli import cli
from edge_runtime.codecs.payloads import encode_telemetry
from edge_runtime.fleet.db import open_db
from edge_runtime.fleet.records import decode
from tests.broker import Broker, broker_fixture, eventually  # noqa: F401 (fixture)
from tests.fleet_sim import SimDevice, outbox_keys

ROOT = Path(__file__).resolve().parent.parent


def _collect(broker: Broker, db: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.cli", "telemetry", "collect", "--broker", broker.address,
             "--db", str(db), "--client-id", "collector-cli", "--batch", "20", "--stats-every", "0"],
            env=env, stdout=subprocess.PIPE, stderr=stderr,
        )  # fmt: skip


def _stored(db: Path) -> int:
    if not db.exists():
        return 0
    store = open_db(str(db))
    try:
        return store.count("telemetry")
    finally:
        store.close()


def test_a_collector_killed_mid_stream_loses_nothing_and_sigterm_exits_0_with_counts(
    tmp_path: Path, broker: Broker
) -> None:
    db, log = tmp_path / "fleet.sqlite", tmp_path / "collect.log"
    first = _collect(broker, db, log)
    devices = [SimDevice(f"gw{index}", broker.port, tmp_path) for index in range(2)]
    second = None
    killed = threading.Event()
    produced_after_kill = [0]

    def feed() -> None:
        # The stream goes on until the collector is dead and 50 more records each were queued behind it,
        # so the kill lands mid-stream whatever the machine's speed.
        while not killed.is_set() or produced_after_kill[0] < 50:
            for device in devices:
                device.tick(1)
            if killed.is_set():
                produced_after_kill[0] += 1
            time.sleep(0.002)

    feeder = threading.Thread(target=feed, name="feeder")
    try:
        # Subscribed, not just started: records published before that are no subscriber's.
        eventually(lambda: "subscribed; storing" in log.read_text(), what="the collector subscribed")
        for device in devices:
            device.start()
            device.tick(5)
        eventually(lambda: _stored(db) >= 10, what="the collector storing")
        feeder.start()
        eventually(lambda: _stored(db) >= 40, timeout=60, what="more records stored")
        first.send_signal(signal.SIGKILL)  # mid-stream: some received, not yet committed or acked
        first.wait(10)
        killed.set()
        left = _stored(db)
        feeder.join(60)
        second = _collect(broker, db, log)
        eventually(lambda: all(device.drained() for device in devices), timeout=60, what="outboxes drained")
        expected = {(device.device_id, key) for device in devices for key in outbox_keys(device)}
        eventually(
            lambda: _stored(db) >= len(expected), timeout=60, what="every record stored after the restart"
        )
        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=30)
    finally:
        killed.set()
        produced_after_kill[0] = 50
        if feeder.is_alive():
            feeder.join(10)
        for device in devices:
            device.stop()
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
    assert len(expected) - left >= 100, "records were queued behind the dead collector"
    assert second.returncode == 0, log.read_text()[-2000:]
    assert b"collector stopped: received" in out and b"bad 0" in out
    store = open_db(str(db))
    db_rows = store._db.execute("SELECT device, key FROM records WHERE kind = 'telemetry'").fetchall()
    store.close()
    assert len(db_rows) == len(expected) and set(db_rows) == expected


def _telemetry(
    device: str, n: int, ts: float, started: float, requests: int, errors: int, p50: float, p95: float
) -> bytes:
    model = {"version": "2", "state": "serving", "requests": requests, "errors": errors,
             "latency_ms": {"p50": p50, "p95": p95, "p99": p95 * 2}}  # fmt: skip
    doc = {"device": device, "n": n, "started": started, "ts": ts, "key": f"{device}-{n}",
           "health": "running", "models": {"digits": model}}  # fmt: skip
    return encode_telemetry(doc)


def _known_store(path: Path) -> None:
    """gw1: 6 records a minute apart, 10 requests and 1 error more each time, its daemon up for 2 h;
    gw2: one record from a daemon started 40 s ago (inside the window: its 7 requests count)."""
    store = open_db(str(path))
    now = time.time()
    records = [decode("edge/gw1/telemetry", _telemetry("gw1", n, now - 60 * (6 - n), now - 7200, 100 + 10 * n, n,
                                                      0.5 + n / 10, 2.0 + n)) for n in range(1, 7)]  # fmt: skip
    records.append(decode("edge/gw2/telemetry", _telemetry("gw2", 1, now - 30, now - 40, 7, 0, 9.0, 11.0)))
    records.append(
        decode("edge/gw2/status", b'{"v":1,"device":"gw2","state":"offline","ts":%f}' % (now - 10))
    )
    assert store.add(records) == len(records)
    store.close()


def test_summary_prints_requests_errors_latency_version_and_presence_from_known_data(tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    _known_store(db)
    result = CliRunner().invoke(cli, ["telemetry", "summary", "--db", str(db), "--since", "1h"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    gw1 = next(line.split() for line in lines if line.startswith("gw1 "))
    gw2 = next(line.split() for line in lines if line.startswith("gw2 "))
    # gw1's run started before the window: five increases of 10 requests and 1 error are counted.
    assert gw1[:8] == ["gw1", "digits", "2", "50", "5", "0.850", "8.000", "16.000"]
    assert gw1[8:10] == ["running", "-"]
    assert gw2[:10] == ["gw2", "digits", "2", "7", "0", "9.000", "11.000", "22.000", "running", "offline"]
    assert "gw1 / digits: every 600 s" in result.output

    only = CliRunner().invoke(
        cli, ["telemetry", "summary", "--db", str(db), "--device", "gw2", "--every", "5m"]
    )
    assert only.exit_code == 0 and "gw1" not in only.output and "gw2 / digits: every 300 s" in only.output

    recent = CliRunner().invoke(cli, ["telemetry", "summary", "--db", str(db), "--since", "20s"])
    assert recent.exit_code == 0, recent.output
    gw1 = next(line.split() for line in recent.output.splitlines() if line.startswith("gw1 "))
    assert gw1[:5] == ["gw1", "digits", "2", "0", "0"]  # one sample in the window: no increase seen
    gw2 = next(line.split() for line in recent.output.splitlines() if line.startswith("gw2 "))
    assert gw2[:10] == ["gw2", "-", "-", "0", "0", "-", "-", "-", "running", "offline"]  # seen, no samples

    bad = CliRunner().invoke(cli, ["telemetry", "summary", "--db", str(db), "--since", "soon"])
    assert bad.exit_code != 0 and "--since 'soon' must be a duration" in bad.output
    missing = CliRunner().invoke(cli, ["telemetry", "summary", "--db", str(tmp_path / "none.sqlite")])
    assert missing.exit_code != 0 and "no such store" in missing.output


def test_summary_plot_writes_a_png_of_latency_and_request_rate(tmp_path: Path) -> None:
    db, png = tmp_path / "fleet.sqlite", tmp_path / "fleet.png"
    _known_store(db)
    result = CliRunner().invoke(cli, ["telemetry", "summary", "--db", str(db), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.size == (1000, 700)
        assert len(image.convert("RGB").getcolors(1 << 20) or []) > 10  # lines drawn, not a blank canvas
