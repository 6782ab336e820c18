"""Simulated devices for the collector tests and benchmark: the daemon's own publishing code paths.

Each `SimDevice` has what a daemon uses to publish: an `MqttLink` with the retained presence will,
an SQLite `Outbox`, an `OutboxSender` and a `TelemetryLoop` fed by a real serving `Metrics`;
only the models and the HTTP server are left out. `tick()` queues one telemetry record (the real
payload, with its outbox key), so a test knows exactly which records exist.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from edge_runtime.codecs.payloads import EventKind, Presence, encode_event, encode_presence
from edge_runtime.config.settings import MqttSettings
from edge_runtime.serving.metrics import Metrics
from edge_runtime.state.outbox import Outbox
from edge_runtime.telemetry.health import Health
from edge_runtime.telemetry.loop import TelemetryLoop
from edge_runtime.transports.mqtt.link import MqttLink, Will
from edge_runtime.transports.mqtt.sender import OutboxSender
from edge_runtime.transports.mqtt.topics import DeviceTopics

__all__ = ["SimDevice", "outbox_keys"]


class SimDevice:
    """One device's publishing half, on its own MQTT connection and outbox file."""

    def __init__(self, device_id: str, port: int, directory: Path, *, model: str = "digits") -> None:
        self.device_id = device_id
        self.model = model
        self.topics = DeviceTopics(device_id)
        settings = MqttSettings(host="127.0.0.1", port=port, keepalive=5, reconnect_min_s=0.05,
                                reconnect_max_s=0.5)  # fmt: skip
        presence = Will(
            self.topics.status,
            online=encode_presence(Presence.ONLINE, device_id),
            offline=encode_presence(Presence.OFFLINE, device_id),
        )
        self.link = MqttLink(settings, f"edge-{device_id}", presence=presence)
        self.outbox_path = directory / f"{device_id}-outbox.sqlite"
        self.outbox = Outbox(self.outbox_path, max_records=200_000)
        self.sender = OutboxSender(self.outbox, self.link, window=64)
        self.link.add_connection_listener(lambda _connected: self.sender.notify())
        self.metrics = Metrics()
        self.loop = TelemetryLoop(
            device_id,
            self.topics.telemetry,
            self.topics.events,
            self.outbox,
            interval_s=3600,
            sources={"models": lambda: self.metrics.snapshot()["models"], "mqtt": self.link.stats},
            health=lambda: Health.RUNNING,
            on_queued=self.sender.notify,
        )

    def start(self, timeout: float = 10.0) -> None:
        """Connect and start sending the outbox."""
        self.link.start()
        self.sender.start()
        assert self.link.wait_connected(timeout), f"{self.device_id} could not connect"

    def serve(self, requests: int, latency_s: float, errors: int = 0) -> None:
        """Count `requests` served at `latency_s` each, the last `errors` of them failed."""
        for index in range(requests):
            self.metrics.observe(self.model, "1", latency_s, index < requests - errors)

    def tick(self, count: int = 1) -> None:
        """Queue `count` telemetry records."""
        for _ in range(count):
            self.loop.tick()

    def event(self, reason: str) -> None:
        """Queue a model_refused event."""
        payload = encode_event(
            EventKind.MODEL_REFUSED, self.device_id, model="old", version="3", reason=reason
        )
        self.outbox.put(self.topics.events, payload, qos=1)
        self.sender.notify()

    def drained(self) -> bool:
        """True when the broker acknowledged every queued record."""
        return len(self.outbox) == 0

    def stop(self) -> None:
        """Stop sending, publish offline, disconnect, close the outbox."""
        self.sender.stop()
        self.link.stop()
        self.outbox.close()


def outbox_keys(device: SimDevice) -> set[str]:
    """Every key this device's outbox has given out so far (id + each sequence number up to the last)."""
    db = sqlite3.connect(f"file:{device.outbox_path}?mode=ro", uri=True)
    try:
        last = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
    finally:
        db.close()
    return {f"{device.outbox.id}-{seq}" for seq in range(1, (last[0] if last else 0) + 1)}


def payload_key(payload: bytes) -> str:
    """The key of a JSON payload."""
    return str(json.loads(payload)["key"])
