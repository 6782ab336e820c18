"""Telemetry through a broker outage: queued on disk, delivered once and in order after the restart;
beyond the outbox bound the oldest are dropped, counted and reported."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.config.settings import load_settings
from edge_runtime.daemon import Daemon
from edge_runtime.telemetry.health import Health, assess_health
from edge_runtime.telemetry.sampler import DeviceSampler
from edge_runtime.transports.mqtt.topics import DeviceTopics
from tests.broker import Broker, Probe, eventually, install_models, write_daemon_config

DEVICE = "gw-outage"
TOPICS = DeviceTopics(DEVICE)


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker that keeps the watcher's session (and its queued messages) across a restart."""
    (tmp_path / "broker").mkdir()
    instance = Broker(tmp_path / "broker", persistence=True)
    instance.start()
    yield instance
    instance.stop()


def _start_daemon(tmp_path: Path, broker: Broker, keys, profile, factory, *, outbox_max: int) -> Daemon:
    install_models(tmp_path / "store", keys.public_key, profile, [factory("mlp", "1")])
    config = write_daemon_config(
        tmp_path / "edge.toml",
        device_id=DEVICE,
        store=tmp_path / "store",
        public_key=keys.public_path,
        mqtt_port=broker.port,
        telemetry_s=0.05,
        outbox_max=outbox_max,
    )
    daemon = Daemon(load_settings(config))
    daemon.start()
    return daemon


def _watcher(broker: Broker) -> Probe:
    probe = Probe(broker, client_id="telemetry-watcher", clean=False)
    probe.subscribe(TOPICS.telemetry, qos=1)
    probe.subscribe(TOPICS.events, qos=1)
    return probe


def _numbers(probe: Probe) -> list[int]:
    return [json.loads(item.payload)["n"] for item in probe.received if item.topic == TOPICS.telemetry]


def _delivered(probe: Probe) -> list[int]:
    """Record numbers in arrival order, each once: delivery is at-least-once, so a re-delivered
    record may arrive twice, but then with the same key and the same bytes."""
    first: dict[str, bytes] = {}
    numbers = []
    for item in probe.received:
        if item.topic != TOPICS.telemetry:
            continue
        key = json.loads(item.payload)["key"]
        if key in first:
            assert first[key] == item.payload, f"record {key} re-delivered with other bytes"
            continue
        first[key] = item.payload
        numbers.append(json.loads(item.payload)["n"])
    return numbers


def _outage(daemon: Daemon, broker: Broker, queued: int) -> None:
    """Stop the broker until `queued` records wait in the outbox, then start it again."""
    broker.stop()
    assert daemon.outbox is not None
    eventually(lambda: daemon.telemetry is not None and daemon.telemetry.count > queued + 10, what="records")
    broker.start()


def test_every_record_arrives_in_order_after_an_outage(
    tmp_path: Path, persistent_broker: Broker, signing_keys, device_profile, mlp_bundle_factory
) -> None:
    watcher = _watcher(persistent_broker)
    daemon = _start_daemon(
        tmp_path, persistent_broker, signing_keys, device_profile, mlp_bundle_factory, outbox_max=100_000
    )
    try:
        watcher.wait_for(lambda _items: len(_numbers(watcher)) >= 5)
        _outage(daemon, persistent_broker, queued=20)
        assert daemon.telemetry is not None and daemon.outbox is not None
        target = daemon.telemetry.count + 5
        watcher.wait_for(lambda _items: len(_delivered(watcher)) >= target, timeout=30)
        daemon.telemetry.stop()
        last = daemon.telemetry.count
        watcher.wait_for(lambda _items: len(_delivered(watcher)) >= last)
        eventually(lambda: len(daemon.outbox) == 0, what="outbox drained")  # type: ignore[arg-type]
        assert _delivered(watcher) == list(range(1, last + 1))
        by_key: dict[str, bytes] = {}  # at-least-once: a re-delivery repeats a key with the same bytes
        for item in watcher.received:
            key = json.loads(item.payload)["key"]
            assert by_key.setdefault(key, item.payload) == item.payload, f"two records share key {key}"
        assert all(key.startswith(daemon.outbox.id + "-") for key in by_key)
        assert daemon.outbox.dropped == 0
        record = json.loads(
            next(i.payload for i in reversed(watcher.received) if i.topic == TOPICS.telemetry)
        )
        assert record["v"] == 1 and record["health"] in {h.value for h in Health}
        assert record["models"]["mlp"]["version"] == "1" and record["models"]["mlp"]["state"] == "serving"
        assert record["system"]["rss_bytes"] > 0
        assert record["outbox"]["errors"] == 0 and record["outbox"]["last_error"] is None
        assert record["outbox"]["durable"] is True and record["faults"] == []
    finally:
        daemon.stop()
        watcher.close()


def test_bound_drops_oldest_counts_and_reports(
    tmp_path: Path, persistent_broker: Broker, signing_keys, device_profile, mlp_bundle_factory
) -> None:
    watcher = _watcher(persistent_broker)
    daemon = _start_daemon(
        tmp_path, persistent_broker, signing_keys, device_profile, mlp_bundle_factory, outbox_max=6
    )
    try:
        watcher.wait_for(lambda _items: len(_numbers(watcher)) >= 3)
        _outage(daemon, persistent_broker, queued=20)
        assert daemon.outbox is not None and daemon.telemetry is not None
        watcher.wait_for(
            lambda items: any(
                json.loads(i.payload)["kind"] == "telemetry_dropped"
                for i in items
                if i.topic == TOPICS.events
            )
        )
        daemon.telemetry.stop()
        last = daemon.telemetry.count
        watcher.wait_for(lambda _items: _numbers(watcher)[-1:] == [last])
        numbers = _delivered(watcher)
        assert numbers == sorted(numbers), "out of order"
        missing = set(range(1, last + 1)) - set(numbers)
        assert missing, "the bound of 6 records was exceeded, so records must have been dropped"
        assert daemon.outbox.dropped >= len(missing)
        events = [json.loads(i.payload) for i in watcher.received if i.topic == TOPICS.events]
        assert all(event["v"] == 1 and event["max_records"] == 6 for event in events)
        assert max(event["dropped_total"] for event in events) >= 1
        latest = json.loads(
            next(i.payload for i in reversed(watcher.received) if i.topic == TOPICS.telemetry)
        )
        assert latest["outbox"]["dropped_total"] >= 1
    finally:
        daemon.stop()
        watcher.close()


def test_health_states_are_data() -> None:
    assert assess_health(ready=True, serving=2, refused=0, broker_up=True, stopping=False) is Health.RUNNING
    degraded = assess_health(ready=True, serving=1, refused=1, broker_up=True, stopping=False)
    assert degraded.is_serving and not degraded.is_healthy
    errored = assess_health(ready=True, serving=0, refused=1, broker_up=True, stopping=False)
    assert not errored.is_serving and not errored.is_healthy
    assert (
        assess_health(ready=False, serving=0, refused=0, broker_up=False, stopping=False) is Health.STARTING
    )
    faulty = assess_health(
        ready=True, serving=2, refused=0, broker_up=True, stopping=False, faults=("http not answering",)
    )
    assert faulty is Health.DEGRADED and faulty.is_serving and not faulty.is_healthy


def test_device_sampler_reads_proc() -> None:
    sample = DeviceSampler().sample()
    assert sample["rss_bytes"] > 1_000_000
    assert sample["uptime_s"] > 0 and len(sample["load"]) == 3
    assert sample["temperature_c"] is None or all(
        isinstance(v, float) for v in sample["temperature_c"].values()
    )
