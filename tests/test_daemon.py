"""The daemon as a process: `edgectl serve` from a settings file against a real broker and real HTTP,
systemd readiness, SIGTERM, `edgectl predict` over HTTP and MQTT, refused bundles, readable errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from click.testing import CliRunner

from edge_runtime.cli import cli
from edge_runtime.config.settings import load_settings
from edge_runtime.daemon import Daemon, sd_notify
from edge_runtime.state.store import ModelStore
from edge_runtime.transports.mqtt.topics import DeviceTopics
from tests.broker import Broker, Probe, broker_fixture, free_port, install_models, write_daemon_config  # noqa: F401 (fixture)
from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, make_weights, reference_forward

DEVICE = "gw-daemon"
TOPICS = DeviceTopics(DEVICE)
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Running:
    """A daemon process and how to reach it."""

    process: subprocess.Popen
    http_port: int
    notify: socket.socket
    config: Path
    probe: Probe
    """Subscribed to the device's status and events before the daemon started."""


def _notifications(sock: socket.socket, until: str, timeout: float = 30.0) -> list[str]:
    sock.settimeout(timeout)
    seen: list[str] = []
    while not any(until in message for message in seen):
        seen.append(sock.recv(4096).decode())
    return seen


@pytest.fixture
def config(tmp_path: Path, broker: Broker, signing_keys, device_profile, mlp_bundle_factory) -> Path:
    """A store with a good model 'mlp' and a model 'broken' whose bundle was damaged on disk."""
    store_dir = tmp_path / "store"
    install_models(store_dir, signing_keys.public_key, device_profile,
                   [mlp_bundle_factory("mlp", "1"), mlp_bundle_factory("broken", "1", seed=3)])  # fmt: skip
    damaged = ModelStore(store_dir, signing_keys.public_key, device_profile).bundle_path("broken", "1")
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    return write_daemon_config(tmp_path / "edge.toml", device_id=DEVICE, store=store_dir,
                               public_key=signing_keys.public_path, mqtt_port=broker.port,
                               http_port=free_port())  # fmt: skip


@pytest.fixture
def running(tmp_path: Path, config: Path, broker: Broker) -> Iterator[Running]:
    """`edgectl serve` in a subprocess, with a NOTIFY_SOCKET the test listens on."""
    probe = Probe(broker)
    probe.subscribe(TOPICS.status)
    probe.subscribe(TOPICS.events)
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    http_port = load_settings(config).http.port
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config)],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert any("READY=1" in m for m in _notifications(notify, "READY=1"))
        yield Running(process, http_port, notify, config, probe)
    finally:
        probe.close()
        if process.poll() is None:
            process.kill()
        process.wait(10)
        notify.close()


def test_serve_http_mqtt_refused_bundle_and_sigterm(running: Running, broker: Broker) -> None:
    probe = running.probe
    client = triton.InferenceServerClient(f"127.0.0.1:{running.http_port}")
    # Strict readiness: one configured model was refused, so the server is live but not ready,
    # and the health body names the refused model; the good one serves regardless.
    assert client.is_server_live() and not client.is_server_ready()
    assert client.is_model_ready("mlp") and not client.is_model_ready("broken")
    with urllib.request.urlopen(f"http://127.0.0.1:{running.http_port}/v2/health/live") as live:
        assert live.status == 200
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{running.http_port}/v2/health/ready")
        raise AssertionError("ready with a refused model")
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
        assert exc.code == 503 and body["serving"] == ["mlp"] and list(body["refused"]) == ["broken"]
    x = np.random.default_rng(1).normal(size=(2, 64)).astype(np.float32)
    tensor = triton.InferInput(INPUT_NAME, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("mlp", [tensor]).as_numpy(OUTPUT_NAME)
    np.testing.assert_allclose(result, reference_forward(make_weights(seed=0), x), rtol=1e-5, atol=1e-6)

    (event,) = probe.on(TOPICS.events)
    refused = json.loads(event.payload)
    assert refused["kind"] == "model_refused" and refused["model"] == "broken" and refused["reason"]
    probe.wait_for(
        lambda items: any(
            json.loads(i.payload)["state"] == "online" for i in items if i.topic == TOPICS.status
        )
    )

    running.process.send_signal(signal.SIGTERM)
    assert any("STOPPING=1" in m for m in _notifications(running.notify, "STOPPING=1"))
    assert running.process.wait(20) == 0
    assert "Traceback" not in (running.process.stderr.read() if running.process.stderr else "")
    states = [json.loads(i.payload)["state"] for i in probe.wait_for(lambda items: len(items) >= 3)
              if i.topic == TOPICS.status]  # fmt: skip
    assert states[-1] == "offline"


def test_edgectl_predict_over_http_and_mqtt(running: Running, broker: Broker, tmp_path: Path) -> None:
    x = np.random.default_rng(2).normal(size=(1, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = reference_forward(make_weights(seed=0), x)
    runner = CliRunner()
    http = runner.invoke(cli, ["predict", "mlp", "--input", f"{INPUT_NAME}={tmp_path / 'x.npy'}",
                               "--http", f"http://127.0.0.1:{running.http_port}", "--json"])  # fmt: skip
    assert http.exit_code == 0, http.output
    got = np.asarray(json.loads(http.output)["outputs"][0]["data"], np.float32).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    for protocol in ("5", "3.1.1"):
        over_mqtt = runner.invoke(cli, ["predict", "mlp", "-i", f"{INPUT_NAME}={json.dumps(x.tolist())}",
                                        "--mqtt", broker.address, "--device", DEVICE, "--mqtt-protocol", protocol,
                                        "--json"])  # fmt: skip
        assert over_mqtt.exit_code == 0, over_mqtt.output
        got = np.asarray(json.loads(over_mqtt.output)["outputs"][0]["data"], np.float32).reshape(
            expected.shape
        )
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    summary = runner.invoke(cli, ["predict", "mlp", "-i", f"{INPUT_NAME}={tmp_path / 'x.npy'}",
                                  "--http", f"http://127.0.0.1:{running.http_port}"])  # fmt: skip
    assert summary.exit_code == 0 and OUTPUT_NAME in summary.output


def test_edgectl_predict_readable_errors(running: Running, broker: Broker) -> None:
    runner = CliRunner()
    url = f"http://127.0.0.1:{running.http_port}"
    cases = [
        (["predict", "nosuch", "-i", "input=[[1.0]]", "--http", url], 1, "not loaded"),
        (["predict", "mlp", "-i", "input=[[1.0, 2.0]]", "--http", url], 1, "shape"),
        (["predict", "mlp", "-i", "input=[[1.0, 2.0]]", "--mqtt", broker.address, "--device", DEVICE], 1, "shape"),
        (["predict", "mlp", "-i", "input=[1", "--http", url], 2, "--input input"),
        (["predict", "mlp", "-i", "input", "--http", url], 2, "name=file.npy"),
        (["predict", "mlp", "-i", "input=[1]"], 2, "exactly one of --http"),
        (["predict", "mlp", "-i", "input=[1]", "--mqtt", broker.address], 2, "--device"),
        (["predict", "mlp", "-i", "input=[1]", "--http", f"http://127.0.0.1:{free_port()}"], 1, "cannot reach"),
        (["predict", "mlp", "-i", "input=[1]", "--mqtt", "127.0.0.1:1", "--device", DEVICE, "--timeout", "1"], 1,
         "cannot connect"),
    ]  # fmt: skip
    for args, code, fragment in cases:
        result = runner.invoke(cli, args)
        assert result.exit_code == code, (args, result.output)
        assert fragment in result.output, (args, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, (
            result.output
        )


def test_serve_readable_errors(tmp_path: Path, config: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli, ["serve", "--config", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2 and "cannot read settings" in missing.output
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace("[mqtt]", "[mqtt]\nhots = 1"))
    unknown = runner.invoke(cli, ["serve", "--config", str(bad)])
    assert (
        unknown.exit_code == 2 and "unknown key 'mqtt.hots'" in unknown.output and str(bad) in unknown.output
    )
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = runner.invoke(cli, ["serve", "--config", str(config), "--http-port", str(busy.getsockname()[1])])
    busy.close()
    assert taken.exit_code == 2 and "cannot listen" in taken.output, taken.output


def test_sd_notify_abstract_and_missing_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    name = f"edge-test-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    assert sd_notify("WATCHDOG=1") is True
    assert listener.recv(100) == b"WATCHDOG=1"
    listener.close()


def test_in_process_daemon_reports_model_telemetry(config: Path) -> None:
    daemon = Daemon(load_settings(config))
    daemon.start()
    try:
        models = daemon.model_telemetry()
        assert models["mlp"]["state"] == "serving" and models["broken"]["state"] == "refused"
        assert daemon.health().is_serving and not daemon.health().is_healthy  # a refused model: degraded
    finally:
        daemon.stop()
