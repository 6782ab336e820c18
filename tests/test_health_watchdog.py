"""The systemd watchdog is fed only while every component answers: a real daemon process with a
NOTIFY_SOCKET and WATCHDOG_USEC, one component killed inside it, and the WATCHDOG=1 pings stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.broker import Broker, Probe, broker_fixture, eventually, install_models, write_daemon_config  # noqa: F401 (fixture)

DEVICE = "gw-watchdog"
ROOT = Path(__file__).resolve().parent.parent
WATCHDOG_USEC = 1_000_000
"""systemd's WatchdogSec=1: the daemon pings every half second while healthy."""

# Test harness, not product code: the daemon as `edgectl serve` runs it, plus a SIGUSR1 handler that
# kills one component the way a bug would (the HTTP loop stops, a thread returns).
HARNESS = textwrap.dedent(
    """
    import logging, signal, sys
    from edge_runtime.config.settings import load_settings
    from edge_runtime.daemon import Daemon

    daemon = Daemon(load_settings(sys.argv[1]))

    def stop_http_loop():
        loop = daemon.http._loop
        loop.call_soon_threadsafe(loop.stop)

    faults = {
        "http": stop_http_loop,
        "outbox-sender": lambda: daemon.sender.stop(timeout=0),
        "telemetry": lambda: daemon.telemetry.stop(timeout=0),
    }
    signal.signal(signal.SIGUSR1, lambda *_: faults[sys.argv[2]]())
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    sys.exit(daemon.run())
    """
)


def _datagrams(sock: socket.socket, timeout: float) -> list[str]:
    """Every notify message that arrives within `timeout` seconds of the previous one."""
    sock.settimeout(timeout)
    seen = []
    try:
        while True:
            seen.append(sock.recv(4096).decode())
    except TimeoutError:
        return seen


def _until(sock: socket.socket, predicate, timeout: float = 60.0) -> list[str]:
    sock.settimeout(timeout)
    seen: list[str] = []
    while not predicate(seen):
        seen.append(sock.recv(4096).decode())
    return seen


@pytest.mark.parametrize("component", ["http", "outbox-sender", "telemetry"])
def test_a_dead_component_stops_the_watchdog_pings(
    tmp_path: Path, broker: Broker, signing_keys, device_profile, mlp_bundle_factory, component: str
) -> None:
    install_models(
        tmp_path / "store", signing_keys.public_key, device_profile, [mlp_bundle_factory("mlp", "1")]
    )
    config = write_daemon_config(tmp_path / "edge.toml", device_id=DEVICE, store=tmp_path / "store",
                                 public_key=signing_keys.public_path, mqtt_port=broker.port,
                                 telemetry_s=0.2)  # fmt: skip
    probe = Probe(broker)
    probe.subscribe(f"edge/{DEVICE}/telemetry")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
           "WATCHDOG_USEC": str(WATCHDOG_USEC)}  # fmt: skip
    env.pop("WATCHDOG_PID", None)
    log = tmp_path / "daemon.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", HARNESS, str(config), component], env=env, stderr=stderr
        )
    try:
        before = _until(notify, lambda seen: sum(m == "WATCHDOG=1" for m in seen) >= 3)
        assert any(m.startswith("READY=1") for m in before), "READY=1 comes before the pings"
        assert next(m for m in before if "READY=1" in m or m == "WATCHDOG=1").startswith("READY=1")

        process.send_signal(signal.SIGUSR1)
        eventually(lambda: f"not answering: {component}" in log.read_text(), timeout=30, what="the ERROR")
        line = next(line for line in log.read_text().splitlines() if "not answering" in line)
        assert line.startswith("ERROR") and "systemd restarts the daemon" in line
        _datagrams(notify, timeout=0.0001)  # the pings sent before the failure was seen
        after = _datagrams(notify, timeout=3.0)  # six ping intervals
        assert "WATCHDOG=1" not in after, after
        assert process.poll() is None, "the daemon keeps serving what it can; systemd does the restart"
        if component == "http":  # telemetry still flows, and says what is wrong
            probe.wait_for(
                lambda items: any(
                    f"{component} not answering" in json.loads(i.payload).get("faults", [])
                    and json.loads(i.payload)["health"] == "degraded"
                    for i in items
                )
            )
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(20)
        notify.close()
        probe.close()
    assert code == 0 and "Traceback" not in log.read_text()
