"""The fleet view (`edgectl devices`): real daemons, a real Mosquitto; presence, facts, groups, the last
will after kill -9, versions after an update, hostile payloads, and `--watch` ending on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.cli import cli
from edge_runtime.client.flash import flash, prepare
from edge_runtime.config.settings import parse_settings
from edge_runtime.core.errors import UsageError
from edge_runtime.fleet.devices import FleetView
from edge_runtime.telemetry.facts import FactsPublisher
from tests.broker import Probe, broker_fixture, eventually  # noqa: F401
from tests.fleet_harness import ROOT, start_fleet, stop_fleet, wait_presence

GROUPS = {"gw-a": ["line-3", "canary"], "gw-b": ["line-3"], "gw-c": []}


def _devices(broker, *extra: str) -> list[dict]:
    result = CliRunner().invoke(
        cli, ["devices", "--broker", broker.address, "--json", "--wait", "1.5", *extra]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_view_shows_each_device_offline_after_kill_and_versions_after_update(
    broker, tmp_path, signing_keys, device_profile, mlp_bundle_factory
):
    fleet = start_fleet(broker, tmp_path / "fleet", signing_keys, device_profile,
                        mlp_bundle_factory("mlp", "1", seed=1), GROUPS)  # fmt: skip
    try:
        rows = {row["device"]: row for row in _devices(broker)}
        assert sorted(rows) == sorted(GROUPS)
        for device, groups in GROUPS.items():
            row = rows[device]
            assert (
                row["online"] is True and row["profile"] == "x86-vnni-gateway" and row["health"] == "running"
            )
            assert row["groups"] == groups and row["models"]["mlp"] == {"version": "1", "state": "serving"}
            assert row["last_seen"] is not None
        assert [row["device"] for row in _devices(broker, "--group", "line-3")] == ["gw-a", "gw-b"]
        assert [row["device"] for row in _devices(broker, "--group", "canary")] == ["gw-a"]

        fleet[2].kill9()  # the broker publishes gw-c's last will after 1.5 keep-alives (5 s)
        wait_presence(broker, {"gw-c": "offline"})
        result = flash(broker.address, "gw-a", prepare(mlp_bundle_factory("mlp", "2", seed=2).read_bytes()),
                       timeout=60)  # fmt: skip
        assert result.state == "committed", result.reason
        eventually(lambda: {r["device"]: r for r in _devices(broker)}["gw-a"]["models"]["mlp"]["version"] == "2",
                   timeout=20, what="gw-a's facts showing mlp 2")  # fmt: skip
        rows = {row["device"]: row for row in _devices(broker)}
        assert rows["gw-c"]["online"] is False and rows["gw-a"]["online"] is True
        assert rows["gw-a"]["updates"]["mlp"]["state"] == "committed"
        assert rows["gw-b"]["models"]["mlp"]["version"] == "1"
        table = CliRunner().invoke(cli, ["devices", "--broker", broker.address, "--wait", "1"])
        assert table.exit_code == 0
        lines = {line.split()[0]: line for line in table.output.splitlines()[1:-1]}
        assert "online" in lines["gw-a"] and "mlp 2" in lines["gw-a"] and "offline" in lines["gw-c"]
        assert table.output.splitlines()[-1] == "3 device(s), 2 online"
    finally:
        stop_fleet(fleet[:2])


HOSTILE = [
    ("edge/h1/status", b"not json"),
    ("edge/h2/status", json.dumps({"v": 2, "state": "online"}).encode()),
    ("edge/h3/status", json.dumps({"v": 1, "state": ["online"]}).encode()),
    ("edge/h4/facts", json.dumps({"v": 1, "models": [1, 2], "groups": "x", "health": {"a": 1}}).encode()),
    (
        "edge/h5/facts",
        json.dumps({"v": 1, "models": {"m": {"version": "x" * 100_000}}, "ts": 1e300}).encode(),
    ),
    ("edge/h6/facts", b"[" * 5000 + b"]" * 5000),
    ("edge/h7/telemetry", b"\xff\xfe\x00"),
    ("edge/h8/update/state/m", json.dumps({"v": 1, "state": {"x": 1}, "job": None}).encode()),
    ("edge/h9/facts", b"{" + b'"a":1,' * 60_000 + b'"v":1}'),
    ("edge/h10/status", json.dumps({"v": 1, "state": "online", "ts": "soon"}).encode()),
]


def test_hostile_payloads_never_crash_the_view(broker):
    probe = Probe(broker)
    for topic, payload in HOSTILE:
        probe.publish(topic, payload, retain=True)
    probe.publish("edge/good/status", json.dumps({"v": 1, "device": "good", "state": "online", "ts": 1.0}).encode(),
                  retain=True)  # fmt: skip
    probe.close()
    result = CliRunner().invoke(cli, ["devices", "--broker", broker.address, "--wait", "1"])
    assert result.exit_code == 0 and result.exception is None, result.output
    assert "malformed message(s) ignored" in result.output
    rows = {row["device"]: row for row in _devices(broker)}
    assert (
        rows["good"]["online"] is True and rows["h10"]["online"] is True and rows["h10"]["last_seen"] is None
    )
    assert len(rows["h5"]["models"]["m"]["version"]) == 128  # capped, not 100 000 characters
    assert rows["h4"]["models"] == {} and rows["h4"]["groups"] == [] and rows["h4"]["health"] is None
    assert "h1" not in rows and "h6" not in rows and "h9" not in rows  # nothing usable arrived from them


@settings(max_examples=300, deadline=None)
@given(
    topic=st.sampled_from(
        ["edge/d/status", "edge/d/facts", "edge/d/telemetry", "edge/d/update/state/m", "x/y"]
    ),
    doc=st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=20,
    ),
)
def test_any_json_on_the_fleet_topics_is_folded_or_counted(topic, doc):
    view = FleetView()
    payload = json.dumps({"v": 1, "data": doc, **(doc if isinstance(doc, dict) else {})}, allow_nan=True)
    view.handle(topic, payload.encode())
    view.handle(topic, payload.encode()[:-3])
    rows = view.rows()
    assert len(rows) <= 1 and view.rejected >= 1
    json.dumps([row.to_dict() for row in rows])  # whatever was kept can be printed


def test_watch_refreshes_until_ctrl_c_and_exits_0(broker, tmp_path):
    probe = Probe(broker)
    probe.publish("edge/w1/status", json.dumps({"v": 1, "device": "w1", "state": "online", "ts": 1.0}).encode(),
                  retain=True)  # fmt: skip
    out = tmp_path / "watch.out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(out, "wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "devices", "--broker", broker.address,
                                    "--watch", "0.3", "--wait", "0.5"], stdout=sink, stderr=subprocess.STDOUT,
                                   env=env)  # fmt: skip
    try:
        eventually(lambda: out.read_text().count("device(s)") >= 2, timeout=30, what="two refreshes")
        probe.publish("edge/w2/status", json.dumps({"v": 1, "state": "offline"}).encode(), retain=True)
        eventually(lambda: "2 device(s), 1 online" in out.read_text(), timeout=30, what="a refresh with w2")
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
    finally:
        probe.close()
        if process.poll() is None:
            process.kill()
    text = out.read_text()
    assert "Traceback" not in text and "interrupted" not in text


def test_groups_in_the_settings():
    base = 'device_id = "d"\nprofile = "x86-vnni-gateway"\nstore = "s"\npublic_key = "k"\n'
    assert parse_settings(base + 'groups = ["line-3", "canary"]\n', "t").groups == ("line-3", "canary")
    assert parse_settings(base, "t").groups == ()
    for bad in ('groups = ["a/b"]', 'groups = ["+"]', "groups = [1]", 'groups = "line-3"'):
        try:
            parse_settings(base + bad + "\n", "t")
        except UsageError as exc:
            assert "groups" in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")


def test_facts_are_published_on_change_and_after_each_reconnect():
    facts = {"health": "running", "models": {"mlp": {"version": "1", "state": "serving"}}}
    epoch: list[int | None] = [None]
    sent: list[dict] = []
    publisher = FactsPublisher("d", compute=lambda: json.loads(json.dumps(facts)),
                               publish=lambda raw: sent.append(json.loads(raw)), epoch=lambda: epoch[0])  # fmt: skip
    assert publisher.check() is False and sent == []  # not connected: nothing
    epoch[0] = 1
    assert publisher.check() is True and publisher.check() is False
    facts["models"]["mlp"]["version"] = "2"
    assert publisher.check() is True
    epoch[0] = 2  # reconnected: the broker may have lost the retained copy
    assert publisher.check() is True and publisher.check() is False
    assert [doc["models"]["mlp"]["version"] for doc in sent] == ["1", "2", "2"]
    assert all(doc["v"] == 1 and doc["device"] == "d" and doc["ts"] > 0 for doc in sent)
