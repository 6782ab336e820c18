"""MQTT inference against a real Mosquitto: request/response (MQTT 5 and 3.1.1), stream bindings,
bad input, presence with a last will, and a slow model that must not stall keep-alive."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.config.profiles import load_profile
from edge_runtime.config.settings import MqttProtocol, MqttSettings, load_settings
from edge_runtime.core.types import InferRequest, InferResponse
from edge_runtime.daemon import Daemon
from edge_runtime.serving.dataplane import DataPlane
from edge_runtime.serving.registry import ModelRegistry
from edge_runtime.state.store import ModelStore
from edge_runtime.transports.mqtt.infer import MqttService
from edge_runtime.transports.mqtt.link import MqttLink
from edge_runtime.transports.mqtt.topics import DeviceTopics
from tests.broker import (  # noqa: F401 (fixture)
    Broker,
    Probe,
    broker_fixture,
    eventually,
    install_models,
    require_binary,
    write_daemon_config,
)
from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, make_weights, reference_forward
from tests.tcp_proxy import TcpProxy

DEVICE = "gw-test"
TOPICS = DeviceTopics(DEVICE)
STREAMS = f"""
[[streams]]
topic = "sensors/{{device}}/json"
model = "mlp"
decode = "json"
shape = [1, 64]
output_topic = "predictions/{{device}}/json"

[[streams]]
topic = "sensors/{{device}}/raw"
model = "mlp"
decode = "raw"
input = "{INPUT_NAME}"
dtype = "float32"
shape = [-1, 64]
output_topic = "predictions/{{device}}/raw"

[[streams]]
topic = "sensors/{{device}}/v2"
model = "mlp"
decode = "v2"
output_topic = "predictions/{{device}}/v2"
durable = true
"""


@pytest.fixture
def config(tmp_path: Path, broker: Broker, signing_keys, device_profile, mlp_bundle_factory) -> Path:
    """A settings file for a device serving the 64-32-10 MLP 'mlp' (seed 0)."""
    install_models(
        tmp_path / "store", signing_keys.public_key, device_profile, [mlp_bundle_factory("mlp", "1")]
    )
    return write_daemon_config(
        tmp_path / "edge.toml",
        device_id=DEVICE,
        store=tmp_path / "store",
        public_key=signing_keys.public_path,
        mqtt_port=broker.port,
        max_request_bytes=64 * 1024,
        extra=STREAMS,
    )


@pytest.fixture
def daemon(config: Path) -> Iterator[Daemon]:
    """The daemon running in this process."""
    instance = Daemon(load_settings(config))
    instance.start()
    assert instance.link is not None and instance.link.wait_connected(10)
    yield instance
    instance.stop()


def _request(x: np.ndarray, **extra: object) -> bytes:
    doc = {
        "v": 1,
        "inputs": [
            {"name": INPUT_NAME, "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ],
    }
    return json.dumps({**doc, **extra}).encode()


def _outputs(payload: bytes) -> np.ndarray:
    doc = json.loads(payload)
    assert doc["v"] == 1, doc
    (output,) = doc["outputs"]
    assert output["name"] == OUTPUT_NAME
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def _expected(x: np.ndarray) -> np.ndarray:
    return reference_forward(make_weights(64, 32, 10, seed=0), x)


def _sample(rows: int = 1, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 64)).astype(np.float32)


def test_request_response_mqtt5_correlation(daemon: Daemon, broker: Broker) -> None:
    probe = Probe(broker, protocol=5)
    probe.subscribe("client/replies")
    x = _sample(2)
    probe.publish(
        TOPICS.infer("mlp"), _request(x), response_topic="client/replies", correlation_data=b"abc-1"
    )
    (reply,) = probe.on("client/replies")
    assert reply.correlation_data == b"abc-1"
    np.testing.assert_allclose(_outputs(reply.payload), _expected(x), rtol=1e-5, atol=1e-6)
    assert json.loads(reply.payload)["model_version"] == "1"
    probe.close()


def test_request_response_311_reply_to(daemon: Daemon, broker: Broker) -> None:
    probe = Probe(broker, protocol=311)
    probe.subscribe("old-client/inbox")
    x = _sample(1, seed=3)
    probe.publish(TOPICS.infer("mlp"), _request(x, id="req-42", reply_to="old-client/inbox"))
    (reply,) = probe.on("old-client/inbox")
    assert json.loads(reply.payload)["id"] == "req-42"
    np.testing.assert_allclose(_outputs(reply.payload), _expected(x), rtol=1e-5, atol=1e-6)
    probe.close()


def test_mosquitto_clients_as_outside_client(daemon: Daemon, broker: Broker) -> None:
    sub = subprocess.Popen(
        [require_binary("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv311",
         "-t", "cli/inbox", "-C", "1", "-W", "20"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    x = _sample(1, seed=11)
    payload = _request(x, id="from-cli", reply_to="cli/inbox").decode()
    for _ in range(100):  # mosquitto_sub may not have subscribed yet: resend until it prints something
        subprocess.run(
            [require_binary("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv311",
             "-q", "1", "-t", TOPICS.infer("mlp"), "-m", payload],
            check=True,
        )  # fmt: skip
        try:
            out, _ = sub.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            continue
    reply = out.strip().splitlines()[0].encode()
    assert json.loads(reply)["id"] == "from-cli"
    np.testing.assert_allclose(_outputs(reply), _expected(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoding", ["json", "raw", "v2"])
def test_stream_bindings(daemon: Daemon, broker: Broker, decoding: str) -> None:
    probe = Probe(broker)
    probe.subscribe(f"predictions/{DEVICE}/{decoding}")
    x = _sample(1, seed=5)
    payload = {
        "json": json.dumps(x.tolist()).encode(),
        "raw": x.astype("<f4").tobytes(),
        "v2": _request(x),
    }[decoding]
    probe.publish(f"sensors/{DEVICE}/{decoding}", payload)
    (result,) = probe.on(f"predictions/{DEVICE}/{decoding}")
    assert json.loads(result.payload)["topic"] == f"sensors/{DEVICE}/{decoding}"
    np.testing.assert_allclose(_outputs(result.payload), _expected(x), rtol=1e-5, atol=1e-6)
    probe.publish(f"sensors/{DEVICE}/{decoding}", b"\x01\x02\x03")  # garbage for every decoding
    errors = probe.on(f"predictions/{DEVICE}/{decoding}", count=2)
    assert json.loads(errors[1].payload)["status"] == 400
    probe.close()


BAD_REQUESTS = [
    ("mlp", b"{not json", 400, "not valid JSON"),
    ("mlp", b"[1, 2, 3]", 400, "JSON object"),
    ("mlp", json.dumps({"v": 2, "inputs": []}).encode(), 400, "v2 is not supported"),
    (
        "mlp",
        json.dumps(
            {"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
        ).encode(),
        400,
        "unknown input 'nope'",
    ),
    ("mlp", _request(np.zeros((1, 63), np.float32)), 400, "shape"),
    (
        "mlp",
        json.dumps(
            {"inputs": [{"name": INPUT_NAME, "datatype": "FP64", "shape": [1, 64], "data": [0.5] * 64}]}
        ).encode(),
        400,
        "dtype",
    ),
    (
        "mlp",
        json.dumps(
            {"inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [1, 64], "data": ["a"] * 64}]}
        ).encode(),
        400,
        "input",
    ),
    ("mlp", _request(_sample(300)), 413, "limit"),
    ("nosuchmodel", _request(_sample()), 404, "not loaded"),
]


def test_burst_of_bad_requests_each_answered_then_good_one(daemon: Daemon, broker: Broker) -> None:
    probe = Probe(broker)
    probe.subscribe("client/errors")
    for index, (model, payload, _, _) in enumerate(BAD_REQUESTS):
        probe.publish(
            TOPICS.infer(model), payload, response_topic="client/errors", correlation_data=b"%d" % index
        )
    replies = probe.on("client/errors", count=len(BAD_REQUESTS))
    by_correlation = {reply.correlation_data: json.loads(reply.payload) for reply in replies}
    for index, (_, _, status, fragment) in enumerate(BAD_REQUESTS):
        answer = by_correlation[b"%d" % index]
        assert answer["v"] == 1 and answer["status"] == status, (index, answer)
        assert fragment in answer["error"], (index, answer)
    x = _sample(1, seed=9)
    probe.publish(TOPICS.infer("mlp"), _request(x), response_topic="client/errors", correlation_data=b"good")
    good = [
        r for r in probe.on("client/errors", count=len(BAD_REQUESTS) + 1) if r.correlation_data == b"good"
    ]
    np.testing.assert_allclose(_outputs(good[0].payload), _expected(x), rtol=1e-5, atol=1e-6)
    probe.close()


def test_reply_without_reply_topic_goes_to_the_default_reply_topic(daemon: Daemon, broker: Broker) -> None:
    probe = Probe(broker, protocol=311)
    probe.subscribe(TOPICS.reply("mlp"))
    probe.publish(TOPICS.infer("mlp"), b"{broken")
    (reply,) = probe.on(TOPICS.reply("mlp"))
    assert json.loads(reply.payload)["status"] == 400
    probe.close()


def _status(received: list) -> list[str]:
    return [json.loads(item.payload)["state"] for item in received if item.topic == TOPICS.status]


def test_presence_online_retained_and_last_will_offline_on_kill(config: Path, broker: Broker) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config)],
        stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )  # fmt: skip
    try:
        probe = Probe(broker)
        probe.subscribe(TOPICS.status)
        probe.wait_for(lambda items: "online" in _status(items))
        late = Probe(broker)  # a client that connects later still sees the retained state
        late.subscribe(TOPICS.status)
        assert _status(late.wait_for(lambda items: bool(_status(items)))) == ["online"]
        assert late.received[0].retain
        late.close()
        process.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker must publish the will
        process.wait(10)
        probe.wait_for(lambda items: _status(items)[-1:] == ["offline"])
        later = Probe(broker)
        later.subscribe(TOPICS.status)
        assert _status(later.wait_for(lambda items: bool(_status(items)))) == ["offline"]
        later.close()
        probe.close()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


class SlowDataPlane:
    """A dataplane whose model 'slow' runs until the test opens the gate; other models are fast."""

    def __init__(self, inner: DataPlane) -> None:
        self.inner = inner
        self.max_request_bytes = inner.max_request_bytes
        self.registry = inner.registry
        self.slow_started = threading.Event()
        self.gate = threading.Event()

    def infer(self, request: InferRequest) -> InferResponse:
        if request.model == "slow":
            self.slow_started.set()
            self.gate.wait(60)
            return self.inner.infer(InferRequest("mlp", request.inputs, id=request.id))
        return self.inner.infer(request)

    def shed(self, model: str | None) -> None:
        self.inner.shed(model)


def test_slow_model_does_not_stall_keepalive_or_other_requests(
    tmp_path: Path,
    broker: Broker,
    signing_keys,
    device_profile,
    mlp_bundle_factory,
) -> None:
    """A request that runs for several keep-alive periods: keep-alive and other requests go on meanwhile.

    Deterministic (issue 10.12): the slow model waits for a gate rather than sleeping, and what is
    asserted is that PINGRESPs kept arriving while it ran, not that no reconnect happened in time.
    """
    install_models(
        tmp_path / "store", signing_keys.public_key, device_profile, [mlp_bundle_factory("mlp", "1")]
    )
    registry = ModelRegistry(load_profile("x86-vnni-gateway"))
    registry.load_all(ModelStore(tmp_path / "store", signing_keys.public_key, device_profile))
    dataplane = SlowDataPlane(DataPlane(registry))
    settings = MqttSettings(
        port=broker.port, keepalive=2, workers=2, reconnect_min_s=0.1, reconnect_max_s=0.5
    )
    link = MqttLink(settings, "slow-device")
    MqttService(dataplane, link, TOPICS).attach()  # type: ignore[arg-type]
    link.start()
    try:
        assert link.wait_connected(10)
        probe = Probe(broker)
        probe.subscribe("client/slow")
        probe.subscribe("client/fast")
        probe.publish(
            TOPICS.infer("slow"), _request(_sample()), response_topic="client/slow", correlation_data=b"s"
        )
        assert dataplane.slow_started.wait(10)
        pings = link.pingresps
        for index in range(5):  # answered while the slow request is still running
            probe.publish(
                TOPICS.infer("mlp"),
                _request(_sample()),
                response_topic="client/fast",
                correlation_data=b"%d" % index,
            )
        fast = probe.on("client/fast", count=5)
        assert {item.correlation_data for item in fast} == {b"%d" % i for i in range(5)}
        eventually(lambda: link.pingresps >= pings + 2, what="two keep-alive round trips")
        assert not [item for item in probe.received if item.topic == "client/slow"]  # still running
        dataplane.gate.set()
        (slow,) = probe.on("client/slow")
        assert slow.correlation_data == b"s"
        probe.close()
    finally:
        dataplane.gate.set()
        link.stop()


def test_settings_protocol_3_1_1_daemon_answers(tmp_path: Path, broker: Broker, config: Path) -> None:
    text = config.read_text().replace("keepalive = 5", 'keepalive = 5\nprotocol = "3.1.1"')
    config.write_text(text)
    instance = Daemon(load_settings(config))
    instance.start()
    try:
        assert instance.link is not None and instance.link.wait_connected(10)
        assert instance.link.protocol is MqttProtocol.V311
        probe = Probe(broker, protocol=5)
        probe.subscribe("x/inbox")
        x = _sample()
        probe.publish(
            TOPICS.infer("mlp"), _request(x, reply_to="x/inbox"), correlation_data=b"ignored-by-311"
        )
        (reply,) = probe.on("x/inbox")
        np.testing.assert_allclose(_outputs(reply.payload), _expected(x), rtol=1e-5, atol=1e-6)
        probe.close()
    finally:
        instance.stop()


class Mqtt311OnlyProxy(TcpProxy):
    """Behaves like a 3.1.1-only broker: it refuses MQTT 5 CONNECTs (CONNACK "unacceptable protocol
    version", as such a broker sends) and forwards everything else."""

    refused = 0

    def first_bytes(self, client: socket.socket) -> bytes | None:
        first = client.recv(65536)  # CONNECT: fixed header, remaining length, "\0\4MQTT", protocol level
        if first[first.index(b"MQTT") + 4] == 5:
            self.refused += 1
            client.sendall(b"\x20\x02\x00\x01")
            client.close()
            return None
        return first


def test_falls_back_to_3_1_1_when_the_broker_refuses_mqtt5(
    tmp_path: Path, broker: Broker, signing_keys, device_profile, mlp_bundle_factory
) -> None:
    proxy = Mqtt311OnlyProxy(broker.port)
    install_models(
        tmp_path / "store", signing_keys.public_key, device_profile, [mlp_bundle_factory("mlp", "1")]
    )
    config = write_daemon_config(tmp_path / "edge.toml", device_id=DEVICE, store=tmp_path / "store",
                                 public_key=signing_keys.public_path, mqtt_port=proxy.port)  # fmt: skip
    instance = Daemon(load_settings(config))
    instance.start()
    try:
        assert instance.link is not None and instance.link.wait_connected(15)
        assert instance.link.protocol is MqttProtocol.V311 and proxy.refused >= 1
        probe = Probe(broker, protocol=311)
        probe.subscribe("fallback/inbox")
        x = _sample()
        probe.publish(TOPICS.infer("mlp"), _request(x, id="f1", reply_to="fallback/inbox"))
        (reply,) = probe.on("fallback/inbox")
        np.testing.assert_allclose(_outputs(reply.payload), _expected(x), rtol=1e-5, atol=1e-6)
        probe.close()
    finally:
        instance.stop()
        proxy.close()
