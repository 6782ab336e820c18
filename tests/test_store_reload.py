"""The daemon as a process: SIGHUP reloads the store while a client keeps sending requests (every
one answered 200), a store full of hostile files still starts and serves health, a missing store
is a clear error."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edge_runtime.state.store import ModelState, ModelStore
from tests.broker import eventually, free_port
from tests.mlp_models import INPUT_NAME, make_weights, reference_forward
from tests.test_registry_hostile import hostile_store

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def write_config(path: Path, store: Path, public_key: Path) -> Path:
    """HTTP only (no broker needed), on a free port."""
    path.write_text(
        f'device_id = "reload"\nprofile = "x86-vnni-gateway"\nstore = "{store}"\npublic_key = "{public_key}"\n'
        f"[http]\nport = {free_port()}\n[mqtt]\nenabled = false\n"
        f'[outbox]\npath = "{path.parent / "outbox.sqlite"}"\n'
    )
    return path


def get(port: int, path: str) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


@contextmanager
def serving(config: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    """`edgectl serve` in a subprocess, once /v2/health/live answers."""
    port = int(config.read_text().split("port = ")[1].split("\n")[0])
    process = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config)],
                               env=ENV, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def live() -> bool:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            return get(port, "/v2/health/live")[0] == 200
        except OSError:
            return False

    try:
        eventually(live, timeout=60, what="the daemon to answer /v2/health/live")
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def stop(process: subprocess.Popen) -> str:
    """SIGTERM, the exit code checked; returns what the daemon logged."""
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    return process.stderr.read() if process.stderr else ""


class Client(threading.Thread):
    """Sends infer requests back to back on one keep-alive connection; records every outcome."""

    def __init__(self, port: int, model: str, x: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.port, self.model = port, model
        body = {"inputs": [{"name": INPUT_NAME, "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}]}  # fmt: skip
        self.body = json.dumps(body).encode()
        self.outcomes: list[tuple[int, str]] = []
        self.last_outputs: dict[str, list[float]] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.halt.is_set():
            try:
                connection.request("POST", f"/v2/models/{self.model}/infer", self.body,
                                   {"Content-Type": "application/json"})  # fmt: skip
                response = connection.getresponse()
                doc = json.loads(response.read())
                self.outcomes.append((response.status, str(doc.get("model_version", doc.get("error")))))
                if response.status == 200:
                    self.last_outputs[doc["model_version"]] = doc["outputs"][0]["data"]
            except (OSError, http.client.HTTPException, ValueError) as exc:  # a dropped request
                self.outcomes.append((0, repr(exc)))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.close()

    def count(self, version: str) -> int:
        return sum(1 for _, v in list(self.outcomes) if v == version)


def test_sighup_swaps_the_active_version_without_failing_a_request(tmp_path, signing_keys, device_profile,
                                                                   mlp_bundle_factory):  # fmt: skip
    store_dir = tmp_path / "store"
    store = ModelStore(store_dir, signing_keys.public_key, device_profile)
    for name, version, seed in (("mlp", "1", 1), ("mlp", "2", 2), ("gone", "1", 3)):
        store.install(mlp_bundle_factory(name, version, seed=seed))
    store.activate("mlp", "1")
    store.activate("gone", "1")
    x = np.random.default_rng(5).normal(size=(1, 64)).astype(np.float32)
    with serving(write_config(tmp_path / "edge.toml", store_dir, signing_keys.public_path)) as (
        process,
        port,
    ):
        client = Client(port, "mlp", x)
        client.start()
        try:
            eventually(lambda: client.count("1") >= 20, timeout=60, what="20 answers from version 1")
            activated = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "store", "activate", "mlp",
                                        "2", "--store", str(store_dir)], env=ENV, capture_output=True,
                                       text=True, timeout=60)  # fmt: skip
            assert activated.returncode == 0, activated.stderr
            store.write_state("gone", ModelState(active=None, previous="1"))
            assert client.count("2") == 0  # nothing changes before the signal
            process.send_signal(signal.SIGHUP)
            eventually(lambda: client.count("2") >= 20, timeout=60, what="20 answers from version 2")
        finally:
            client.halt.set()
            client.join(30)
        assert process.poll() is None, "SIGHUP stopped the daemon"
        statuses = [status for status, _ in client.outcomes]
        versions = [version for _, version in client.outcomes]
        assert statuses.count(200) == len(statuses), [o for o in client.outcomes if o[0] != 200][:5]
        first_new = versions.index("2")
        assert set(versions[:first_new]) == {"1"} and set(versions[first_new:]) == {"2"}
        got = np.asarray(client.last_outputs["2"], np.float32).reshape(1, 10)
        np.testing.assert_allclose(got, reference_forward(make_weights(seed=2), x), rtol=1e-5, atol=1e-6)
        assert get(port, "/v2/models/gone/ready")[0] == 404
        status, health = get(port, "/v2/health/ready")
        assert status == 200 and health["serving"] == ["mlp"]
        log = stop(process)
    assert "reloaded the model store: loaded mlp 2; unloaded gone 1" in log
    assert "Traceback" not in log
    print(f"SIGHUP reload: {len(statuses)} requests, {statuses.count(200)} answered 200, "
          f"{first_new} by version 1 then {len(versions) - first_new} by version 2")  # fmt: skip


def test_a_store_of_hostile_files_still_starts_and_serves_health(tmp_path, signing_keys, device_profile,
                                                                 mlp_bundle_factory):  # fmt: skip
    store_dir = tmp_path / "store"
    store = ModelStore(store_dir, signing_keys.public_key, device_profile)
    expected = hostile_store(store, mlp_bundle_factory, tmp_path)
    with serving(write_config(tmp_path / "edge.toml", store_dir, signing_keys.public_path)) as (
        process,
        port,
    ):
        status, health = get(port, "/v2/health/ready")
        assert status == 503 and health["serving"] == [] and sorted(health["refused"]) == sorted(expected)
        for name, fragment in expected.items():
            assert fragment in health["refused"][name], (name, health["refused"][name])
        store.activate("good", store.install(mlp_bundle_factory("good", "1")).version)
        process.send_signal(signal.SIGHUP)
        eventually(lambda: get(port, "/v2/models/good/ready")[0] == 200, timeout=60, what="good to serve")
        assert sorted(get(port, "/v2/health/ready")[1]["refused"]) == sorted(expected)
        log = stop(process)
    assert "Traceback" not in log and f"serving 0 model(s), {len(expected)} refused" in log


def test_a_missing_store_is_a_clear_error(tmp_path, signing_keys):
    config = write_config(tmp_path / "edge.toml", tmp_path / "unmounted", signing_keys.public_path)
    done = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config)],
                          env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: model store {tmp_path / 'unmounted'} does not exist")
    )
    assert not (tmp_path / "unmounted").exists()
