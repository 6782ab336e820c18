"""The telemetry collector against a real Mosquitto, with SQLite and with a real PostgreSQL (issue 12,
items 2 and 5): simulated devices publish through the daemon's own link, outbox and telemetry loop;
every record is stored once across a broker restart and re-deliveries, two collectors on a shared
subscription split the records and store each once, a collector that was away gets what was
published meanwhile, and hostile payloads are counted, not stored, the collector still working."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.client.broker import Broker
from edge_runtime.codecs.payloads import encode_telemetry
from edge_runtime.config.settings import MqttProtocol
from edge_runtime.fleet.collector import Collector
from edge_runtime.fleet.db import Store, open_db
from edge_runtime.fleet.records import MAX_MODELS, MAX_PAYLOAD_BYTES
from tests.broker import Broker as Mosquitto
from tests.broker import Probe, eventually
from tests.fleet_sim import SimDevice, outbox_keys
from tests.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)

DEVICES = 3


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store URL: an SQLite file, or a database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'fleet.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """Mosquitto with persistence on (a restart keeps sessions and queued messages, as in production)."""
    (tmp_path / "broker").mkdir()
    broker = Mosquitto(tmp_path / "broker", persistence=True)
    broker.start()
    yield broker
    broker.stop()


def _collector(mosquitto: Mosquitto, store: Store, client_id: str, **options: object) -> Collector:
    collector = Collector(Broker("127.0.0.1", mosquitto.port), store, client_id=client_id, **options)  # type: ignore[arg-type]
    collector.start()
    assert collector.wait_connected(10), "collector could not connect"
    return collector


def _devices(mosquitto: Mosquitto, directory: Path, count: int = DEVICES) -> list[SimDevice]:
    devices = [SimDevice(f"gw{index}", mosquitto.port, directory) for index in range(count)]
    for index, device in enumerate(devices):
        device.start()
        device.serve(10 * (index + 1), 0.002 * (index + 1))
    return devices


def _outbox_records(store_url: str) -> list[tuple[str, str, str]]:
    """Every stored (device, key, kind) of telemetry and events, read from the table itself."""
    store = open_db(store_url)
    try:
        db = store._db
        rows = db.execute(
            "SELECT device, key, kind FROM records WHERE kind IN ('telemetry', 'event')"
        ).fetchall()
        return [(str(device), str(key), str(kind)) for device, key, kind in rows]
    finally:
        store.close()


def _expected(devices: list[SimDevice]) -> set[tuple[str, str]]:
    return {(device.device_id, key) for device in devices for key in outbox_keys(device)}


def test_records_from_several_devices_across_a_broker_restart_are_stored_once(
    tmp_path: Path, mosquitto: Mosquitto, db_url: str
) -> None:
    store = open_db(db_url)
    collector = _collector(mosquitto, store, "collector-restart")
    devices = _devices(mosquitto, tmp_path)
    try:
        for device in devices:
            device.tick(20)
        mosquitto.stop()  # records queued now wait in the outboxes
        for device in devices:
            device.tick(10)
            device.event("bundle signature does not verify")
        mosquitto.start()
        for device in devices:
            device.tick(10)
        eventually(lambda: all(device.drained() for device in devices), timeout=60, what="outboxes drained")
        eventually(lambda: store.count() >= DEVICES * 41, timeout=60, what="every record stored")

        # A re-delivery (what a device restart after a lost PUBACK does): the same bytes again.
        probe = Probe(mosquitto)
        probe.subscribe("edge/gw0/telemetry")
        for device in devices:
            device.tick(1)
        again = probe.on("edge/gw0/telemetry", 1)[0].payload
        probe.publish("edge/gw0/telemetry", again)
        probe.publish("edge/gw0/telemetry", again)
        probe.close()
        eventually(lambda: all(device.drained() for device in devices), timeout=60, what="outboxes drained")
        eventually(lambda: collector.stats.duplicates >= 2, what="the re-delivery counted as duplicates")
        assert collector.flush(15)
    finally:
        for device in devices:
            device.stop()
        stats = collector.stop()
    expected = _expected(devices)
    assert len(expected) == DEVICES * 42  # 41 telemetry records and one event each
    rows = _outbox_records(db_url)
    assert len(rows) == len(expected) and {(device, key) for device, key, _ in rows} == expected
    assert sum(kind == "event" for *_, kind in rows) == DEVICES
    assert (
        store.count("status") >= 2 * DEVICES
    )  # online at each connect (twice: the restart), offline at stop
    assert stats.bad == 0 and stats.store_errors == 0
    assert stats.stored == store.count() and stats.duplicates >= 2
    store.close()


def test_two_collectors_on_a_shared_subscription_store_each_record_once(
    tmp_path: Path, mosquitto: Mosquitto, db_url: str
) -> None:
    stores = [open_db(db_url), open_db(db_url)]  # one connection each, one database
    collectors = [
        _collector(mosquitto, store, f"collector-{n}", share="fleet") for n, store in enumerate(stores)
    ]
    assert collectors[0].filters[0] == "$share/fleet/edge/+/telemetry"
    devices = _devices(mosquitto, tmp_path)
    try:
        for device in devices:
            device.tick(40)
        eventually(lambda: all(device.drained() for device in devices), timeout=60, what="outboxes drained")
        eventually(
            lambda: stores[0].count("telemetry") >= DEVICES * 40, timeout=60, what="every record stored"
        )
        assert all(collector.flush(15) for collector in collectors)
    finally:
        for device in devices:
            device.stop()
        stats = [collector.stop() for collector in collectors]
    rows = _outbox_records(db_url)
    assert len(rows) == DEVICES * 40 and {(device, key) for device, key, _ in rows} == _expected(devices)
    assert all(s.stored > 0 for s in stats), [s.line() for s in stats]  # both got a share
    assert sum(s.stored for s in stats) == stores[0].count()  # each record stored by exactly one
    assert sum(s.duplicates for s in stats) == 0  # a shared subscription delivers each message once
    for store in stores:
        store.close()


def test_a_collector_away_while_devices_publish_gets_the_records_when_it_returns(
    tmp_path: Path, mosquitto: Mosquitto, db_url: str
) -> None:
    store = open_db(db_url)
    first = _collector(mosquitto, store, "collector-away")
    first.stop()  # a persistent session: the broker keeps the subscriptions and queues for us
    devices = _devices(mosquitto, tmp_path)
    try:
        for device in devices:
            device.tick(30)
        eventually(lambda: all(device.drained() for device in devices), timeout=60, what="outboxes drained")
        assert store.count() == 0
        back = _collector(mosquitto, store, "collector-away")
        eventually(lambda: store.count("telemetry") >= DEVICES * 30, timeout=60, what="the backlog stored")
        assert back.flush(15)
    finally:
        for device in devices:
            device.stop()
    stats = back.stop()
    rows = _outbox_records(db_url)
    assert len(rows) == DEVICES * 30 and {(device, key) for device, key, _ in rows} == _expected(devices)
    assert stats.stored == store.count() and stats.bad == 0
    store.close()


def _hostile() -> list[tuple[str, bytes]]:
    """Messages on fleet topics that are not records, each for its own reason."""
    good = json.loads(encode_telemetry({"device": "gw0", "ts": 1.7e9, "key": "k-1", "models": {}}))
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        ("edge/gw0/telemetry", b"\xff\xfe not json"),
        ("edge/gw0/telemetry", b"[1, 2, 3]"),
        ("edge/gw0/telemetry", json.dumps({**good, "v": 2}).encode()),
        ("edge/gw0/telemetry", json.dumps({**good, "device": "gw9"}).encode()),  # spoofs another device
        ("edge/gw0/telemetry", json.dumps({k: v for k, v in good.items() if k != "key"}).encode()),
        ("edge/gw0/telemetry", json.dumps({**good, "ts": "yesterday"}).encode()),
        ("edge/gw0/telemetry", json.dumps(good).replace("1700000000.0", "NaN").encode()),
        (
            "edge/gw0/telemetry",
            json.dumps({**good, "models": {f"m{i}": {} for i in range(MAX_MODELS + 1)}}).encode(),
        ),
        ("edge/gw0/telemetry", json.dumps({**good, "models": {"m": {"requests": -5}}}).encode()),
        ("edge/gw0/telemetry", deep),
        ("edge/gw0/telemetry", json.dumps({**good, "pad": "x" * MAX_PAYLOAD_BYTES}).encode()),
        ("edge/gw0/events", json.dumps({"v": 1, "ts": 1.7e9, "key": "e-1", "kind": "\x00"}).encode()),
        ("edge/gw0/status", json.dumps({"v": 1, "ts": 1.7e9}).encode()),
        (
            "edge/gw0/update/state/m",
            json.dumps({"v": 1, "ts": 1.7e9, "model": "other", "state": "x"}).encode(),
        ),
    ]


def test_hostile_payloads_are_counted_not_stored_and_the_collector_keeps_working(
    tmp_path: Path, mosquitto: Mosquitto, db_url: str
) -> None:
    store = open_db(db_url)
    collector = _collector(mosquitto, store, "collector-hostile")
    probe = Probe(mosquitto)
    hostile = _hostile()
    try:
        for topic, payload in hostile:
            probe.publish(topic, payload)
        eventually(lambda: collector.stats.bad >= len(hostile), what="every hostile message counted")
        valid = encode_telemetry({"device": "gw0", "ts": 1.7e9, "key": "k-2", "models": {}})
        probe.publish("edge/gw0/telemetry", valid)
        eventually(lambda: store.count() == 1, what="the valid record stored after the hostile ones")
        assert collector.link.connected
    finally:
        probe.close()
        stats = collector.stop()
    assert stats.bad == len(hostile) and stats.stored == 1
    assert "too_large" in stats.bad_reasons  # the oversized one was refused unread
    assert _outbox_records(db_url) == [("gw0", "k-2", "telemetry")]
    store.close()


def test_mqtt_311_collectors_share_on_mosquitto_and_a_returning_one_gets_its_queued_share(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The 3.1.1 fallback: a persistent session (clean_session false) and Mosquitto's ``$share`` for
    3.1.1 clients. Mosquitto keeps dealing records to a member that is away (its session queues
    them), so the member must come back under the same client id to store its share."""
    url = f"sqlite://{tmp_path / 'fleet.sqlite'}"
    broker = Broker("127.0.0.1", mosquitto.port, protocol=MqttProtocol.V311)
    stores = [open_db(url), open_db(url)]
    collectors = []
    for index, store in enumerate(stores):
        collector = Collector(broker, store, client_id=f"collector-311-{index}", share="fleet")
        collector.start()
        assert collector.wait_connected(10) and collector.link.protocol is MqttProtocol.V311
        collectors.append(collector)
    collectors[1].stop()  # away, its session kept
    devices = _devices(mosquitto, tmp_path, count=2)
    try:
        for device in devices:
            device.tick(20)
        eventually(lambda: all(device.drained() for device in devices), timeout=60, what="outboxes drained")
        collectors[1] = Collector(broker, stores[1], client_id="collector-311-1", share="fleet")
        collectors[1].start()
        eventually(lambda: stores[0].count("telemetry") >= 40, timeout=60, what="both shares stored")
        assert all(collector.flush(15) for collector in collectors)
    finally:
        for device in devices:
            device.stop()
        stats = [collector.stop() for collector in collectors]
    rows = _outbox_records(url)
    assert len(rows) == 40 and {(device, key) for device, key, _ in rows} == _expected(devices)
    assert all(s.stored > 0 for s in stats), [s.line() for s in stats]
    for store in stores:
        store.close()


class _SlowStore:
    """A real store whose writes take a while (a database falling behind), so the link's queue fills."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, records: list) -> int:
        import time

        time.sleep(0.05)
        return self.store.add(records)

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


def test_messages_refused_while_busy_are_got_again_and_stored(tmp_path: Path, mosquitto: Mosquitto) -> None:
    # A broker may send more than the Receive Maximum; what the link cannot queue is refused "busy"
    # and left unacknowledged, and MQTT re-sends it only on a new connection: the collector
    # reconnects once its backlog is stored. (Before: those records were lost and, with enough of
    # them, the broker's in-flight window filled and the collector stalled for good.)
    store = open_db(str(tmp_path / "fleet.sqlite"))
    first = _collector(mosquitto, store, "collector-busy")
    first.stop()
    devices = _devices(mosquitto, tmp_path)
    try:
        for device in devices:
            device.tick(30)
        eventually(lambda: all(device.drained() for device in devices), timeout=60, what="outboxes drained")
        back = _collector(mosquitto, _SlowStore(store), "collector-busy", queue_messages=2, batch=4)  # type: ignore[arg-type]
        eventually(lambda: store.count("telemetry") >= DEVICES * 30, timeout=120, what="every record stored")
        assert back.flush(15)
    finally:
        for device in devices:
            device.stop()
    stats = back.stop()
    assert stats.refused_busy > 0 and stats.reconnects >= 1, stats.line()
    assert {(device, key) for device, key, _ in _outbox_records(str(tmp_path / "fleet.sqlite"))} == _expected(
        devices
    )
    assert stats.bad == 0
    store.close()
