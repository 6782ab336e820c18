"""The MQTT link under faults, against a real Mosquitto (issue 10, items 1 and 2): a dead or stuck network
thread is rebuilt, broker trouble is logged with its reason and next attempt, backoff grows, and two
clients with the same client id are told apart from an ordinary outage."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.config.settings import MqttProtocol, MqttSettings
from edge_runtime.transports.mqtt.link import Incoming, MqttLink, Will
from tests.broker import Broker, Probe, broker_fixture, eventually, free_port  # noqa: F401 (fixture)
from tests.tcp_proxy import TcpProxy

LINK_LOG = "edge_runtime.transports.mqtt.link"
FAST = {"keepalive": 2, "reconnect_min_s": 0.1, "reconnect_max_s": 0.4}


class _Kill(BaseException):
    """Not an Exception: escapes every `except Exception`, as a thread-killing fault does."""


@contextlib.contextmanager
def running(link: MqttLink) -> Iterator[MqttLink]:
    """Start `link`, stop it afterwards."""
    link.start()
    try:
        yield link
    finally:
        link.stop(timeout=2.0)


def _echo_link(broker: Broker, client_id: str, **settings: object) -> tuple[MqttLink, list[bool]]:
    """A link that answers 'ping/in' on 'ping/out' and records every connection change."""
    link = MqttLink(
        MqttSettings(port=broker.port, **{**FAST, **settings}),  # type: ignore[arg-type]
        client_id,
        presence=Will(f"presence/{client_id}", b"online", b"offline"),
    )
    changes: list[bool] = []
    link.add_connection_listener(changes.append)
    link.subscribe("ping/in", lambda message: link.publish("ping/out", message.payload, qos=1))
    return link, changes


def _answers(probe: Probe, payload: bytes) -> None:
    """The link echoes `payload` (it serves requests)."""
    probe.publish("ping/in", payload)
    probe.wait_for(lambda items: any(item.payload == payload for item in items))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_killed_network_thread_is_rebuilt(broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    probe = Probe(broker)
    probe.subscribe("ping/out")
    probe.subscribe("presence/killed")
    link, changes = _echo_link(broker, "killed")
    armed = threading.Event()

    def killer(_mid: int, _ok: bool) -> None:  # runs on the network thread
        if armed.is_set():
            armed.clear()
            raise _Kill

    link.add_ack_listener(killer)
    with running(link), caplog.at_level(logging.WARNING, LINK_LOG):
        assert link.wait_connected(10)
        _answers(probe, b"before")
        doomed = link.session
        armed.set()
        link.publish("poison/ack", b"x", qos=1)  # its PUBACK ends the network thread
        eventually(lambda: link.session > doomed and link.connected, what="rebuilt link")
        assert link.rebuilds == 1 and link.healthy()
        assert changes[:3] == [True, False, True]  # `connected` went False while it was dead
        assert any("died; rebuilding the MQTT connection" in r.getMessage() for r in caplog.records)
        _answers(probe, b"after")
        online = [
            item for item in probe.received if item.topic == "presence/killed" and item.payload == b"online"
        ]
        assert len(online) >= 2  # presence published again by the new client
    probe.close()


def test_a_stuck_network_thread_is_rebuilt(broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    probe = Probe(broker)
    probe.subscribe("ping/out")
    link, changes = _echo_link(broker, "stuck", keepalive=1)
    release, armed = threading.Event(), threading.Event()

    def blocker(_mid: int, _ok: bool) -> None:  # runs on the network thread: a callback that never returns
        if armed.is_set():
            armed.clear()
            release.wait(60)

    link.add_ack_listener(blocker)
    try:
        with running(link), caplog.at_level(logging.WARNING, LINK_LOG):
            assert link.wait_connected(10)
            first = link.session
            armed.set()
            link.publish("stuck/ack", b"x", qos=1)  # its PUBACK blocks the network thread
            eventually(lambda: link.session > first and link.connected, what="rebuilt link")
            assert link.rebuilds == 1 and False in changes
            assert any("no progress" in r.getMessage() for r in caplog.records)
            _answers(probe, b"unstuck")
    finally:
        release.set()
    probe.close()


def _retry_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "next attempt in" in r.getMessage()
    ]


@pytest.mark.parametrize("host", ["127.0.0.1", "broker.invalid"])
def test_a_broker_that_is_down_is_logged_with_reason_and_next_attempt(
    host: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10.2: a down broker produced no log line in 20 s and readiness stayed true."""
    port = free_port()  # nobody listens there
    settings = MqttSettings(host=host, port=port, keepalive=2, reconnect_min_s=0.05, reconnect_max_s=0.4)
    link = MqttLink(settings, "lonely")
    with caplog.at_level(logging.WARNING, LINK_LOG), running(link):
        eventually(lambda: len(_retry_lines(caplog)) >= 4, what="four failed attempts logged")
        assert not link.connected and link.healthy()  # not connected, but the link itself works
    expected = "Connection refused" if host == "127.0.0.1" else f"cannot resolve MQTT broker host '{host}'"
    lines = _retry_lines(caplog)
    assert all(expected in line for line in lines), lines
    assert all(re.search(r"next attempt in \d+\.\d s \(at \d\d:\d\d:\d\d\)", line) for line in lines)
    nominal = [n for n, _ in link.retry_delays]
    assert nominal[:4] == [0.05, 0.1, 0.2, 0.4]  # exponential, capped at reconnect_max_s
    assert all(n / 2 <= drawn <= n for n, drawn in link.retry_delays)  # with jitter


@pytest.mark.parametrize(
    ("username", "password", "reason"),
    [("", "", "Not authorized"), ("device", "wrong", "Not authorized")],
)
@pytest.mark.parametrize("protocol", [MqttProtocol.V5, MqttProtocol.V311])
def test_a_refused_connack_is_logged_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, username: str, password: str, reason: str, protocol
) -> None:
    broker = Broker(tmp_path, users={"device": "secret"})
    broker.start()
    try:
        settings = MqttSettings(
            port=broker.port,
            protocol=protocol,
            username=username,
            password=password,
            **FAST,  # type: ignore[arg-type]
        )
        with caplog.at_level(logging.WARNING, LINK_LOG), running(MqttLink(settings, "refused")) as link:
            eventually(lambda: len(_retry_lines(caplog)) >= 2, what="refusals logged")
            assert not link.connected and link.protocol is protocol  # no fallback for a refusal
        lines = _retry_lines(caplog)
        assert all(f"refused the connection: {reason}" in line for line in lines), lines
        good = MqttSettings(port=broker.port, protocol=protocol, username="device", password="secret", **FAST)  # type: ignore[arg-type]
        with running(MqttLink(good, "accepted")) as link:
            assert link.wait_connected(10)
    finally:
        broker.stop()


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]


@pytest.mark.parametrize("protocol", [MqttProtocol.V5, MqttProtocol.V311])
def test_two_clients_with_the_same_id_are_an_error_and_back_off(
    broker: Broker, caplog: pytest.LogCaptureFixture, protocol: MqttProtocol
) -> None:
    """Issue 10.2: two daemons with the same device id flapped every 0.5 s forever, saying "Unspecified error"."""
    settings = MqttSettings(
        port=broker.port, protocol=protocol, keepalive=5, reconnect_min_s=0.1, reconnect_max_s=1.6
    )
    first, second = MqttLink(settings, "edge-twin"), MqttLink(settings, "edge-twin")
    with caplog.at_level(logging.WARNING, LINK_LOG), running(first), running(second):
        eventually(
            lambda: first.takeovers >= 1 and second.takeovers >= 1, timeout=30, what="both see the takeover"
        )
        start = first.connection_epoch + second.connection_epoch
        time.sleep(4.0)  # a window to count connects in (an upper bound: a slow machine only connects less)
        connects = first.connection_epoch + second.connection_epoch - start
    errors = _errors(caplog)
    assert errors and all("same client id 'edge-twin'" in line for line in errors), errors
    # Without backoff they would reconnect every 0.1 s: about 40 connects in 4 s. With it, delays of
    # 0.4 s and more (nominal 0.8 s or more after the third takeover), at most about 10 each.
    assert connects <= 20, connects
    for link in (first, second):
        nominal = [n for n, _ in link.retry_delays]
        assert nominal == sorted(nominal) and nominal[-1] >= 0.8, nominal  # never reset to the minimum


class TakeoverReasonProxy(TcpProxy):
    """Does what EMQX or HiveMQ do on a session takeover: when the broker closes a client's connection,
    send that client an MQTT 5 DISCONNECT with reason 0x8E first."""

    def upstream_closed(self, client: socket.socket) -> None:
        client.sendall(b"\xe0\x02\x8e\x00")  # DISCONNECT, reason 0x8E, no properties


def test_session_taken_over_reason_is_an_error_at_once(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = TakeoverReasonProxy(broker.port)
    settings = MqttSettings(port=proxy.port, keepalive=5, reconnect_min_s=0.2, reconnect_max_s=0.8)
    first = MqttLink(settings, "edge-dup")
    try:
        with caplog.at_level(logging.WARNING, LINK_LOG), running(first):
            assert first.wait_connected(10)
            with running(MqttLink(settings, "edge-dup")):
                eventually(lambda: first.takeovers >= 1, what="takeover seen")
        errors = _errors(caplog)
        assert any("session was taken over" in line and "'edge-dup'" in line for line in errors), errors
    finally:
        proxy.close()


def test_messages_only_queue_on_the_network_thread(broker: Broker) -> None:
    """Handlers and refusals never run on paho's network thread (their thread names say where they ran)."""
    ran: list[str] = []
    link = MqttLink(MqttSettings(port=broker.port, queue_size=1, workers=1, **FAST), "threads")  # type: ignore[arg-type]
    gate = threading.Event()

    def handler(_message: Incoming) -> None:
        ran.append(threading.current_thread().name)
        gate.wait(30)

    link.subscribe("t/in", handler, on_refused=lambda _r: ran.append(threading.current_thread().name))
    probe = Probe(broker)
    with running(link):
        assert link.wait_connected(10)
        for index in range(5):
            probe.publish("t/in", b"%d" % index)
        eventually(lambda: len(ran) >= 4, what="one handled, three refused")  # 1 running, 1 queued, 3 refused
        gate.set()
        eventually(lambda: len(ran) == 5, what="the queued one handled")
    assert sorted(set(ran)) == ["mqtt-replier", "mqtt-worker-0"]
    probe.close()
