"""Staged rollouts (`edgectl rollout`) over three real daemons and a real Mosquitto: canary then wave; a
canary whose self-test fails stops everything; a stop rolls back what was installed; a rollout killed
mid-way and re-run finishes without a second job on any device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_runtime.cli import cli
from edge_runtime.cli.rollout import read_devices
from edge_runtime.core.errors import UsageError
from edge_runtime.fleet.devices import FleetView
from edge_runtime.fleet.rollout import DeviceState, Rollout, plan_waves
from tests.broker import Probe, broker_fixture, eventually  # noqa: F401
from tests.fleet_harness import ROOT, retained, start_fleet, stop_fleet, wait_presence

DEVICES = ["gw-1", "gw-2", "gw-3"]


@pytest.fixture
def fleet(broker, tmp_path, signing_keys, device_profile, mlp_bundle_factory):
    daemons = start_fleet(broker, tmp_path / "fleet", signing_keys, device_profile,
                          mlp_bundle_factory("mlp", "1", seed=1), {d: ["line-3"] for d in DEVICES})  # fmt: skip
    yield daemons
    stop_fleet([daemon for daemon in daemons if daemon.process and daemon.process.poll() is None])


def _devices_file(tmp_path: Path) -> Path:
    path = tmp_path / "devices.txt"
    path.write_text("# the line-3 gateways\n" + "\n".join(DEVICES) + "\n\ngw-1  # again\n")
    return path


def _rollout(broker, bundle: Path, state: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["rollout", str(bundle), "--broker", broker.address, "--state", str(state),
                                      "--timeout", "120", *extra])  # fmt: skip
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _serving(broker, device: str) -> str | None:
    facts = retained(broker, f"edge/{device}/facts")
    return None if facts is None else facts["models"]["mlp"]["version"]


def test_canary_then_wave_all_committed(broker, fleet, tmp_path, mlp_bundle_factory):
    state, bundle = tmp_path / "rollout.json", mlp_bundle_factory("mlp", "2", seed=2)
    code, output = _rollout(broker, bundle, state, "--devices", str(_devices_file(tmp_path)), "--canary", "1",
                            "--wave-size", "2")  # fmt: skip
    assert code == 0, output
    lines = output.splitlines()
    canary, wave = lines.index("canary: gw-1"), lines.index("wave 2/2: gw-2, gw-3")
    committed = [i for i, line in enumerate(lines) if line.endswith("mlp 2 committed")]
    assert canary < committed[0] < wave and len(committed) == 3, (
        output
    )  # the canary committed before the wave
    assert lines[-1].startswith("rollout mlp 2: 3 committed; finished")
    journal = json.loads(state.read_text())
    assert journal["devices"] == DEVICES and journal["stopped"] is None
    for daemon in fleet:
        entry = journal["status"][daemon.device]
        report = retained(broker, f"edge/{daemon.device}/update/state/mlp")
        assert (
            entry["state"] == "committed" and report["job"] == entry["job"] and report["state"] == "committed"
        )
        assert daemon.jobs() == [entry["job"]]
        assert _serving(broker, daemon.device) == "2"
    code, output = _rollout(broker, bundle, state, "--devices", str(_devices_file(tmp_path)))
    assert code == 0 and "3 committed; finished" in output and "canary:" not in output  # nothing left to do


def test_group_rollout_of_a_bundle_failing_its_self_test_stops_after_the_canary(
    broker, fleet, tmp_path, mlp_bundle_factory
):
    wrong = mlp_bundle_factory(
        "mlp", "2", seed=2, golden_outputs=lambda x: np.full((x.shape[0], 10), 0.1, np.float32)
    )
    state = tmp_path / "rollout.json"
    code, output = _rollout(broker, wrong, state, "--group", "line-3", "--canary", "1", "--rollback-on-stop")
    assert code == 1, output
    assert "gw-1: mlp 2 rolled_back: trial:" in output and "self-test failed" in output
    assert "stopping: 1 failure(s) (gw-1) after the canary" in output and "wave" not in output
    journal = json.loads(state.read_text())
    assert [journal["status"][d]["state"] for d in DEVICES] == ["rolled_back", "pending", "pending"]
    for daemon in fleet:
        assert _serving(broker, daemon.device) == "1"
    assert [retained(broker, f"edge/{d}/update/state/mlp") for d in ("gw-2", "gw-3")] == [
        None,
        None,
    ]  # never offered
    assert [len(daemon.jobs()) for daemon in fleet] == [1, 0, 0]
    code, output = _rollout(broker, wrong, state, "--group", "line-3")  # a stopped rollout stays stopped
    assert code == 1 and "stopped earlier" in output


def test_a_stop_rolls_back_every_device_the_rollout_installed(broker, fleet, tmp_path, mlp_bundle_factory):
    fleet[2].kill9()
    wait_presence(broker, {"gw-3": "offline"})
    state = tmp_path / "rollout.json"
    code, output = _rollout(broker, mlp_bundle_factory("mlp", "2", seed=2), state, "--devices",
                            str(_devices_file(tmp_path)), "--canary", "1", "--wave-size", "2",
                            "--rollback-on-stop")  # fmt: skip
    assert code == 1, output
    assert "gw-3: failed: offline" in output and "stopping: 1 failure(s) (gw-3) after the wave 2/2" in output
    assert "gw-1: rolled back to mlp 1" in output and "gw-2: rolled back to mlp 1" in output
    journal = json.loads(state.read_text())
    assert [journal["status"][d]["state"] for d in DEVICES] == ["reverted", "reverted", "failed"]
    for device in ("gw-1", "gw-2"):
        eventually(lambda device=device: _serving(broker, device) == "1", timeout=20, what=f"{device} on 1")
        assert retained(broker, f"edge/{device}/update/state/mlp")["reason"] == "operator rollback"


def test_a_rollout_killed_midway_resumes_without_offering_twice(broker, fleet, tmp_path, mlp_bundle_factory):
    bundle = mlp_bundle_factory("mlp", "2", seed=2)
    state = tmp_path / "rollout.json"
    command = [sys.executable, "-m", "edge_runtime.cli", "rollout", str(bundle), "--broker", broker.address,
               "--devices", str(_devices_file(tmp_path)), "--state", str(state), "--canary", "1",
               "--wave-size", "1", "--max-parallel", "1", "--probation", "4", "--timeout", "120"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def gw2_offered() -> bool:
        try:
            return json.loads(state.read_text())["status"]["gw-2"]["state"] == "offered"
        except (OSError, ValueError):
            return False

    try:
        eventually(gw2_offered, timeout=90, what="gw-2 offered")
        eventually(lambda: bool(fleet[1].jobs()), timeout=30, what="gw-2 accepting the job")
    finally:
        first.kill()  # the operator's process dies with gw-2 mid-job (its probation is 4 s)
        first.wait(10)
    before = json.loads(state.read_text())["status"]
    assert before["gw-1"]["state"] == "committed" and before["gw-3"]["state"] == "pending"

    probe = Probe(broker)
    probe.subscribe("edge/+/update/offer")
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    offers = [(item.topic.split("/")[1], json.loads(item.payload)["job"]) for item in probe.received]
    probe.close()
    print(rerun.stdout)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resumed from" in rerun.stdout and "3 committed; finished" in rerun.stdout
    after = json.loads(state.read_text())["status"]
    assert after["gw-1"]["job"] == before["gw-1"]["job"] and after["gw-2"]["job"] == before["gw-2"]["job"]
    assert {device for device, _ in offers} <= {"gw-2", "gw-3"}  # nothing offered to the committed canary
    assert {job for device, job in offers if device == "gw-2"} <= {before["gw-2"]["job"]}  # same job, if any
    for daemon in fleet:
        entry = after[daemon.device]
        assert entry["state"] == "committed"
        assert daemon.jobs() == [entry["job"]]  # one job per device, ever
        assert retained(broker, f"edge/{daemon.device}/update/state/mlp")["job"] == entry["job"]


def test_waves_and_devices_file(tmp_path):
    assert plan_waves(["a", "b", "c", "d", "e"], 1, 2) == [["a"], ["b", "c"], ["d", "e"]]
    assert plan_waves(["a", "b"], 0, 5) == [["a", "b"]]
    assert read_devices(_devices_file(tmp_path)) == DEVICES
    bad = tmp_path / "bad.txt"
    for text, needle in (
        ("gw-1\ngw/2\n", "line 2"),
        ("# nothing\n", "lists no device"),
        (b"\xff", "cannot read"),
    ):
        bad.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(UsageError, match=needle):
            read_devices(bad)


def test_rollout_usage_errors_are_one_line(broker, tmp_path, mlp_bundle_factory):
    bundle = mlp_bundle_factory("mlp", "2", seed=2)
    runner = CliRunner()
    both = runner.invoke(cli, ["rollout", str(bundle), "--broker", broker.address])
    assert both.exit_code == 2 and "give one of --devices FILE or --group NAME" in both.output
    nobody = runner.invoke(cli, ["rollout", str(bundle), "--broker", broker.address, "--group", "none"])
    assert nobody.exit_code == 2 and "no device declares group 'none'" in nobody.output
    state = tmp_path / "other.json"
    state.write_text(
        json.dumps({"bundle_sha256": "0" * 64, "devices": [], "status": {}, "model": "mlp", "version": "9"})
    )
    other = runner.invoke(cli, ["rollout", str(bundle), "--broker", broker.address, "--devices",
                                str(_devices_file(tmp_path)), "--state", str(state)])  # fmt: skip
    assert other.exit_code == 2 and "belongs to another bundle (mlp 9)" in other.output
    assert all("Traceback" not in r.output for r in (both, nobody, other))


def _view(**rows: dict) -> FleetView:
    view = FleetView()
    for device, facts in rows.items():
        view.handle(f"edge/{device}/status", json.dumps({"v": 1, "state": "online", "ts": 1.0}).encode())
        view.handle(f"edge/{device}/facts", json.dumps({"v": 1, "ts": 2.0, **facts}).encode())
    return view


def test_resume_rules_and_the_health_gate_read_the_devices_reports(tmp_path, mlp_bundle_factory, monkeypatch):
    """In-process, no broker: what the journal and the retained reports decide on a re-run, and after a commit."""
    monkeypatch.setattr("edge_runtime.fleet.rollout.HEALTH_WAIT_S", 0.3)
    serving = lambda version, health="running": {  # noqa: E731
        "health": health,
        "models": {"mlp": {"version": version, "state": "serving"}},
    }
    rollout = Rollout("127.0.0.1:1", mlp_bundle_factory("mlp", "2", seed=2).read_bytes(), ["a", "b", "c", "d"],
                      tmp_path / "r.json")  # fmt: skip
    rollout.journal.set("a", DeviceState.OFFERED, job="job-a")
    rollout.journal.set("b", DeviceState.OFFERED, job="job-b")
    view = _view(a=serving("1"), b=serving("1"), c=serving("2"), d=serving("1"))
    report = {
        "v": 1,
        "job": "job-a",
        "model": "mlp",
        "version": "2",
        "state": "rolled_back",
        "reason": "trial: x",
    }
    view.handle("edge/a/update/state/mlp", json.dumps(report).encode())
    view.handle(
        "edge/b/update/state/mlp", json.dumps({**report, "job": "other", "state": "committed"}).encode()
    )
    rollout._reconcile(view)
    states = {device: rollout.journal.state(device).value for device in "abcd"}
    assert states == {"a": "rolled_back", "b": "offered", "c": "already", "d": "pending"}
    assert rollout.journal.entry("b")["job"] == "job-b"  # b keeps its job: the re-run re-attaches to it
    assert json.loads((tmp_path / "r.json").read_text())["status"]["a"]["reason"] == "trial: x"

    rollout.journal.set("d", DeviceState.OFFERED, job="job-d", health_before="running")
    assert rollout._unhealthy("d", _view(d=serving("2"))) is None
    assert "health degraded after the update (was running)" in rollout._unhealthy(
        "d", _view(d=serving("2", "degraded"))
    )
    assert "facts show mlp 1 serving, not 2 serving" in rollout._unhealthy("d", _view(d=serving("1")))
    assert rollout._unhealthy("d", FleetView()) is None  # no facts at all: the device's own probation decides
