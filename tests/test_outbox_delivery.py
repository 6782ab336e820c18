"""Delivery semantics measured: a real daemon killed with SIGKILL in the middle of flushing its outbox
to a real Mosquitto, then restarted. Every record arrives at least once; a record that arrives twice
carries the same key and the same bytes, so a consumer drops duplicates by ``key``."""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from edge_runtime.state.outbox import Outbox
from tests.broker import Broker, Probe, broker_fixture, eventually, install_models, write_daemon_config  # noqa: F401 (fixture)

DEVICE = "gw-flush"
ROOT = Path(__file__).resolve().parent.parent
RECORDS = 5000


def _queued(path: Path) -> int:
    """Records still in the outbox file (read-only: the daemon may be writing it)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])
    finally:
        db.close()


def _serve(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    with log.open("ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config)],
            env=env,
            stderr=stderr,
        )


def test_kill_9_mid_flush_then_restart_delivers_every_record_at_least_once_with_stable_keys(
    tmp_path: Path, broker: Broker, signing_keys, device_profile, mlp_bundle_factory
) -> None:
    install_models(
        tmp_path / "store", signing_keys.public_key, device_profile, [mlp_bundle_factory("mlp", "1")]
    )
    config = write_daemon_config(tmp_path / "edge.toml", device_id=DEVICE, store=tmp_path / "store",
                                 public_key=signing_keys.public_path, mqtt_port=broker.port,
                                 outbox_max=100_000)  # fmt: skip
    outbox_path = tmp_path / f"{DEVICE}-outbox.sqlite"
    backlog = Outbox(outbox_path, max_records=100_000)  # an outage's worth of records, waiting
    seqs = [backlog.put(f"flush/{i % 4}", json.dumps({"i": i}).encode()) for i in range(RECORDS)]
    expected = {f"{backlog.id}-{seq}" for seq in seqs}
    backlog.close()
    assert len(expected) == RECORDS

    probe = Probe(broker)
    probe.subscribe("flush/#", qos=1)
    log = tmp_path / "daemon.log"
    first = _serve(config, log)
    try:
        probe.wait_for(lambda items: len(items) >= 500, timeout=60)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        remaining = _queued(outbox_path)
        assert 0 < remaining < RECORDS, f"not killed mid-flush: {remaining} records left"

        second = _serve(config, log)
        try:
            probe.wait_for(lambda items: len(items) >= RECORDS, timeout=60)

            def keys() -> collections.Counter[str]:
                return collections.Counter(json.loads(item.payload)["key"] for item in list(probe.received))

            eventually(lambda: set(keys()) >= expected, timeout=60, what="every record delivered")
            eventually(lambda: _queued(outbox_path) == 0, what="outbox drained")
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(20) == 0
    finally:
        if first.poll() is None:
            first.kill()
        probe.close()

    seen = keys()
    assert set(seen) == expected, "only the outbox's records, each under its key"
    by_key: dict[str, set[bytes]] = collections.defaultdict(set)
    for item in probe.received:
        by_key[json.loads(item.payload)["key"]].add(item.payload)
    assert all(len(copies) == 1 for copies in by_key.values()), "a duplicate carries the same bytes"
    duplicates = sum(count - 1 for count in seen.values())
    assert duplicates <= remaining, "only records still in the file at the kill can come twice"
    print(f"\nkill -9 mid-flush: {RECORDS} records, {remaining} left in the file at the kill, "
          f"{duplicates} delivered twice")  # fmt: skip
    assert "Traceback" not in log.read_text()
