"""End to end with the OpenVINO engine: a bundle whose manifest names openvino, installed with
`edgectl store install`, served by the real daemon beside an ONNX Runtime bundle, answered over HTTP
(tritonclient) and MQTT (a real Mosquitto); on a device without the `openvino` package that one
model is refused with what to install while the other keeps serving."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tritonclient.http as triton
from click.testing import CliRunner

from edge_runtime.cli import cli
from edge_runtime.transports.mqtt.topics import DeviceTopics
from tests.broker import Broker, Probe, broker_fixture, free_port, write_daemon_config  # noqa: F401 (fixture)
from tests.conftest import require_module
from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, make_weights, reference_forward
from tests.test_backends_contract import OPENVINO_EXTRA

DEVICE = "gw-openvino"
TOPICS = DeviceTopics(DEVICE)
ROOT = Path(__file__).resolve().parent.parent


def edgectl(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`edgectl` from this worktree as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", *map(str, args)],
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def install(store: Path, key: Path, bundles: list[Path]) -> None:
    """`edgectl store install --activate` for each bundle (the first creates the store)."""
    for bundle in bundles:
        done = edgectl("store", "install", bundle, "--store", store, "--key", key, "--create", "--activate")
        assert done.returncode == 0, done.stderr


@contextmanager
def serving(config: Path, tmp_path: Path, pythonpath: str) -> Iterator[subprocess.Popen[str]]:
    """`edgectl serve` until READY=1 (systemd notify socket), killed afterwards."""
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(60)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONPATH": pythonpath}
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config)],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while "READY=1" not in notify.recv(4096).decode():
            pass
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        notify.close()


def infer_http(port: int, model: str, x: np.ndarray) -> np.ndarray:
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = triton.InferInput(INPUT_NAME, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor]).as_numpy(OUTPUT_NAME)


def infer_mqtt(broker: Broker, model: str, x: np.ndarray) -> np.ndarray:
    result = CliRunner().invoke(cli, ["predict", model, "-i", f"{INPUT_NAME}={json.dumps(x.tolist())}",
                                      "--mqtt", broker.address, "--device", DEVICE, "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return np.asarray(json.loads(result.output)["outputs"][0]["data"], np.float32).reshape(len(x), -1)


def test_openvino_bundle_served_over_http_and_mqtt(tmp_path, broker, signing_keys, mlp_bundle_factory):
    require_module("openvino", OPENVINO_EXTRA)
    store, port = tmp_path / "store", free_port()
    install(store, signing_keys.public_path,
            [mlp_bundle_factory("mlp-ov", "1", engine="openvino", seed=4), mlp_bundle_factory("mlp", "1")])  # fmt: skip
    config = write_daemon_config(tmp_path / "edge.toml", device_id=DEVICE, store=store,
                                 public_key=signing_keys.public_path, mqtt_port=broker.port, http_port=port)  # fmt: skip
    with serving(config, tmp_path, str(ROOT)) as process:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_ready() and client.is_model_ready("mlp-ov")
        assert client.get_model_metadata("mlp-ov")["platform"] == "openvino"
        x = np.random.default_rng(7).normal(size=(3, 64)).astype(np.float32)
        expected = reference_forward(make_weights(seed=4), x)
        np.testing.assert_allclose(infer_http(port, "mlp-ov", x), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(infer_mqtt(broker, "mlp-ov", x[:1]), expected[:1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            infer_http(port, "mlp", x), reference_forward(make_weights(seed=0), x), rtol=1e-5, atol=1e-6
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        assert "Traceback" not in (process.stderr.read() if process.stderr else "")


def test_device_without_openvino_refuses_that_bundle_only(tmp_path, broker, signing_keys, mlp_bundle_factory):
    blocked = tmp_path / "blocked" / "openvino"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('no openvino on this device')\n")
    store, port = tmp_path / "store", free_port()
    install(store, signing_keys.public_path,
            [mlp_bundle_factory("mlp-ov", "1", engine="openvino"), mlp_bundle_factory("mlp", "1")])  # fmt: skip
    config = write_daemon_config(tmp_path / "edge.toml", device_id=DEVICE, store=store,
                                 public_key=signing_keys.public_path, mqtt_port=broker.port, http_port=port)  # fmt: skip
    probe = Probe(broker)
    probe.subscribe(TOPICS.events)
    try:
        with serving(config, tmp_path, f"{tmp_path / 'blocked'}{os.pathsep}{ROOT}"):
            client = triton.InferenceServerClient(f"127.0.0.1:{port}")
            assert client.is_model_ready("mlp") and not client.is_model_ready("mlp-ov")
            (event,) = probe.on(TOPICS.events)
            refused = json.loads(event.payload)
            assert refused["kind"] == "model_refused" and refused["model"] == "mlp-ov"
            assert "needs the OpenVINO runtime" in refused["reason"]
            assert "pip install 'edge-runtime[openvino]'" in refused["reason"]
            x = np.random.default_rng(8).normal(size=(2, 64)).astype(np.float32)
            np.testing.assert_allclose(infer_mqtt(broker, "mlp", x), reference_forward(make_weights(seed=0), x),
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
            answer = CliRunner().invoke(cli, ["predict", "mlp-ov", "-i", f"{INPUT_NAME}={json.dumps(x.tolist())}",
                                              "--http", f"http://127.0.0.1:{port}"])  # fmt: skip
            assert answer.exit_code == 1 and "needs the OpenVINO runtime" in answer.output, answer.output
    finally:
        probe.close()
