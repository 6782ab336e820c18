"""The composition root: settings -> model store -> registry -> dataplane -> HTTP -> MQTT -> telemetry.

Every other module receives what it needs as arguments; this is the one place that builds them.
`run()` serves until SIGTERM or SIGINT and speaks the systemd notify protocol (READY=1,
WATCHDOG=1, STOPPING=1) on ``$NOTIFY_SOCKET`` with a plain datagram socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edge_runtime.artifact import signing
from edge_runtime.config.profiles import load_profile
from edge_runtime.config.settings import Settings
from edge_runtime.serving.dataplane import DataPlane
from edge_runtime.serving.registry import LoadFailure, ModelRegistry
from edge_runtime.state.store import ModelStore
from edge_runtime.telemetry.health import Health, assess_health
from edge_runtime.telemetry.loop import TelemetryLoop
from edge_runtime.transports.mqtt.topics import DeviceTopics

if TYPE_CHECKING:  # imported in start() only when enabled: a disabled transport costs no memory
    from edge_runtime.state.outbox import Outbox
    from edge_runtime.transports.http.server import HttpServer
    from edge_runtime.transports.mqtt.infer import MqttService
    from edge_runtime.transports.mqtt.link import MqttLink
    from edge_runtime.transports.mqtt.sender import OutboxSender
    from edge_runtime.update.service import UpdateService

__all__ = ["Daemon", "sd_notify"]

log = logging.getLogger(__name__)


def sd_notify(message: str) -> bool:
    """Send one systemd notify message (e.g. "READY=1"); False when not run under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8"), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)
        return False
    return True


def _release_freed_memory() -> None:
    """Give what start-up freed (bundle buffers, ORT's load-time copies) back to the OS; glibc keeps it."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _watchdog_interval() -> float | None:
    """Half the systemd watchdog timeout, in seconds, if this process is the one watched."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


class Daemon:
    """The on-device runtime, built from `Settings`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = DeviceTopics(settings.device_id)
        self.registry: ModelRegistry | None = None
        self.dataplane: DataPlane | None = None
        self.http: HttpServer | None = None
        self.outbox: Outbox | None = None
        self.link: MqttLink | None = None
        self.sender: OutboxSender | None = None
        self.service: MqttService | None = None
        self.telemetry: TelemetryLoop | None = None
        self.store: ModelStore | None = None
        self.updates: UpdateService | None = None
        self.failures: list[LoadFailure] = []
        self._stopping = False
        self._stop = threading.Event()

    @property
    def http_port(self) -> int | None:
        """The port the HTTP API listens on (after start), or None when disabled."""
        return self.http.port if self.http else None

    def health(self) -> Health:
        """The current health state."""
        registry = self.registry
        return assess_health(
            ready=registry is not None and registry.ready,
            serving=len(registry.models()) if registry else 0,
            refused=len(registry.failures()) if registry else 0,
            broker_up=self.link is None or self.link.connected,
            stopping=self._stopping,
        )

    def model_telemetry(self) -> dict[str, Any]:
        """Per model: state, version, requests, errors, latency p50/p95/p99 (refused models with the reason)."""
        if self.registry is None or self.dataplane is None:
            return {}
        served = self.dataplane.metrics.snapshot()["models"]
        models: dict[str, Any] = {}
        for model in self.registry.models():
            counters = served.get(model.name, {})
            same_version = counters.get("version") == model.version
            models[model.name] = {
                "state": "serving",
                "version": model.version,
                "requests": counters.get("requests", 0) if same_version else 0,
                "errors": counters.get("errors", 0) if same_version else 0,
                "latency_ms": counters.get("latency_ms") if same_version else None,
            }
        for failure in self.registry.failures():
            models[failure.name] = {"state": "refused", "version": failure.version, "reason": failure.reason}
        return models

    def start(self) -> None:
        """Load the models and start serving (HTTP at once; MQTT connects in the background)."""
        settings = self.settings
        profile = load_profile(settings.profile)
        store = ModelStore(Path(settings.store), signing.load_public_key(Path(settings.public_key)), profile)
        self.store = store
        self.registry = ModelRegistry(profile)
        self.failures = self.registry.load_all(store)
        self.dataplane = DataPlane(
            self.registry,
            max_request_bytes=settings.max_request_bytes,
            strict_readiness=settings.strict_readiness,
        )
        if settings.http.enabled:
            from edge_runtime.transports.http.server import HttpServer

            self.http = HttpServer(self.dataplane, settings.http.host, settings.http.port)
            self.http.start()
        if settings.mqtt.enabled:
            self._start_mqtt(self.dataplane)
        _release_freed_memory()
        log.info(
            "serving %d model(s), %d refused", len(self.registry.models()), len(self.registry.failures())
        )

    def _start_mqtt(self, dataplane: DataPlane) -> None:
        from edge_runtime.codecs.payloads import EventKind, Presence, encode_event, encode_presence
        from edge_runtime.state.outbox import Outbox
        from edge_runtime.transports.mqtt.infer import MqttService
        from edge_runtime.transports.mqtt.link import MqttLink, Will
        from edge_runtime.transports.mqtt.sender import OutboxSender

        settings, topics = self.settings, self.topics
        self.outbox = outbox = Outbox(Path(settings.outbox.path), settings.outbox.max_records)
        presence = Will(
            topics.status,
            online=encode_presence(Presence.ONLINE, settings.device_id),
            offline=encode_presence(Presence.OFFLINE, settings.device_id),
        )
        self.link = link = MqttLink(settings.mqtt, settings.client_id, presence=presence)
        self.sender = sender = OutboxSender(outbox, link)
        link.add_connection_listener(lambda _connected: sender.notify())
        self.service = service = MqttService(
            dataplane, link, topics, streams=settings.streams, outbox=outbox, on_queued=sender.notify
        )
        service.attach()
        for failure in self.failures:
            event = encode_event(
                EventKind.MODEL_REFUSED, settings.device_id, model=failure.name, version=failure.version,
                reason=failure.reason,
            )  # fmt: skip
            outbox.put(topics.events, event, qos=1)
        self.telemetry = TelemetryLoop(
            settings.device_id,
            topics.telemetry,
            topics.events,
            outbox,
            interval_s=settings.telemetry.interval_s,
            sources={"models": self.model_telemetry, "mqtt": service.stats},
            health=self.health,
            on_queued=sender.notify,
        )
        self._start_updates(link)
        link.start()
        sender.start()
        self.telemetry.start()

    def _start_updates(self, link: MqttLink) -> None:
        """The model-update service on the update topics; unfinished jobs in its journal resume."""
        from edge_runtime.transports.mqtt.update import UpdateChannel
        from edge_runtime.update.service import UpdateService

        assert self.store is not None and self.registry is not None and self.dataplane is not None
        dataplane = self.dataplane
        self.updates = UpdateService(
            self.store, self.registry, UpdateChannel(link, self.topics),
            model_stats=lambda name: dataplane.metrics.snapshot()["models"].get(name),
        )  # fmt: skip
        self.updates.start()

    def stop(self) -> None:
        """Stop in reverse order: telemetry, MQTT (publishing `offline`), outbox, HTTP."""
        self._stopping = True
        if self.telemetry is not None:
            self.telemetry.stop()
        if self.updates is not None:
            self.updates.stop()
        if self.sender is not None:
            self.sender.stop()
        if self.link is not None:
            self.link.stop()
        if self.outbox is not None:
            self.outbox.close()
        if self.http is not None:
            self.http.stop()
        self._stop.set()

    def request_stop(self) -> None:
        """Ask `run()` to stop (thread- and signal-safe)."""
        self._stop.set()

    def run(self) -> int:
        """Start, tell systemd we are ready, serve until SIGTERM/SIGINT, stop cleanly; the exit code."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self._stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            sd_notify(
                f"READY=1\nSTATUS=serving {len(self.registry.models()) if self.registry else 0} model(s)"
            )
            interval = _watchdog_interval()
            while not self._stop.wait(interval):
                sd_notify("WATCHDOG=1")
            sd_notify("STOPPING=1")
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0
