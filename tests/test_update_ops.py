"""Operating updates on a real daemon process and a real Mosquitto: the device config's [update]
table, cancelling a stuck download, SIGHUP reloads during an update, and MQTT 3.1.1 end to end."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

from click.testing import CliRunner

from edge_runtime.cli import cli
from edge_runtime.client.flash import FlashResult, flash, prepare
from edge_runtime.codecs.update_payloads import MAX_WINDOW, decode_block_request, encode_block
from edge_runtime.config.settings import UpdateSettings, parse_settings
from edge_runtime.update.steps import FREE_SPACE_MARGIN
from tests import test_update_flash as flash_tests
from tests.broker import Broker, Probe, broker_fixture, free_port, write_daemon_config  # noqa: F401 (fixture)
from tests.test_update_flash import DEVICE, TOPICS, DaemonProcess, _wait_online

ROOT = Path(__file__).resolve().parent.parent
store_dir = flash_tests.store_dir  # the fixtures: a store with mlp 1 active, a daemon serving it
daemon = flash_tests.daemon


def _start(
    tmp_path: Path, broker: Broker, keys, store: Path, *, extra: str = "", mqtt: str = ""
) -> DaemonProcess:
    config = write_daemon_config(tmp_path / "edge.toml", device_id=DEVICE, store=store,
                                 public_key=keys.public_path, mqtt_port=broker.port, http_port=free_port(),
                                 extra=extra)  # fmt: skip
    if mqtt:
        config.write_text(config.read_text().replace("[mqtt]\n", f"[mqtt]\n{mqtt}\n", 1))
    process = DaemonProcess(config, tmp_path)
    process.start()
    _wait_online(broker)
    return process


def _stop(process: DaemonProcess) -> None:
    process.stop()
    log = process.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def test_update_settings_defaults_match_the_service_and_bad_values_are_one_line(tmp_path):
    assert UpdateSettings().reserve_bytes == FREE_SPACE_MARGIN
    head = 'device_id = "d"\nprofile = "x86-vnni-gateway"\nstore = "s"\npublic_key = "k"\n[update]\n'
    assert parse_settings(head + "window = 64\nsave_bytes = 8388608\n", "t.toml").update.window == 64
    cases = {
        "window = 0": "update.window must be from 1 to 256, got 0",
        f"window = {MAX_WINDOW + 1}": f"update.window must be from 1 to {MAX_WINDOW}, got {MAX_WINDOW + 1}",
        "save_bytes = -1": "update.save_bytes must be from 1",
        "stall_s = 5.0\ngive_up_s = 1.0": "update.give_up_s must be from 5",
        'window = "wide"': "update.window must be an integer",
        "windw = 4": "unknown key 'update.windw'",
    }
    for line, expected in cases.items():
        config = tmp_path / "bad.toml"
        config.write_text(head + line + "\n")
        result = CliRunner().invoke(cli, ["serve", "--config", str(config)])
        assert result.exit_code == 2, (line, result.output)
        (message,) = result.output.strip().splitlines()  # one readable line
        assert message.startswith("error: ") and expected in message and "Traceback" not in message


def test_cancel_ends_a_stuck_download_and_the_window_comes_from_the_config(
    tmp_path, broker, signing_keys, store_dir, mlp_bundle_factory
):
    daemon = _start(tmp_path, broker, signing_keys, store_dir, extra="[update]\nwindow = 4\nstall_s = 0.3\n")
    try:
        prepared = prepare(mlp_bundle_factory("mlp", "2", seed=2).read_bytes(), block_size=1024, job="stuck")
        probe = Probe(broker)  # plays a host that offers, sends two blocks, then goes silent
        probe.subscribe(TOPICS.update_get("stuck"))
        probe.subscribe(TOPICS.update_state("mlp"))
        probe.publish(TOPICS.update_offer, prepared.offer.encode())
        probe.on(TOPICS.update_get("stuck"))
        for index in (0, 1):
            probe.publish(TOPICS.update_block("stuck"), encode_block(index, prepared.blocks[index]))
        gets = probe.on(TOPICS.update_get("stuck"), count=4, timeout=20)  # asked again: nobody serves
        assert max(len(decode_block_request(get.payload).indices()) for get in gets) == 4  # [update] window
        part = store_dir / ".updates" / "stuck.part"
        assert part.is_file()

        runner = CliRunner()
        done = runner.invoke(cli, ["cancel", "mlp", "--device", DEVICE, "--broker", broker.address])
        assert done.exit_code == 0, done.output
        assert f"{DEVICE}: mlp 2 failed: downloading: cancelled by operator (job stuck)" in done.output
        assert not part.exists()
        journal = json.loads((store_dir / ".updates" / "stuck.json").read_text())
        assert journal["state"] == "failed" and journal["reason"] == "downloading: cancelled by operator"
        reports = probe.wait_for(lambda items: any(b'"failed"' in i.payload for i in items), timeout=10)
        (failed,) = [json.loads(i.payload) for i in reports if b'"failed"' in i.payload]
        assert failed["job"] == "stuck" and "cancelled by operator" in failed["reason"]
        probe.close()
        assert daemon.serving() == "1"
        assert sorted(p.name for p in (store_dir / "mlp").iterdir()) == ["1", "state.json"]

        again = runner.invoke(cli, ["cancel", "mlp", "--device", DEVICE, "--broker", broker.address])
        assert again.exit_code == 2 and "no update of 'mlp' is running" in again.output
        # the model is free again: the same version is offered anew and commits
        result = flash(broker.address, DEVICE, prepare(mlp_bundle_factory("mlp", "2", seed=2).read_bytes(),
                                                       block_size=1024), timeout=60)  # fmt: skip
        assert result.state == "committed", result.reason
        assert daemon.serving() == "2"
        late = runner.invoke(cli, ["cancel", "mlp", "--device", DEVICE, "--broker", broker.address])
        assert late.exit_code == 2 and "no update of 'mlp' is running" in late.output
    finally:
        _stop(daemon)


def test_sighup_reloads_during_an_update_and_a_rollback_keep_store_and_serving_in_line(
    daemon, broker, mlp_bundle_factory, store_dir
):
    pid = daemon.process.pid if daemon.process else 0
    stop, sent = threading.Event(), [0]

    def storm() -> None:  # a reload every 10 ms, whatever state the update is in
        while not stop.is_set():
            os.kill(pid, signal.SIGHUP)
            sent[0] += 1
            time.sleep(0.01)

    seen: list[str] = []

    def progress(result: FlashResult, report: dict) -> None:
        seen.append(str(report.get("state")))
        os.kill(pid, signal.SIGHUP)  # and one as each state is reported

    hup = threading.Thread(target=storm)
    hup.start()
    try:
        prepared = prepare(mlp_bundle_factory("mlp", "2", seed=2).read_bytes(), block_size=1024)
        result = flash(broker.address, DEVICE, prepared, timeout=120, progress=progress)
        assert result.state == "committed", result.reason
        assert daemon.serving() == "2"
        back = CliRunner().invoke(cli, ["rollback", "mlp", "--device", DEVICE, "--broker", broker.address])
        assert back.exit_code == 0, back.output
        assert daemon.serving() == "1"
    finally:
        stop.set()
        hup.join(10)
    assert {"downloading", "trial", "committing", "committed"} <= set(seen), seen
    os.kill(pid, signal.SIGHUP)  # one last reload of a quiet store: it serves what the store says
    time.sleep(0.5)
    state = json.loads((store_dir / "mlp" / "state.json").read_text())
    assert state["active"] == "1" and state["previous"] == "2"
    assert daemon.serving() == "1"
    log = daemon.log.read_text(errors="replace")
    assert sent[0] > 10 and log.count("reloaded the model store") > 10
    assert "reload refused" not in log


def test_an_update_end_to_end_over_mqtt_311(tmp_path, signing_keys, store_dir, mlp_bundle_factory):
    (tmp_path / "b311").mkdir()
    broker = Broker(tmp_path / "b311")
    with broker.config.open("a") as handle:  # the log names each client's protocol (p2: 3.1.1, p5: 5)
        handle.write("log_type notice\nconnection_messages true\n")
    broker.start()
    daemon = _start(tmp_path, broker, signing_keys, store_dir, mqtt='protocol = "3.1.1"\nfallback = false')
    try:
        bundle = mlp_bundle_factory("mlp", "2", seed=2)
        v311 = ["--broker", broker.address, "--mqtt-protocol", "3.1.1"]
        runner = CliRunner()
        done = runner.invoke(cli, ["flash", str(bundle), "--device", DEVICE, *v311, "--timeout", "120"])
        assert done.exit_code == 0 and f"{DEVICE}: mlp 2 committed" in done.output, done.output
        assert daemon.serving() == "2"
        listing = runner.invoke(cli, ["models", "--device", DEVICE, *v311])
        assert "mlp: serving 2; active 2, previous 1" in listing.output, listing.output
    finally:
        _stop(daemon)
        broker.stop()
    log = (tmp_path / "b311" / "mosquitto.log").read_text()
    levels = dict(re.findall(r"as (\S+) \(p(\d)", log))
    assert levels.get(f"edge-{DEVICE}") == "2", log
    ours = {client: level for client, level in levels.items() if client.startswith("edgectl-")}
    assert any(c.startswith("edgectl-flash-") for c in ours) and set(ours.values()) == {"2"}, levels


def test_a_sighup_reload_waits_for_an_update_holding_the_store_lock(
    tmp_path, signing_keys, device_profile, store_dir, mlp_bundle_factory
):
    """The update activates and swaps under the store lock; a reload in between would read the new
    state.json and could swap a version the update is about to leave. The reload waits instead."""
    from edge_runtime.daemon import Daemon
    from edge_runtime.serving.registry import ModelRegistry
    from edge_runtime.state.store import ModelStore

    settings = parse_settings(
        f'device_id = "d"\nprofile = "x86-vnni-gateway"\nstore = "{store_dir}"\n'
        f'public_key = "{signing_keys.public_path}"\n[mqtt]\nenabled = false\n',
        "t.toml",
    )
    store = ModelStore(store_dir, signing_keys.public_key, device_profile)
    store.install(mlp_bundle_factory("mlp", "2", seed=2))
    device = Daemon(settings)
    device.registry = registry = ModelRegistry(device_profile)
    registry.load_all(store)
    reload = threading.Thread(target=device.reload)
    with store.lock():  # what the commit step holds: activate, then swap
        store.activate("mlp", "2")
        reload.start()
        reload.join(0.5)
        assert reload.is_alive(), "the reload ran while the update held the store lock"
        registry.swap("mlp", store.open("mlp", "2"))
        store.activate("mlp", "1")  # ... and a probation failure rolls back before the lock goes
        registry.swap("mlp", store.open("mlp", "1"))
    reload.join(30)
    assert not reload.is_alive() and registry.get("mlp").version == "1" == store.state("mlp").active
