"""A small fleet for the fleet tests: K real daemon processes (`edgectl serve`), each with its own store
holding mlp 1, its own config (groups, a short telemetry interval) and outbox, against one Mosquitto."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.broker import Broker, Probe, install_models, write_daemon_config

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class FleetDaemon:
    """One daemon process; `start()` waits for systemd's READY=1 on a notify socket of its own."""

    device: str
    config: Path
    folder: Path
    process: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.folder / "daemon.log"

    def launch(self) -> socket.socket:
        """Start the process; the notify socket to wait on."""
        path = self.folder / "notify.sock"
        path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(path))
        notify.settimeout(90)
        env = {**os.environ, "NOTIFY_SOCKET": str(path), "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--config",
                                             str(self.config)], env=env, stdout=log, stderr=log)  # fmt: skip
        return notify

    def kill9(self) -> None:
        """SIGKILL: the broker publishes the last will (offline) after 1.5 keep-alives."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after 20 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    @property
    def store(self) -> Path:
        """The model store folder."""
        return self.folder / "store"

    def jobs(self) -> list[str]:
        """The ids of the jobs in the device's own update journal (every job it accepted; finished ones kept)."""
        folder = self.store / ".updates"
        return sorted(path.stem for path in folder.glob("*.json")) if folder.exists() else []


def start_fleet(
    broker: Broker,
    root: Path,
    keys: object,
    profile: object,
    bundle: Path,
    groups: dict[str, list[str]],
    *,
    telemetry_s: float = 1.0,
) -> list[FleetDaemon]:
    """One daemon per entry of `groups` (device id -> its groups), all started, all online."""
    daemons = []
    for device, member_of in groups.items():
        folder = root / device
        folder.mkdir(parents=True)
        install_models(folder / "store", keys.public_key, profile, [bundle])  # type: ignore[attr-defined]
        config = write_daemon_config(folder / "edge.toml", device_id=device, store=folder / "store",
                                     public_key=keys.public_path, mqtt_port=broker.port,  # type: ignore[attr-defined]
                                     telemetry_s=telemetry_s)  # fmt: skip
        config.write_text(f"groups = {json.dumps(member_of)}\n" + config.read_text())
        daemons.append(FleetDaemon(device, config, folder))
    sockets = [daemon.launch() for daemon in daemons]  # started side by side, then waited for
    for notify in sockets:
        try:
            while "READY=1" not in notify.recv(4096).decode():
                pass
        finally:
            notify.close()
    wait_presence(broker, {device: "online" for device in groups})
    return daemons


def wait_presence(broker: Broker, wanted: dict[str, str], timeout: float = 30.0) -> None:
    """Wait until each device's retained presence is the state in `wanted`."""
    probe = Probe(broker)
    try:
        probe.subscribe("edge/+/status")

        def reached(items: list) -> bool:
            last = {item.topic.split("/")[1]: json.loads(item.payload).get("state") for item in items}
            return all(last.get(device) == state for device, state in wanted.items())

        probe.wait_for(reached, timeout)
    finally:
        probe.close()


def stop_fleet(daemons: list[FleetDaemon]) -> None:
    """Stop every daemon; fail if one logged a traceback."""
    for daemon in daemons:
        daemon.stop()
    for daemon in daemons:
        log = daemon.log.read_text(errors="replace") if daemon.log.exists() else ""
        assert "Traceback" not in log, f"{daemon.device}: {log[-3000:]}"


def retained(broker: Broker, topic: str, timeout: float = 5.0) -> dict | None:
    """The retained JSON on `topic` (None when nothing is retained there)."""
    probe = Probe(broker)
    try:
        probe.subscribe(topic)
        deadline = time.monotonic() + min(timeout, 1.0)
        while time.monotonic() < deadline and not probe.received:
            time.sleep(0.05)
        return json.loads(probe.received[-1].payload) if probe.received else None
    finally:
        probe.close()
