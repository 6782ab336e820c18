"""Model updates end to end: a real daemon process, a real Mosquitto, `edgectl flash|models|rollback`,
real ONNX bundles; broker restarts, kill -9, refused bundles, traffic during the update, bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from click.testing import CliRunner

from edge_runtime.cli import cli
from edge_runtime.client.flash import FlashResult, flash, prepare
from edge_runtime.codecs.update_payloads import BlockRequest, encode_block
from edge_runtime.config.profiles import load_profile
from edge_runtime.config.settings import load_settings
from edge_runtime.transports.mqtt.topics import DeviceTopics
from tests.broker import Broker, Probe, broker_fixture, free_port, install_models, write_daemon_config  # noqa: F401
from tests.conftest import make_keys
from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, make_weights, reference_forward
from tests.update_harness import NORMAL, hostile_offer, rewrite_member, signature_of

DEVICE = "gw-update"
TOPICS = DeviceTopics(DEVICE)
ROOT = Path(__file__).resolve().parent.parent
SIZES = (64, 32, 10)


class DaemonProcess:
    """`edgectl serve` in a subprocess that can be stopped, killed with SIGKILL and started again."""

    def __init__(self, config: Path, tmp_path: Path) -> None:
        self.config = config
        self.notify_path = tmp_path / "notify.sock"
        self.process: subprocess.Popen | None = None
        self.http_port = load_settings(config).http.port
        self.log = tmp_path / "daemon.log"

    def start(self) -> None:
        self.notify_path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(self.notify_path))
        notify.settimeout(60)
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--config",
                                             str(self.config)], env=env, stdout=log, stderr=log)  # fmt: skip
        try:
            while "READY=1" not in notify.recv(4096).decode():
                pass
        finally:
            notify.close()

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def serving(self, sizes: dict[str, tuple[int, int, int]] | None = None) -> str:
        """The version of mlp that answers an HTTP request now, checked against its own weights."""
        client = triton.InferenceServerClient(f"127.0.0.1:{self.http_port}")
        x = np.random.default_rng(7).normal(size=(2, SIZES[0])).astype(np.float32)
        tensor = triton.InferInput(INPUT_NAME, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("mlp", [tensor])
        version = result.get_response()["model_version"]
        seed = {"1": 1, "2": 2}[version]
        weights = make_weights(*(sizes or {}).get(version, SIZES), seed=seed)
        np.testing.assert_allclose(result.as_numpy(OUTPUT_NAME), reference_forward(weights, x),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
        return version


@pytest.fixture
def store_dir(tmp_path, signing_keys, device_profile, mlp_bundle_factory) -> Path:
    store = tmp_path / "store"
    install_models(store, signing_keys.public_key, device_profile, [mlp_bundle_factory("mlp", "1", seed=1)])
    return store


@pytest.fixture
def daemon(tmp_path, broker, signing_keys, store_dir) -> Iterator[DaemonProcess]:
    config = write_daemon_config(tmp_path / "edge.toml", device_id=DEVICE, store=store_dir,
                                 public_key=signing_keys.public_path, mqtt_port=broker.port,
                                 http_port=free_port())  # fmt: skip
    process = DaemonProcess(config, tmp_path)
    process.start()
    _wait_online(broker)
    yield process
    process.stop()
    log = process.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def _wait_online(broker: Broker) -> None:
    probe = Probe(broker)
    try:
        probe.subscribe(TOPICS.status)
        probe.wait_for(lambda items: any(json.loads(i.payload).get("state") == "online" for i in items), 30)
    finally:
        probe.close()


def _flash_cli(broker: Broker, bundle: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["flash", str(bundle), "--device", DEVICE, "--broker", broker.address,
                                      "--timeout", "120", *extra])  # fmt: skip
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_full_update_then_models_and_rollback(daemon, broker, mlp_bundle_factory, store_dir):
    code, output = _flash_cli(broker, mlp_bundle_factory("mlp", "2", seed=2))
    assert code == 0, output
    assert f"{DEVICE}: mlp 2 committed" in output
    assert daemon.serving() == "2"
    late = Probe(broker)  # a late subscriber sees where the device stands
    late.subscribe(TOPICS.update_state("mlp"))
    (retained,) = late.on(TOPICS.update_state("mlp"))
    late.close()
    report = json.loads(retained.payload)
    assert (
        retained.retain and report["v"] == 1 and report["state"] == "committed" and report["version"] == "2"
    )

    runner = CliRunner()
    listing = runner.invoke(cli, ["models", "--device", DEVICE, "--broker", broker.address])
    assert listing.exit_code == 0, listing.output
    assert "mlp: serving 2; active 2, previous 1; installed: 1 (previous), 2 (active)" in listing.output
    assert "last update: 2 committed" in listing.output
    back = runner.invoke(cli, ["rollback", "mlp", "--device", DEVICE, "--broker", broker.address])
    assert back.exit_code == 0 and "mlp rolled back to 1 (was 2)" in back.output
    assert daemon.serving() == "1"
    unknown = runner.invoke(cli, ["rollback", "nosuch", "--device", DEVICE, "--broker", broker.address])
    assert unknown.exit_code == 2 and "refused" in unknown.output and "Traceback" not in unknown.output


def test_broker_restart_mid_transfer_resumes(daemon, broker, mlp_bundle_factory):
    big = (SIZES[0], 1024, SIZES[2])
    bundle = mlp_bundle_factory("mlp", "2", seed=2, sizes=big).read_bytes()
    prepared = prepare(bundle, block_size=1024, compression="none")
    assert prepared.offer.blocks > 200
    watcher = Probe(broker)  # sees the blocks go by; the restart lands in the middle of a window
    watcher.subscribe(TOPICS.update_block_filter, qos=0)
    restarted_at: list[int] = []

    def restart_midway() -> None:
        watcher.wait_for(lambda items: len(items) >= prepared.offer.blocks // 2, timeout=60)
        restarted_at.append(len(watcher.received))
        broker.stop()  # whatever is in flight is lost
        time.sleep(1.0)  # both sides notice the broker is gone
        broker.start()

    chaos = threading.Thread(target=restart_midway)
    chaos.start()
    result = flash(broker.address, DEVICE, prepared, timeout=120)
    chaos.join(30)
    watcher.close()
    assert restarted_at and restarted_at[0] < prepared.offer.blocks, restarted_at  # mid-transfer
    assert result.state == "committed", result.reason
    print(f"broker restarted after {restarted_at[0]} blocks: {result.blocks_resent} blocks sent twice, "
          f"{result.duplicates} received twice")  # fmt: skip
    assert result.duplicates <= 16, f"the device received {result.duplicates} blocks twice"
    assert result.blocks_sent == prepared.offer.blocks + result.blocks_resent
    assert result.blocks_resent <= 16, f"{result.blocks_resent} blocks sent twice; the window is 16"
    assert daemon.serving({"2": big}) == "2"


@pytest.mark.parametrize(
    "kill_at", ["downloading", "verifying", "installing", "trial", "committing", "probation"]
)
def test_kill_9_in_each_state_comes_back_old_or_new(kill_at, daemon, broker, mlp_bundle_factory, store_dir):
    prepared = prepare(mlp_bundle_factory("mlp", "2", seed=2).read_bytes(), block_size=1024,
                       probation=_probation(2.0))  # fmt: skip
    killed = threading.Event()
    seen: list[str] = []

    def progress(result: FlashResult, report: dict) -> None:
        seen.append(str(report.get("state")))
        if report.get("state") == kill_at and not killed.is_set():
            daemon.kill9()
            killed.set()

    outcome: list[FlashResult] = []
    host = threading.Thread(target=lambda: outcome.append(flash(broker.address, DEVICE, prepared, timeout=120,
                                                                progress=progress)))  # fmt: skip
    host.start()
    deadline = time.monotonic() + 60
    while not killed.is_set() and time.monotonic() < deadline and host.is_alive():
        time.sleep(0.02)
    assert killed.is_set(), f"never saw {kill_at}: {seen}"
    journal = json.loads((store_dir / ".updates" / f"{prepared.offer.job}.json").read_text())
    order = [state.value for state in NORMAL]
    assert order.index(journal["state"]) >= order.index(kill_at) and journal["state"] != "committed"
    print(f"killed at report '{kill_at}', journal in '{journal['state']}'")
    daemon.start()
    assert daemon.serving() in ("1", "2")  # the old or the new one, checked against its weights
    host.join(120)
    assert outcome and outcome[0].state == "committed", (journal["state"], outcome)
    assert daemon.serving() == "2"


def _probation(seconds: float, **rules: float):
    from edge_runtime.codecs.update_payloads import Probation

    return Probation(seconds=seconds, **rules)  # type: ignore[arg-type]


def test_golden_self_test_failure_is_rolled_back_and_reported(daemon, broker, mlp_bundle_factory):
    wrong = mlp_bundle_factory(
        "mlp", "2", seed=2, golden_outputs=lambda x: np.full((x.shape[0], 10), 0.1, np.float32)
    )
    code, output = _flash_cli(broker, wrong)
    assert code == 1, output
    assert "mlp 2 rolled_back: trial:" in output and "self-test failed" in output
    assert daemon.serving() == "1"


@pytest.mark.parametrize("kind", ["tampered", "wrong_key", "wrong_profile"])
def test_refused_bundles_leave_the_running_version(
    kind, daemon, broker, mlp_bundle_factory, tmp_path, store_dir
):
    if kind == "tampered":
        good = mlp_bundle_factory("mlp", "2", seed=2).read_bytes()
        bad = rewrite_member(good, "model.onnx", lambda data: data[:-4] + b"\x00\x00\x80\x7f")
        result = flash(broker.address, DEVICE, hostile_offer(bad, signature=signature_of(good)), timeout=60)
        assert result.state == "failed" and "sha256" in result.reason
    else:
        other = {"keys": make_keys(tmp_path / "other")} if kind == "wrong_key" else {}
        profile = {"profile": load_profile("raspberry-pi-4")} if kind == "wrong_profile" else {}
        code, output = _flash_cli(broker, mlp_bundle_factory("mlp", "2", seed=2, **other, **profile))
        assert code == 1 and "mlp 2 failed: verifying:" in output, output
        assert ("signature" if kind == "wrong_key" else "built for") in output
    assert daemon.serving() == "1"
    assert sorted(p.name for p in (store_dir / "mlp").iterdir()) == ["1", "state.json"]


def test_unsigned_bundle_is_refused_before_sending(broker, mlp_bundle_factory, tmp_path):
    from tests.update_harness import without_member

    unsigned = tmp_path / "unsigned.edgebundle"
    unsigned.write_bytes(without_member(mlp_bundle_factory("mlp", "2").read_bytes(), "manifest.sig"))
    code, output = _flash_cli(broker, unsigned)
    assert code == 2 and "not a signed bundle" in output


def test_requests_during_an_update_all_succeed(daemon, broker, mlp_bundle_factory):
    x = np.random.default_rng(3).normal(size=(1, SIZES[0])).astype(np.float32)
    stop = threading.Event()
    counts = {"http_ok": 0, "http_failed": 0, "mqtt_sent": 0}
    versions: set[str] = set()

    def http_loop() -> None:
        client = triton.InferenceServerClient(f"127.0.0.1:{daemon.http_port}")
        tensor = triton.InferInput(INPUT_NAME, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        while not stop.is_set():
            try:
                versions.add(client.infer("mlp", [tensor]).get_response()["model_version"])
                counts["http_ok"] += 1
            except Exception:
                counts["http_failed"] += 1

    probe = Probe(broker)
    probe.subscribe(TOPICS.reply("mlp"))
    body = {
        "inputs": [
            {"name": INPUT_NAME, "shape": [1, SIZES[0]], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }

    def mqtt_loop() -> None:
        while not stop.is_set():
            counts["mqtt_sent"] += 1
            probe.publish(TOPICS.infer("mlp"), json.dumps({"id": f"r{counts['mqtt_sent']}", **body}).encode())
            time.sleep(0.005)

    workers = [threading.Thread(target=http_loop), threading.Thread(target=mqtt_loop)]
    for worker in workers:
        worker.start()
    try:
        code, output = _flash_cli(broker, mlp_bundle_factory("mlp", "2", seed=2))
        time.sleep(0.3)  # requests keep flowing after the swap too
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)
    assert code == 0, output
    replies = probe.wait_for(lambda items: len(items) >= counts["mqtt_sent"], timeout=30)
    probe.close()
    answers = [json.loads(item.payload) for item in replies]
    assert counts["http_failed"] == 0 and counts["http_ok"] > 20
    assert [a for a in answers if "error" in a] == []
    assert sorted(int(a["id"][1:]) for a in answers) == list(range(1, counts["mqtt_sent"] + 1))
    assert versions == {"1", "2"} and {a["model_version"] for a in answers} <= {"1", "2"}


def test_probation_rollback(daemon, broker, mlp_bundle_factory):
    stop = threading.Event()

    def traffic() -> None:
        x = np.zeros((1, SIZES[0]), np.float32)
        client = triton.InferenceServerClient(f"127.0.0.1:{daemon.http_port}")
        tensor = triton.InferInput(INPUT_NAME, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        while not stop.is_set():
            client.infer("mlp", [tensor])
            time.sleep(0.01)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:  # any measured latency is over a p95 limit of 1 ns
        code, output = _flash_cli(broker, mlp_bundle_factory("mlp", "2", seed=2), "--probation", "30",
                                  "--max-p95-ms", "0.000001", "--min-requests", "5")  # fmt: skip
    finally:
        stop.set()
        worker.join(10)
    assert code == 1, output
    assert "mlp 2 rolled_back: probation: p95 latency" in output
    assert daemon.serving() == "1"


def _errors(probe: Probe, count: int) -> list[dict]:
    got = probe.on(TOPICS.update_errors, count=count, timeout=20)
    return [json.loads(item.payload) for item in got]


def test_bad_input_is_reported_and_changes_nothing(daemon, broker, mlp_bundle_factory, store_dir):
    probe = Probe(broker)
    probe.subscribe(TOPICS.update_errors)
    # unknown model
    code, output = _flash_cli(broker, mlp_bundle_factory("other", "1"))
    assert code == 1 and "not on this device" in output and "--new" in output
    # an offer over the device's bound
    big = prepare(mlp_bundle_factory("mlp", "3", seed=2).read_bytes(), block_size=1024)
    doc = json.loads(big.offer.encode())
    doc.update(size=2**40, job="too-big")
    probe.publish(TOPICS.update_offer, json.dumps(doc).encode())
    # malformed
    probe.publish(TOPICS.update_offer, b'{"v": 1, "job": "x"')
    probe.publish(TOPICS.update_offer, json.dumps({"v": 2, "job": "future"}).encode())
    errors = sorted(_errors(probe, 4), key=lambda e: str(e["job"]))  # two MQTT workers: any order
    by_text = " | ".join(e["error"] for e in errors)
    assert "not on this device" in by_text and "not valid JSON" in by_text and "schema v2" in by_text
    (big_error,) = [e for e in errors if e["job"] == "too-big"]
    assert "'size' must be a number from 1" in big_error["error"]

    # two offers for the same model at once: the first one waits for blocks nobody serves
    first = prepare(mlp_bundle_factory("mlp", "2", seed=2).read_bytes(), block_size=1024, job="first")
    second = prepare(mlp_bundle_factory("mlp", "2", seed=2).read_bytes(), block_size=1024, job="second")
    probe.subscribe(TOPICS.update_get("first"))
    probe.publish(TOPICS.update_offer, first.offer.encode())
    probe.on(TOPICS.update_get("first"))
    probe.publish(TOPICS.update_offer, second.offer.encode())
    assert any("already running (job first)" in e["error"] for e in _errors(probe, 5)[4:])
    # a block out of range, a damaged block, a block for a job nobody offered
    probe.publish(TOPICS.update_block("first"), encode_block(10_000, b"x" * 1024))
    probe.publish(TOPICS.update_block("first"), encode_block(0, b"y" * 1024))
    probe.publish(TOPICS.update_block("nobody"), encode_block(0, b"z"))
    stray = " | ".join(e["error"] for e in _errors(probe, 8)[5:])
    assert "out of range" in stray and "does not match its sha256" in stray and "does not know" in stray
    assert daemon.serving() == "1"
    assert sorted(p.name for p in (store_dir / "mlp").iterdir()) == ["1", "state.json"]
    probe.close()


def test_a_block_for_a_finished_job_is_reported(daemon, broker, mlp_bundle_factory):
    prepared = prepare(mlp_bundle_factory("mlp", "2", seed=2).read_bytes(), block_size=1024)
    assert flash(broker.address, DEVICE, prepared, timeout=60).state == "committed"
    probe = Probe(broker)
    probe.subscribe(TOPICS.update_errors)
    probe.publish(TOPICS.update_block(prepared.offer.job), encode_block(0, prepared.blocks[0]))
    (error,) = _errors(probe, 1)
    assert error["job"] == prepared.offer.job and "which is committed" in error["error"]
    probe.close()
    assert daemon.serving() == "2"
    assert BlockRequest.of("j", [3, 5, 17]).indices() == [3, 5, 17]


def test_an_offer_larger_than_the_free_space_is_refused(broker, store_dir, signing_keys, device_profile,
                                                       mlp_bundle_factory):  # fmt: skip
    """In-process (the reserve is a service knob): the device keeps all but the update's bytes free."""
    import shutil

    from edge_runtime.config.settings import MqttSettings
    from edge_runtime.serving.registry import ModelRegistry
    from edge_runtime.state.store import ModelStore
    from edge_runtime.transports.mqtt.link import MqttLink
    from edge_runtime.transports.mqtt.update import UpdateChannel
    from edge_runtime.update.service import TransferSettings, UpdateService

    store = ModelStore(store_dir, signing_keys.public_key, device_profile)
    registry = ModelRegistry(device_profile)
    registry.load_all(store)
    topics = DeviceTopics("gw-small-disk")
    link = MqttLink(MqttSettings(host="127.0.0.1", port=broker.port), "gw-small-disk")
    reserve = shutil.disk_usage(store_dir).total  # more than can ever be free: any update eats into it
    service = UpdateService(store, registry, UpdateChannel(link, topics), model_stats=lambda name: None,
                            transfer=TransferSettings(reserve_bytes=reserve))  # fmt: skip
    service.start()
    link.start()
    try:
        assert link.wait_connected(10)
        result = flash(broker.address, "gw-small-disk", prepare(mlp_bundle_factory("mlp", "2").read_bytes()),
                       timeout=30)  # fmt: skip
    finally:
        service.stop()
        link.stop()
    assert (
        result.state == "failed"
        and "bytes in the model store" in result.reason
        and "are free" in result.reason
    )
    assert store.versions("mlp") == ["1"] and registry.get("mlp").version == "1"
    assert list((store_dir / ".updates").iterdir()) == []
