"""Hostile MQTT requests against a real Mosquitto (issue 10, items 1 and 4): bad reply topics, bursts
that fill the work queue, oversized and byte-heavy messages. Each is answered, nothing kills the link,
and nothing is published where the caller should not reach."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.config.settings import MqttSettings, load_settings
from edge_runtime.daemon import Daemon
from edge_runtime.transports.mqtt.infer import MqttService
from edge_runtime.transports.mqtt.link import MqttLink
from edge_runtime.transports.mqtt.topics import DeviceTopics
from tests.broker import (  # noqa: F401 (fixture)
    Broker,
    GatedDataPlane,
    Probe,
    broker_fixture,
    eventually,
    install_models,
    mlp_dataplane,
    write_daemon_config,
)
from tests.mlp_models import INPUT_NAME

DEVICE = "gw-attack"
TOPICS = DeviceTopics(DEVICE)
DEFAULT = TOPICS.reply("mlp")


def _request(rows: int = 1, **extra: object) -> bytes:
    x = np.random.default_rng(rows).normal(size=(rows, 64)).astype(np.float32)
    tensor = {"name": INPUT_NAME, "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return json.dumps({"v": 1, "inputs": [tensor], **extra}).encode()


def _doc(item: object) -> dict:
    return json.loads(item.payload)  # type: ignore[attr-defined]


@pytest.fixture
def daemon(
    tmp_path: Path, broker: Broker, signing_keys, device_profile, mlp_bundle_factory
) -> Iterator[Daemon]:
    """The daemon in this process, serving 'mlp', limit 64 KiB per request."""
    install_models(tmp_path / "store", signing_keys.public_key, device_profile, [mlp_bundle_factory()])
    config = write_daemon_config(
        tmp_path / "edge.toml", device_id=DEVICE, store=tmp_path / "store",
        public_key=signing_keys.public_path, mqtt_port=broker.port, max_request_bytes=64 * 1024,
    )  # fmt: skip
    instance = Daemon(load_settings(config))
    instance.start()
    assert instance.link is not None and instance.link.wait_connected(10)
    yield instance
    instance.stop()


@dataclass
class Rig:
    """A real MqttLink + MqttService over a real DataPlane whose inference waits at a gate."""

    link: MqttLink
    service: MqttService
    dataplane: GatedDataPlane


@pytest.fixture
def rig(tmp_path: Path, broker: Broker, signing_keys, device_profile, mlp_bundle_factory) -> Iterator[Rig]:
    """One worker, a work queue of 4 messages or 1 MiB, requests up to 512 KiB."""
    inner = mlp_dataplane(
        tmp_path / "store", signing_keys, device_profile, mlp_bundle_factory(), max_request_bytes=512 * 1024
    )
    dataplane = GatedDataPlane(inner)
    settings = MqttSettings(
        port=broker.port, keepalive=5, workers=1, queue_size=4, queue_bytes=1 << 20,
        reconnect_min_s=0.1, reconnect_max_s=0.5,
    )  # fmt: skip
    link = MqttLink(settings, "attack-rig")
    service = MqttService(dataplane, link, TOPICS)  # type: ignore[arg-type]
    service.attach()
    link.start()
    assert link.wait_connected(10)
    yield Rig(link, service, dataplane)
    dataplane.gate.set()
    link.stop()


def _hold_the_worker(rig: Rig, probe: Probe) -> None:
    """Send one good request and wait until the only worker is stuck in it at the gate."""
    probe.publish(TOPICS.infer("mlp"), _request(), response_topic="held/reply", correlation_data=b"held")
    rig.dataplane.wait_held(1)


def test_wildcard_response_topic_burst_never_disables_mqtt(rig: Rig, broker: Broker) -> None:
    """Issue 10.1: the busy replies of a burst with Response Topic 'atk/+/x' killed paho's thread."""
    probe = Probe(broker)
    probe.subscribe(DEFAULT)
    probe.subscribe("held/reply")
    probe.subscribe("good/reply")
    _hold_the_worker(rig, probe)
    burst = 20
    for index in range(burst):
        probe.publish(
            TOPICS.infer("mlp"),
            _request(id=f"atk-{index}"),
            response_topic="atk/+/x",
            correlation_data=b"%d" % index,
        )
    shed = burst - 4  # the queue holds 4
    refused = probe.on(DEFAULT, count=shed)  # answered while the worker is still held
    assert rig.link.shed == shed and rig.link.queued == 4
    assert all(_doc(item)["status"] == 400 and "wildcard" in _doc(item)["error"] for item in refused)
    rig.dataplane.gate.set()
    answers = probe.on(DEFAULT, count=burst)
    by_correlation = {item.correlation_data: _doc(item) for item in answers}
    assert set(by_correlation) == {b"%d" % i for i in range(burst)}
    queued = [doc for doc in by_correlation.values() if doc["id"] is not None]
    assert len(queued) == 4 and all(doc["id"].startswith("atk-") and doc["status"] == 400 for doc in queued)
    assert rig.link.healthy() and rig.link.connection_epoch == 1
    assert rig.dataplane.metrics.snapshot()["shed"] == shed  # counted by the dataplane, like HTTP's
    probe.publish(TOPICS.infer("mlp"), _request(), response_topic="good/reply", correlation_data=b"ok")
    assert "outputs" in _doc(probe.on("good/reply")[0])
    broker.stop()  # and it still reconnects
    broker.start()
    eventually(lambda: rig.link.connection_epoch == 2, what="reconnect")
    probe.publish(TOPICS.infer("mlp"), _request(), response_topic="good/reply", correlation_data=b"ok2")
    assert "outputs" in _doc(probe.on("good/reply", count=2)[-1])
    probe.close()


def _status_states(probe: Probe) -> list[str]:
    return [_doc(item)["state"] for item in probe.received if item.topic == TOPICS.status]


BAD_REPLY_TOPICS = [
    ("$SYS/broker/hijack", "belong to the broker"),
    ("$share/x/y", "belong to the broker"),
    ("edge/other-device/infer/mlp", "reserved for devices"),
    (TOPICS.status, "reserved for devices"),
    (TOPICS.telemetry, "reserved for devices"),
    (TOPICS.events, "reserved for devices"),
    (TOPICS.infer("mlp"), "reserved for devices"),
    (f"{TOPICS.base}/inbox/", "reserved for devices"),
    ("atk/#", "wildcard"),
    ("a\u0001b", "control"),
]


@pytest.mark.parametrize("protocol", [5, 311])
def test_bad_reply_topics_are_answered_400_on_the_default_topic(
    daemon: Daemon, broker: Broker, protocol: int
) -> None:
    """Issue 10.1: `$SYS/...` got the daemon disconnected on every request; edge/... let callers spoof."""
    watcher = Probe(broker)
    watcher.subscribe("#")  # everything outside $: nothing may land on a refused topic
    client = Probe(broker, protocol=protocol)
    cases = [case for case in BAD_REPLY_TOPICS if protocol == 311 or "\u0001" not in case[0]]
    for index, (topic, _) in enumerate(cases):
        payload = _request(id=f"bad-{index}", **({"reply_to": topic} if protocol == 311 else {}))
        properties = {"response_topic": topic, "correlation_data": b"%d" % index} if protocol == 5 else {}
        client.publish(TOPICS.infer("mlp"), payload, **properties)  # type: ignore[arg-type]
    answers = watcher.on(DEFAULT, count=len(cases))
    by_id = {_doc(item)["id"]: _doc(item) for item in answers}
    for index, (_, fragment) in enumerate(cases):
        answer = by_id[f"bad-{index}"]
        assert answer["status"] == 400 and fragment in answer["error"], answer
    if protocol == 5:
        assert {item.correlation_data for item in answers} == {b"%d" % i for i in range(len(cases))}
    leaked = [item.topic for item in watcher.received if item.topic != DEFAULT and b'"bad-' in item.payload]
    assert leaked == [TOPICS.infer("mlp")] * len(cases)  # only the requests themselves
    assert _status_states(watcher) == ["online"]  # never disconnected: no last will published
    assert daemon.link is not None and daemon.link.connection_epoch == 1 and daemon.link.healthy()
    watcher.close()
    client.close()


def test_reply_to_of_the_wrong_type_keeps_the_id(daemon: Daemon, broker: Broker) -> None:
    probe = Probe(broker, protocol=311)
    probe.subscribe(DEFAULT)
    probe.publish(TOPICS.infer("mlp"), _request(id="typed", reply_to={"topic": "x"}))
    (answer,) = probe.on(DEFAULT)
    assert _doc(answer)["id"] == "typed" and _doc(answer)["status"] == 400
    assert "'reply_to' must be a string" in _doc(answer)["error"]
    probe.close()


def test_own_inbox_is_a_valid_reply_topic(daemon: Daemon, broker: Broker) -> None:
    """The one place in the edge/ tree a caller may ask for: edge/<device>/inbox/<client>/..."""
    inbox = TOPICS.inbox("client-7", "req")
    for protocol in (5, 311):
        probe = Probe(broker, protocol=protocol)
        probe.subscribe(TOPICS.inbox_filter("client-7"))
        extra = {"reply_to": inbox} if protocol == 311 else {}
        props = {"response_topic": inbox} if protocol == 5 else {}
        probe.publish(TOPICS.infer("mlp"), _request(id=f"in-{protocol}", **extra), **props)  # type: ignore[arg-type]
        (answer,) = probe.on(inbox)
        assert _doc(answer)["id"] == f"in-{protocol}" and "outputs" in _doc(answer)
        probe.close()


def test_request_over_the_size_limit_is_answered_413_without_being_queued(
    daemon: Daemon, broker: Broker
) -> None:
    """Issue 10.1: a message over max_request_bytes is refused on arrival, never held in the queue."""
    probe = Probe(broker)
    probe.subscribe("big/reply")
    big = _request(rows=200)  # about 230 KB of JSON, over the 64 KiB limit
    assert len(big) > 64 * 1024
    probe.publish(TOPICS.infer("mlp"), big, response_topic="big/reply", correlation_data=b"big")
    (answer,) = probe.on("big/reply")
    assert _doc(answer)["status"] == 413 and f"{len(big)} bytes" in _doc(answer)["error"]
    assert answer.correlation_data == b"big"
    assert daemon.link is not None and daemon.link.peak_queued_bytes == 0
    probe.close()


def test_work_queue_is_bounded_in_bytes(rig: Rig, broker: Broker) -> None:
    """Issue 10.1: 60 requests of 14 MB took RSS to 731 MB; the queue now holds at most 1 MiB here."""
    probe = Probe(broker)
    probe.subscribe("bytes/reply")
    probe.subscribe("held/reply")
    _hold_the_worker(rig, probe)
    payload = _request(rows=250, id="heavy")  # ~300 KB each: three fit in 1 MiB, a fourth does not
    fits = (1 << 20) // len(payload)
    assert fits == 3 and len(payload) < 512 * 1024
    for index in range(10):
        probe.publish(
            TOPICS.infer("mlp"), payload, response_topic="bytes/reply", correlation_data=b"%d" % index
        )
    busy = probe.on("bytes/reply", count=7)
    assert rig.link.queued == 3 and rig.link.queued_bytes == 3 * len(payload)
    assert all(_doc(item)["status"] == 503 and "busy" in _doc(item)["error"] for item in busy)
    rig.dataplane.gate.set()
    answers = probe.on("bytes/reply", count=10)
    assert sum(_doc(item).get("status") is None for item in answers) == 3  # the queued ones were served
    assert rig.link.peak_queued_bytes <= 1 << 20 and rig.link.queued_bytes == 0
    stats = rig.service.stats()
    assert stats["shed"] == 7 and "requests" not in stats and "errors" not in stats
    assert rig.dataplane.metrics.snapshot()["shed"] == 7
    probe.close()


@pytest.mark.parametrize("json_library", ["orjson", "json"])
def test_a_request_nested_too_deep_is_answered_400(
    daemon: Daemon,
    broker: Broker,
    json_library: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 10.4, MQTT side: without orjson (a plain device install) this was a 503 with a traceback."""
    if json_library == "json":
        monkeypatch.setattr("edge_runtime.codecs.v2.orjson", None)
    probe = Probe(broker)
    probe.subscribe("deep/reply")
    depth = 30_000  # (60 KB: under the 64 KiB limit; far beyond any parser's nesting limit)
    payload = b'{"id": "deep", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": '
    payload += b"[" * depth + b"]" * depth + b"}]}"
    with caplog.at_level(logging.ERROR):
        probe.publish(TOPICS.infer("mlp"), payload, response_topic="deep/reply", correlation_data=b"d")
        (answer,) = probe.on("deep/reply")
    assert _doc(answer)["status"] == 400, _doc(answer)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # a client error, not a bug
    probe.publish(TOPICS.infer("mlp"), _request(), response_topic="deep/reply", correlation_data=b"ok")
    assert "outputs" in _doc(probe.on("deep/reply", count=2)[-1])
    probe.close()
