"""Inference serves whatever happens to the outbox: a real daemon process with a damaged outbox file,
and one whose disk is full from the first start (RLIMIT_FSIZE 0), both against a real Mosquitto."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tritonclient.http as triton

from edge_runtime.config.settings import load_settings
from edge_runtime.transports.mqtt.topics import DeviceTopics
from tests.broker import Broker, Probe, broker_fixture, free_port, install_models, write_daemon_config  # noqa: F401 (fixture)
from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, make_weights, reference_forward

DEVICE = "gw-outbox"
TOPICS = DeviceTopics(DEVICE)
ROOT = Path(__file__).resolve().parent.parent


def _no_file_may_grow() -> None:
    """In the child before exec: the kernel refuses to grow any file, as on a full partition."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))


class _Log:
    """The daemon's stderr, read through a pipe (a log file could not grow on a "full disk")."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._reader.start()

    def _read(self, process: subprocess.Popen) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.lines.append(line)

    def text(self) -> str:
        """Everything logged so far."""
        return "".join(self.lines)


@contextmanager
def _daemon(config: Path, tmp_path: Path, preexec: Callable[[], None] | None = None) -> Iterator[_Log]:
    """`edgectl serve` until READY=1; yields its log; SIGTERM (exit 0, no traceback) at the end."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    process = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config)],
                               env=env, stderr=subprocess.PIPE, text=True, preexec_fn=preexec)  # fmt: skip
    log = _Log(process)
    try:
        notify.settimeout(60)
        while not notify.recv(4096).startswith(b"READY=1"):
            pass
        yield log
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        notify.close()
    log._reader.join(10)
    assert "Traceback" not in log.text()


def _config(tmp_path: Path, broker: Broker, keys, profile, factory) -> Path:
    install_models(tmp_path / "store", keys.public_key, profile, [factory("mlp", "1")])
    return write_daemon_config(tmp_path / "edge.toml", device_id=DEVICE, store=tmp_path / "store",
                               public_key=keys.public_path, mqtt_port=broker.port, http_port=free_port(),
                               telemetry_s=0.2)  # fmt: skip


def _infer_over_http(config: Path) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{load_settings(config).http.port}")
    x = np.random.default_rng(4).normal(size=(1, 64)).astype(np.float32)
    tensor = triton.InferInput(INPUT_NAME, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    got = client.infer("mlp", [tensor]).as_numpy(OUTPUT_NAME)
    np.testing.assert_allclose(got, reference_forward(make_weights(seed=0), x), rtol=1e-5, atol=1e-6)


def _probe(broker: Broker) -> Probe:
    probe = Probe(broker)
    probe.subscribe(TOPICS.events)
    probe.subscribe(TOPICS.telemetry)
    return probe


def _first(probe: Probe, topic: str, test: Callable[[dict], bool]) -> dict:
    def match(items: list) -> list[dict]:
        return [doc for doc in (json.loads(i.payload) for i in items if i.topic == topic) if test(doc)]

    return match(probe.wait_for(lambda items: bool(match(items)), timeout=30))[0]


def test_a_damaged_outbox_is_moved_aside_and_the_daemon_serves(
    tmp_path: Path, broker: Broker, signing_keys, device_profile, mlp_bundle_factory
) -> None:
    config = _config(tmp_path, broker, signing_keys, device_profile, mlp_bundle_factory)
    outbox_path = Path(load_settings(config).outbox.path)
    garbage = os.urandom(4096)
    outbox_path.write_bytes(garbage)
    probe = _probe(broker)
    try:
        with _daemon(config, tmp_path) as log:
            _infer_over_http(config)
            event = _first(probe, TOPICS.events, lambda doc: doc["kind"] == "outbox_reset")
            assert event["durable"] is True and "damaged" in event["reason"] and event["key"]
            assert Path(event["moved_to"]).read_bytes() == garbage, "the damaged file is kept, aside"
            record = _first(probe, TOPICS.telemetry, lambda doc: doc["outbox"]["queued"] >= 0)
            assert record["outbox"]["durable"] is True and "outbox in memory only" not in record["faults"]
            assert "moved it to" in log.text()
    finally:
        probe.close()


def test_a_full_disk_at_first_start_serves_with_the_outbox_in_memory(
    tmp_path: Path, broker: Broker, signing_keys, device_profile, mlp_bundle_factory
) -> None:
    config = _config(tmp_path, broker, signing_keys, device_profile, mlp_bundle_factory)
    probe = _probe(broker)
    try:
        with _daemon(config, tmp_path, preexec=_no_file_may_grow) as log:
            _infer_over_http(config)
            event = _first(probe, TOPICS.events, lambda doc: doc["kind"] == "outbox_reset")
            assert event["durable"] is False and "cannot use outbox" in event["reason"]
            record = _first(probe, TOPICS.telemetry, lambda doc: doc["health"] == "degraded")
            assert record["outbox"]["durable"] is False and "outbox in memory only" in record["faults"]
            assert "in memory only" in log.text()
    finally:
        probe.close()
