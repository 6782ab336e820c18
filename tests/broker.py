"""A real Mosquitto broker on a free 127.0.0.1 port for the MQTT tests, plus a small paho probe client.

With `BrokerTls`, the broker runs the shipped examples/mosquitto/mosquitto.conf and acl instead
(client-certificate listener on `port`, password listener on `password_port`, both TLS), and
`Probe(..., tls=client_tls(...), auth=...)` connects to it.

The `broker` fixture skips the test when the `mosquitto` binary is missing, unless
EDGE_REQUIRE_MOSQUITTO=1 (CI), which makes that a failure. The broker can be stopped and started
again mid-test on the same port (outage tests).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = [
    "Broker",
    "BrokerTls",
    "Probe",
    "Received",
    "broker_fixture",
    "client_tls",
    "eventually",
    "free_port",
    "require_binary",
]

HOST = "127.0.0.1"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mosquitto"
"""The shipped Mosquitto configuration and ACL (the TLS tests run exactly these)."""


@dataclass(frozen=True)
class BrokerTls:
    """The fleet CA folder (from `edge_runtime.fleet.certs`): ca.crt and the broker's broker.crt/.key."""

    certs: Path
    """Folder holding ca.crt, broker.crt and broker.key."""


def client_tls(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client TLS context trusting `ca`, presenting `cert`/`key` when given."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


def require_binary(name: str) -> str:
    """The path of a Mosquitto binary; skip (or fail with EDGE_REQUIRE_MOSQUITTO=1) when missing."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        message = f"'{name}' is not installed (apt-get install mosquitto mosquitto-clients)"
        if os.environ.get("EDGE_REQUIRE_MOSQUITTO") == "1":
            pytest.fail(message + "; EDGE_REQUIRE_MOSQUITTO=1 makes this a failure")
        pytest.skip(message)
    return path


def eventually(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds (a bound, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Broker:
    """One mosquitto process with a generated config; `stop()` / `start()` keep the port."""

    def __init__(
        self,
        directory: Path,
        *,
        persistence: bool = False,
        users: dict[str, str] | None = None,
        tls: BrokerTls | None = None,
    ) -> None:
        """Plain MQTT on `port`; with `tls`, the shipped example instead: `port` takes client
        certificates (CN = user name), `password_port` takes user names and passwords, both over TLS,
        both confined by the shipped acl."""
        self.binary = require_binary("mosquitto")
        self.directory = directory
        self.port = free_port()
        self.password_port = free_port() if tls else 0
        self.persistence = persistence
        self.process: subprocess.Popen | None = None
        self.config = directory / "mosquitto.conf"
        lines = [
            f"persistence_location {directory}/",
            "max_queued_messages 100000",
            "log_type error",
            "log_type warning",
            "log_type notice",
            # Run as ourselves: as root, mosquitto switches to user "mosquitto", who can neither write
            # its persistence file nor read a password file in pytest's private tmp folder.
            f"user {getpass.getuser()}",
        ]
        if tls is not None:
            lines = [
                *self._example(tls, users or {}),
                f"persistence {'true' if persistence else 'false'}",
                *lines,
            ]
        else:
            lines = [f"listener {self.port} {HOST}", f"allow_anonymous {'false' if users else 'true'}",
                     f"persistence {'true' if persistence else 'false'}", *lines]  # fmt: skip
            if users:
                lines.append(f"password_file {self._password_file(users)}")
        self.config.write_text("\n".join(lines) + "\n")

    def _example(self, tls: BrokerTls, users: dict[str, str]) -> list[str]:
        """The shipped mosquitto.conf with this test's files and ports (and the shipped acl)."""
        shutil.copy(EXAMPLE / "acl", self.directory / "acl")
        self._password_file(users)
        text = (EXAMPLE / "mosquitto.conf").read_text()
        text = text.replace("/etc/mosquitto/certs/", f"{tls.certs}/").replace(
            "/etc/mosquitto/", f"{self.directory}/"
        )
        text = text.replace("listener 8883\n", f"listener {self.port} {HOST}\n")
        text = text.replace("listener 8884\n", f"listener {self.password_port} {HOST}\n")
        kept = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return [line for line in kept if not line.startswith("persistence ")]

    def _password_file(self, users: dict[str, str]) -> Path:
        """A Mosquitto password file for `users` (name -> password), made with mosquitto_passwd."""
        path = self.directory / "passwords"
        path.write_text("")
        path.chmod(0o600)
        for name, password in users.items():
            subprocess.run([require_binary("mosquitto_passwd"), "-b", str(path), name, password], check=True)
        return path

    @property
    def address(self) -> str:
        """HOST:PORT."""
        return f"{HOST}:{self.port}"

    @property
    def log_text(self) -> str:
        """What mosquitto logged so far."""
        path = self.directory / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 10.0) -> None:
        """Start mosquitto and wait until it accepts connections."""
        log = open(self.directory / "mosquitto.log", "ab")  # noqa: SIM115 (closed with the process)
        self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self.directory / 'mosquitto.log').read_text()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.address} within {timeout} s")

    def stop(self) -> None:
        """Stop mosquitto (SIGTERM: it saves its persistence file, if any) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture(name="broker")
def broker_fixture(tmp_path: Path) -> Iterator[Broker]:
    """A running Mosquitto on a free loopback port (persistence off), stopped after the test."""
    (tmp_path / "broker").mkdir()
    instance = Broker(tmp_path / "broker")
    instance.start()
    yield instance
    instance.stop()


@dataclass(frozen=True)
class Received:
    """One message a probe received."""

    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None


class Probe:
    """A plain paho client for tests: subscribes, records what arrives, publishes."""

    def __init__(
        self,
        broker: Broker,
        *,
        protocol: int = 5,
        client_id: str = "",
        clean: bool = True,
        tls: ssl.SSLContext | None = None,
        port: int = 0,
        auth: tuple[str, str] | None = None,
    ) -> None:
        version = MQTTProtocolVersion.MQTTv5 if protocol == 5 else MQTTProtocolVersion.MQTTv311
        clean_session = None if protocol == 5 else clean
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version,
                                  clean_session=clean_session)  # fmt: skip
        self.protocol = protocol
        self.received: list[Received] = []
        self._changed = threading.Condition()
        self._connected = threading.Event()
        self._filters: list[tuple[str, int]] = []
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]
        if tls is not None:
            self.client.tls_set_context(tls)
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.suback: list[object] = []
        """The reason codes of the last SUBACK."""
        port = port or broker.port
        properties = None
        if protocol == 5 and not clean:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 3600
        if protocol == 5:
            self.client.connect(HOST, port, keepalive=10, clean_start=clean, properties=properties)
        else:
            self.client.connect(HOST, port, keepalive=10)
        self.client.loop_start()
        assert self._connected.wait(10), "probe could not connect"

    def _on_connect(self, client: paho.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        for topic, qos in self._filters:
            client.subscribe(topic, qos)
        self._connected.set()

    def _on_message(self, _c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        props = message.properties if self.protocol == 5 else None
        item = Received(
            message.topic, message.payload, bool(message.retain), getattr(props, "CorrelationData", None)
        )
        with self._changed:
            self.received.append(item)
            self._changed.notify_all()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK."""
        self._filters.append((topic, qos))
        done = threading.Event()

        def on_subscribe(_c: object, _u: object, _mid: int, reasons: list[object], _p: object) -> None:
            self.suback = list(reasons)
            done.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(topic, qos)
        assert done.wait(10), f"no SUBACK for {topic}"

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> None:
        """Publish and wait until the broker has it."""
        properties = None
        if response_topic or correlation_data:
            properties = Properties(PacketTypes.PUBLISH)
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation_data:
                properties.CorrelationData = correlation_data
        self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties).wait_for_publish(
            10
        )

    def publish_ack(self, topic: str, payload: bytes, *, qos: int = 1) -> object:
        """Publish at `qos` >= 1 and return the broker's PUBACK reason code (MQTT 5: says when refused)."""
        acked = threading.Event()
        reasons: dict[int, object] = {}

        def on_publish(_c: object, _u: object, mid: int, reason: object, _p: object) -> None:
            reasons[mid] = reason
            acked.set()

        self.client.on_publish = on_publish
        info = self.client.publish(topic, payload, qos=qos)
        assert acked.wait(10), f"no PUBACK for {topic}"
        self.client.on_publish = None
        return reasons[info.mid]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 15.0) -> list[Received]:
        """Wait until `predicate(received)` holds; return a copy of what was received."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.received):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; received {len(self.received)}: {self.received[-5:]}")
                self._changed.wait(left)
            return list(self.received)

    def on(self, topic: str, count: int = 1, timeout: float = 15.0) -> list[Received]:
        """Wait for `count` messages on `topic` and return them."""
        got = self.wait_for(lambda items: sum(item.topic == topic for item in items) >= count, timeout)
        return [item for item in got if item.topic == topic]

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def install_models(store_dir: Path, public_key: object, profile: object, bundles: list[Path]) -> None:
    """Install and activate bundles in a model store folder."""
    from edge_runtime.state.store import ModelStore

    store = ModelStore(store_dir, public_key, profile)  # type: ignore[arg-type]
    for bundle in bundles:
        manifest = store.install(bundle)
        store.activate(manifest.name, manifest.version)


def write_daemon_config(
    path: Path,
    *,
    device_id: str,
    store: Path,
    public_key: Path,
    mqtt_port: int,
    http_port: int = 0,
    telemetry_s: float = 60.0,
    outbox_max: int = 10000,
    max_request_bytes: int = 1 << 20,
    extra: str = "",
) -> Path:
    """A daemon settings file for tests (MQTT reconnects fast, HTTP on `http_port`)."""
    path.write_text(
        f"""
device_id = "{device_id}"
profile = "x86-vnni-gateway"
store = "{store}"
public_key = "{public_key}"
max_request_bytes = {max_request_bytes}

[http]
port = {http_port}

[mqtt]
host = "{HOST}"
port = {mqtt_port}
keepalive = 5
reconnect_min_s = 0.1
reconnect_max_s = 0.5

[telemetry]
interval_s = {telemetry_s}

[outbox]
path = "{path.parent / (device_id + "-outbox.sqlite")}"
max_records = {outbox_max}
{extra}
"""
    )
    return path


def mlp_dataplane(store_dir: Path, keys: object, profile: object, bundle: Path, **options: object) -> object:
    """A real DataPlane serving one MLP bundle installed into `store_dir` (options go to DataPlane)."""
    from edge_runtime.serving.dataplane import DataPlane
    from edge_runtime.serving.registry import ModelRegistry
    from edge_runtime.state.store import ModelStore

    install_models(store_dir, keys.public_key, profile, [bundle])  # type: ignore[attr-defined]
    registry = ModelRegistry(profile)  # type: ignore[arg-type]
    registry.load_all(ModelStore(store_dir, keys.public_key, profile))  # type: ignore[attr-defined,arg-type]
    return DataPlane(registry, **options)  # type: ignore[arg-type]


class GatedDataPlane:
    """A real DataPlane whose `infer` waits until the test opens the gate: workers are held busy on cue."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.registry = inner.registry  # type: ignore[attr-defined]
        self.max_request_bytes = inner.max_request_bytes  # type: ignore[attr-defined]
        self.metrics = inner.metrics  # type: ignore[attr-defined]
        self.gate = threading.Event()
        self._held = 0
        self._changed = threading.Condition()

    def infer(self, request: object) -> object:
        """Wait for the gate (at most 60 s), then run the real inference."""
        with self._changed:
            self._held += 1
            self._changed.notify_all()
        self.gate.wait(60)
        return self.inner.infer(request)  # type: ignore[attr-defined]

    def shed(self, model: str | None) -> None:
        """Count a shed request in the real metrics."""
        self.inner.shed(model)  # type: ignore[attr-defined]

    def wait_held(self, count: int, timeout: float = 15.0) -> None:
        """Wait until `count` requests reached `infer` (and wait at the gate while it is shut)."""
        with self._changed:
            assert self._changed.wait_for(lambda: self._held >= count, timeout), f"{self._held} held"
