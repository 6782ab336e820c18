"""`edgectl flash` against several devices (in-process update services on a real Mosquitto): the cap on
parallel transfers, deltas against what each device reports, and readable errors for bad arguments."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from click.testing import CliRunner

from edge_runtime.cli import cli
from edge_runtime.config.settings import MqttSettings
from edge_runtime.serving.registry import ModelRegistry
from edge_runtime.state.store import ModelStore
from edge_runtime.transports.mqtt.link import MqttLink
from edge_runtime.transports.mqtt.topics import DeviceTopics
from edge_runtime.transports.mqtt.update import UpdateChannel
from edge_runtime.update.service import UpdateService
from tests.broker import Broker, Probe, broker_fixture  # noqa: F401 (fixture)


@contextlib.contextmanager
def device(
    broker: Broker, name: str, root: Path, keys, profile, bundles: list[Path]
) -> Iterator[ModelRegistry]:
    """A device without HTTP: store, registry and the update service over its own MQTT link."""
    store = ModelStore(root, keys.public_key, profile)
    for bundle in bundles:
        manifest = store.install(bundle)
        store.activate(manifest.name, manifest.version)
    registry = ModelRegistry(profile)
    registry.load_all(store)
    link = MqttLink(MqttSettings(host="127.0.0.1", port=broker.port, reconnect_min_s=0.1), f"dev-{name}")
    service = UpdateService(
        store, registry, UpdateChannel(link, DeviceTopics(name)), model_stats=lambda n: None
    )
    service.start()
    link.start()
    assert link.wait_connected(10)
    try:
        yield registry
    finally:
        service.stop()
        link.stop()


def test_several_devices_with_a_cap_and_deltas(
    broker, tmp_path, signing_keys, device_profile, mlp_bundle_factory
):
    v1 = mlp_bundle_factory("mlp", "1", seed=1)
    v2 = mlp_bundle_factory("mlp", "2", seed=1)  # same weights, new version: the delta is tiny
    probe = Probe(broker)
    for name in ("dev-a", "dev-b"):
        probe.subscribe(f"edge/{name}/update/jobs/+/get")
        probe.subscribe(DeviceTopics(name).update_state("mlp"))
    args = ["flash", str(v2), "--device", "dev-a", "--device", "dev-b", "--broker", broker.address,
            "--max-parallel", "1", "--delta-from", str(v1), "--block-size", "1024"]  # fmt: skip
    with (
        device(broker, "dev-a", tmp_path / "a", signing_keys, device_profile, [v1]) as reg_a,
        device(broker, "dev-b", tmp_path / "b", signing_keys, device_profile, [v1]) as reg_b,
    ):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert reg_a.get("mlp").version == "2" and reg_b.get("mlp").version == "2"
    for name in ("dev-a", "dev-b"):
        line = next(
            line for line in result.output.splitlines() if line.startswith(f"{name}: mlp 2 committed (")
        )
        assert "(delta" in line and "0 re-sent" in line
    # --max-parallel 1: the second device asked for its first block only after the first committed
    events = []
    for item in probe.received:
        device_id = item.topic.split("/")[1]
        if item.topic.endswith("/get"):
            events.append((device_id, "get"))
        elif json.loads(item.payload).get("state") == "committed":
            events.append((device_id, "committed"))
    probe.close()
    first = events[0][0]
    second = "dev-b" if first == "dev-a" else "dev-a"
    assert events.index((first, "committed")) < events.index((second, "get"))


def test_flash_errors_are_one_line(broker, tmp_path, mlp_bundle_factory):
    runner = CliRunner()
    bundle = str(mlp_bundle_factory("mlp", "2"))
    cases = [
        (["flash", bundle, "--device", "d", "--broker", "nope"], 2, "must be HOST:PORT"),
        (
            ["flash", bundle, "--device", "d", "--broker", broker.address, "--max-p95-ms", "5"],
            2,
            "--probation",
        ),
        (["flash", str(tmp_path), "--device", "d", "--broker", broker.address], 2, "is a directory"),
        (["models", "--device", "nobody", "--broker", broker.address, "--timeout", "0.5"], 1, "no answer"),
        (
            ["flash", bundle, "--device", "nobody", "--broker", broker.address, "--timeout", "1"],
            1,
            "did not finish",
        ),
    ]
    for args, code, message in cases:
        result = runner.invoke(cli, args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
