"""MQTT over TLS against a real Mosquitto running the shipped examples/mosquitto config and ACL,
with certificates minted by `edgectl certs`: a device serves with its certificate; the ACL
confines it to edge/<its id>/#; a wrong certificate, CA or password is refused with the cause
named, in the daemon's log (then the longest backoff) and in edgectl (one line, at once)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_runtime.cli import cli
from edge_runtime.core.errors import TransientError
from edge_runtime.fleet.certs import CertRole, make_ca, make_cert
from tests.broker import Broker, BrokerTls, Probe, client_tls, eventually, install_models, write_daemon_config
from tests.mlp_models import INPUT_NAME, make_weights, reference_forward

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "right horse battery"


@dataclass(frozen=True)
class Fleet:
    """A CA with broker, device and operator certificates, and a rogue CA that signed a 'gw-a' too."""

    certs: Path
    rogue: Path
    password_file: Path
    wrong_password_file: Path

    def cert(self, name: str) -> tuple[Path, Path]:
        """(cert, key) of `name` signed by the fleet CA."""
        return self.certs / f"{name}.crt", self.certs / f"{name}.key"

    def tls(self, name: str) -> object:
        """A client TLS context for `name`."""
        return client_tls(self.certs / "ca.crt", *self.cert(name))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """Certificates made with `edgectl certs` (the CLI itself) and with the library for the rogue CA."""
    root = tmp_path_factory.mktemp("fleet")
    certs, rogue = root / "certs", root / "rogue"
    runner = CliRunner()
    for args in (
        ["certs", "ca", "-o", str(certs)],
        [
            "certs",
            "broker",
            "--host",
            "127.0.0.1",
            "--host",
            "localhost",
            "--ca",
            str(certs),
            "-o",
            str(certs),
        ],
        ["certs", "device", "gw-a", "--ca", str(certs), "-o", str(certs)],
        ["certs", "device", "gw-b", "--ca", str(certs), "-o", str(certs)],
        ["certs", "operator", "operator", "--ca", str(certs), "-o", str(certs)],
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
    make_ca(rogue, name="rogue CA")
    make_cert(rogue, "gw-a", rogue, role=CertRole.DEVICE)
    make_cert(rogue, "operator", rogue, role=CertRole.OPERATOR)
    (root / "password").write_text(PASSWORD + "\n")
    (root / "wrong-password").write_text("wrong\n")
    return Fleet(certs, rogue, root / "password", root / "wrong-password")


@pytest.fixture
def tls_broker(tmp_path: Path, fleet: Fleet) -> Iterator[Broker]:
    """Mosquitto running examples/mosquitto/mosquitto.conf and acl (certificate and password listeners)."""
    (tmp_path / "broker").mkdir()
    broker = Broker(
        tmp_path / "broker",
        users={"gw-a": PASSWORD, "operator": PASSWORD, "collector": PASSWORD},
        tls=BrokerTls(fleet.certs),
    )
    broker.start()
    yield broker
    broker.stop()


def _daemon_config(tmp_path: Path, broker: Broker, keys: object, profile: object, bundle: Path, mqtt: str,
                   *, port: int = 0, reconnect_max_s: float = 0.5) -> Path:  # fmt: skip
    store = tmp_path / "store"
    install_models(store, keys.public_key, profile, [bundle])  # type: ignore[attr-defined]
    path = write_daemon_config(tmp_path / "edge.toml", device_id="gw-a", store=store,
                               public_key=keys.public_path, mqtt_port=port or broker.port)  # type: ignore[attr-defined]  # fmt: skip
    text = path.read_text().replace("[mqtt]\n", f"[mqtt]\n{mqtt}\n")
    path.write_text(text.replace("reconnect_max_s = 0.5", f"reconnect_max_s = {reconnect_max_s}"))
    return path


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    """Start `edgectl serve --config PATH` in a subprocess; returns (process, log path); killed after."""
    started: list[subprocess.Popen] = []

    def start(config: Path) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"daemon-{len(started)}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config)],
                                       env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=out)  # fmt: skip
        started.append(process)
        return process, log

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def _tls_options(ca: Path, cert: Path | None = None, key: Path | None = None) -> list[str]:
    options = ["--ca-file", str(ca)]
    if cert is not None and key is not None:
        options += ["--cert-file", str(cert), "--key-file", str(key)]
    return options


def test_device_serves_over_tls_with_its_certificate(
    tmp_path: Path, fleet: Fleet, tls_broker: Broker, serve, signing_keys, device_profile, mlp_bundle_factory
) -> None:
    cert, key = fleet.cert("gw-a")
    mqtt = f'ca_file = "{fleet.certs / "ca.crt"}"\ncert_file = "{cert}"\nkey_file = "{key}"'
    config = _daemon_config(
        tmp_path, tls_broker, signing_keys, device_profile, mlp_bundle_factory("mlp", "1"), mqtt
    )
    operator = Probe(tls_broker, tls=fleet.tls("operator"))
    operator.subscribe("edge/gw-a/status")
    process, log = serve(config)
    try:
        operator.wait_for(lambda items: any(b'"online"' in item.payload for item in items))
        x = np.random.default_rng(4).normal(size=(1, 64)).astype(np.float32)
        expected = reference_forward(make_weights(seed=0), x)
        runner = CliRunner()
        tls = _tls_options(fleet.certs / "ca.crt", *fleet.cert("operator"))
        for protocol in (
            "5",
            "3.1.1",
        ):  # 3.1.1: the reply goes to the inbox named in the payload, inside the ACL
            result = runner.invoke(cli, ["predict", "mlp", "-i", f"{INPUT_NAME}={json.dumps(x.tolist())}", "--mqtt",
                                         tls_broker.address, "--device", "gw-a", "--mqtt-protocol", protocol,
                                         "--json", "--timeout", "30", *tls])  # fmt: skip
            assert result.exit_code == 0, result.output
            got = np.asarray(json.loads(result.output)["outputs"][0]["data"], np.float32).reshape(
                expected.shape
            )
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        # An operator without a certificate: user name and password over TLS on the second listener.
        password_broker = f"127.0.0.1:{tls_broker.password_port}"
        models = runner.invoke(cli, ["models", "--device", "gw-a", "--broker", password_broker, "--username",
                                     "operator", "--password-file", str(fleet.password_file),
                                     *_tls_options(fleet.certs / "ca.crt")])  # fmt: skip
        assert models.exit_code == 0 and "mlp: serving 1" in models.output, models.output
    finally:
        operator.close()
        process.terminate()
        process.wait(20)
    text = log.read_text()
    assert "connected to 127.0.0.1" in text and " ERROR " not in text and "broker refused" not in text, text


def test_acl_confines_each_device_to_its_own_topics(fleet: Fleet, tls_broker: Broker) -> None:
    a, b = Probe(tls_broker, tls=fleet.tls("gw-a")), Probe(tls_broker, tls=fleet.tls("gw-b"))
    a311 = Probe(tls_broker, tls=fleet.tls("gw-a"), protocol=4)
    operator = Probe(tls_broker, tls=fleet.tls("operator"))
    collector = Probe(tls_broker, port=tls_broker.password_port, tls=client_tls(fleet.certs / "ca.crt"),
                      auth=("collector", PASSWORD))  # fmt: skip
    try:
        b.subscribe("edge/gw-b/#")
        for pattern in ("edge/gw-b/#", "edge/+/telemetry", "#"):
            a.subscribe(pattern)  # Mosquitto 2.0 grants the SUBACK and filters on delivery (checked below)
        operator.subscribe("edge/+/telemetry")
        collector.subscribe("$share/collectors/edge/+/telemetry")
        # gw-a writes to gw-b's topics: MQTT 5 gets "Not authorized" in the PUBACK; 3.1.1 is dropped silently.
        assert str(a.publish_ack("edge/gw-b/infer/mlp", b'{"inputs": []}')) == "Not authorized"
        assert str(a.publish_ack("edge/gw-b/update/offer", b"{}")) == "Not authorized"
        assert str(a.publish_ack("edgectl/anything", b"{}")) == "Not authorized"
        a311.publish("edge/gw-b/update/cmd", b'{"op": "models"}')
        # Its own topics are fine; the operator writes to gw-b, which only gw-b (and the operator) read.
        assert str(a.publish_ack("edge/gw-a/telemetry", b"a-telemetry")) == "Success"
        operator.publish("edge/gw-b/telemetry", b"b-telemetry")
        operator.publish("edge/gw-b/infer/mlp", b"for-b")
        b.wait_for(lambda items: any(item.payload == b"for-b" for item in items))
        operator.on("edge/gw-a/telemetry")
        collector.wait_for(lambda items: {item.payload for item in items} >= {b"a-telemetry", b"b-telemetry"})
        assert [item.payload for item in b.received] == [b"b-telemetry", b"for-b"]
        assert {item.topic for item in a.received} == {"edge/gw-a/telemetry"}
        # The collector reads the fleet but may not write to it.
        assert str(collector.publish_ack("edge/gw-a/update/offer", b"{}")) == "Not authorized"
    finally:
        for probe in (a, b, a311, operator, collector):
            probe.close()


REFUSALS = {
    # case: (listener, client files, fragment in the daemon's ERROR and in edgectl's one line)
    "wrong client certificate": ("cert", "rogue-cert", "rejected our client certificate"),
    "wrong CA": ("cert", "rogue-ca", "certificate verify failed"),
    "wrong password": ("password", "wrong-password", "Not authorized (wrong user name or password"),
}


def _client_files(fleet: Fleet, files: str) -> tuple[Path, Path | None, Path | None, Path | None]:
    """(ca, cert, key, password file) for a refusal case."""
    if files == "rogue-cert":
        return fleet.certs / "ca.crt", fleet.rogue / "operator.crt", fleet.rogue / "operator.key", None
    if files == "rogue-ca":
        return fleet.rogue / "ca.crt", *fleet.cert("operator"), None
    return fleet.certs / "ca.crt", None, None, fleet.wrong_password_file


@pytest.mark.parametrize("case", list(REFUSALS))
def test_daemon_refused_logs_the_cause_and_backs_off(
    case: str, tmp_path: Path, fleet: Fleet, tls_broker: Broker, serve, signing_keys, device_profile,
    mlp_bundle_factory,
) -> None:  # fmt: skip
    listener, files, fragment = REFUSALS[case]
    ca, cert, key, password = _client_files(fleet, files)
    if files == "rogue-cert":
        cert, key = fleet.rogue / "gw-a.crt", fleet.rogue / "gw-a.key"
    elif files == "rogue-ca":
        cert, key = fleet.cert("gw-a")
    mqtt = f'ca_file = "{ca}"\n' + (f'cert_file = "{cert}"\nkey_file = "{key}"\n' if cert else "")
    if password is not None:
        mqtt += f'username = "gw-a"\npassword_file = "{password}"\n'
    port = tls_broker.password_port if listener == "password" else tls_broker.port
    config = _daemon_config(tmp_path, tls_broker, signing_keys, device_profile, mlp_bundle_factory("mlp", "1"),
                            mqtt, port=port, reconnect_max_s=20.0)  # fmt: skip
    process, log = serve(config)
    eventually(lambda: "next attempt in" in log.read_text(), 30, "the first retry to be logged")
    process.terminate()
    process.wait(20)
    text = log.read_text()
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and fragment in errors[0] and "retrying only every 20 s" in errors[0], text
    delays = [float(d) for d in re.findall(r"next attempt in ([0-9.]+) s", text)]
    assert delays and delays[0] >= 10.0, text  # the longest backoff (20 s, jitter to half), not 0.1 s
    assert "Traceback" not in text


@pytest.mark.parametrize("case", list(REFUSALS))
def test_edgectl_refused_is_one_line_at_once(
    case: str, fleet: Fleet, tls_broker: Broker, mlp_bundle_factory
) -> None:
    listener, files, fragment = REFUSALS[case]
    ca, cert, key, password = _client_files(fleet, files)
    options = _tls_options(ca, cert, key)
    if password is not None:
        options += ["--username", "operator", "--password-file", str(password)]
    address = f"127.0.0.1:{tls_broker.password_port if listener == 'password' else tls_broker.port}"
    bundle = str(mlp_bundle_factory("mlp", "2"))
    commands = [
        ["models", "--device", "gw-a", "--broker", address, "--timeout", "120"],
        ["flash", bundle, "--device", "gw-a", "--broker", address, "--timeout", "120"],
        [
            "predict",
            "mlp",
            "-i",
            f"{INPUT_NAME}=[[0.0]]",
            "--mqtt",
            address,
            "--device",
            "gw-a",
            "--timeout",
            "120",
        ],
    ]
    runner = CliRunner()
    for args in commands:
        started = time.monotonic()
        result = runner.invoke(cli, [*args, *options])
        lines = result.output.strip().splitlines()
        assert result.exit_code != 0 and fragment in result.output, (args, result.output)
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        assert "within" not in result.output, (
            args,
            result.output,
            time.monotonic() - started,
        )  # not a timeout


def test_a_broker_that_is_down_is_not_a_refusal() -> None:
    from edge_runtime.client.broker import Broker as Target
    from tests.broker import free_port

    link = Target("127.0.0.1", free_port(), tls=True).link("down")
    link.start()
    try:
        assert not link.wait_connected(1.0)
        assert link.refusal() is None  # transient: edgectl waits out its --timeout, the daemon retries
        with pytest.raises(TransientError, match=r"cannot connect to the MQTT broker at .* within 0\.5 s"):
            link.require_connected(0.5)
    finally:
        link.stop(timeout=1.0)


def test_a_broker_certificate_for_another_host_is_refused_naming_the_host(
    tmp_path: Path, fleet: Fleet
) -> None:
    """A certificate the fleet CA signed, but for `gateway.example` only: connecting to 127.0.0.1 is
    refused at once, in one line that says the certificate does not name the host."""
    other = tmp_path / "other-certs"
    other.mkdir()
    for name in ("ca.crt", "ca.key"):
        (other / name).write_bytes((fleet.certs / name).read_bytes())
    args = ["certs", "broker", "--host", "gateway.example", "--ca", str(other), "-o", str(other)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker", users={"operator": PASSWORD}, tls=BrokerTls(other))
    broker.start()
    try:
        options = _tls_options(fleet.certs / "ca.crt", *fleet.cert("operator"))
        args = ["models", "--device", "gw-a", "--broker", f"127.0.0.1:{broker.port}", "--timeout", "120"]
        result = CliRunner().invoke(cli, [*args, *options])
    finally:
        broker.stop()
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1, result.output
    assert "does not name the host" in result.output and "Traceback" not in result.output
