"""The outbox sender outlives every error: bad rows, a topic paho refuses, SQLite failing under it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from edge_runtime.config.settings import MqttSettings
from edge_runtime.state.outbox import Outbox
from edge_runtime.transports.mqtt.link import MqttLink
from edge_runtime.transports.mqtt.sender import OutboxSender
from tests.broker import Broker, Probe, broker_fixture, eventually  # noqa: F401 (fixture)


def _numbers(probe: Probe) -> list[int]:
    return [json.loads(item.payload)["i"] for item in probe.received if item.topic.startswith("out/")]


def test_sender_survives_bad_rows_refused_topics_and_sqlite_errors(tmp_path: Path, broker: Broker) -> None:
    probe = Probe(broker)
    probe.subscribe("out/#")
    path = tmp_path / "o.sqlite"
    outbox = Outbox(path, max_records=1000)
    outbox.put("out/a", b'{"i":0}')
    outbox.put("out/+/wildcard", b'{"i":-1}')  # paho refuses to publish to a wildcard topic
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("INSERT INTO records (topic, payload, qos, retain) VALUES (?, ?, 1, 0)", (b"\xff", b"{}"))
    outbox.put("out/a", b'{"i":1}')
    link = MqttLink(MqttSettings(port=broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5), "sender-test")
    sender = OutboxSender(outbox, link, window=4, backoff_max_s=0.2)
    link.add_connection_listener(lambda _up: sender.notify())
    link.start()
    sender.start()
    try:
        probe.wait_for(lambda _items: _numbers(probe) == [0, 1])
        eventually(lambda: len(outbox) == 0, what="good records acked, bad ones buried")
        assert outbox.buried == 2
        assert sorted(reason.split(":")[0] for _, reason in outbox.dead_letters()) == [
            "cannot publish to 'out/+/wildcard'",
            "topic is not UTF-8",
        ]

        raw.execute("ALTER TABLE records RENAME TO hidden")  # every read and write of the outbox fails now
        assert outbox.put("out/a", b'{"i":2}') is None
        sender.notify()
        eventually(lambda: outbox.faults.count >= 3, what="the sender's failures counted")
        assert sender.alive and "no such table" in (outbox.faults.last or "")
        raw.execute("ALTER TABLE hidden RENAME TO records")
        for i in range(3, 6):
            outbox.put("out/a", json.dumps({"i": i}).encode())
            sender.notify()
        probe.wait_for(lambda _items: _numbers(probe) == [0, 1, 3, 4, 5])
        eventually(lambda: len(outbox) == 0, what="drained after the repair")
        assert sender.alive and outbox.stats()["errors"] >= 3
    finally:
        sender.stop()
        link.stop()
        probe.close()
        raw.close()
