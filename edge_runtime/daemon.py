"""The composition root: settings -> model store -> registry -> dataplane -> HTTP -> MQTT -> telemetry.

Every other module receives what it needs as arguments; this is the one place that builds them.
`run()` serves until SIGTERM or SIGINT, reloads the model store on SIGHUP, and speaks the systemd
notify protocol (READY=1, WATCHDOG=1, STOPPING=1) on ``$NOTIFY_SOCKET`` with a plain datagram socket.
The watchdog is fed only while every component answers (the HTTP loop runs a callback, the MQTT
link says it is healthy, the outbox sender and telemetry threads run): a dead one stops the pings,
so systemd restarts the daemon, and an ERROR names it.

An unusable outbox never stops the daemon: a damaged file is moved aside for a fresh one (event
``outbox_reset``), and if no file can be created the records are kept in memory (health degraded).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
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
    from edge_runtime.state.outbox_recovery import OutboxReset
    from edge_runtime.telemetry.facts import FactsPublisher
    from edge_runtime.transports.http.server import HttpServer
    from edge_runtime.transports.mqtt.infer import MqttService
    from edge_runtime.transports.mqtt.link import MqttLink
    from edge_runtime.transports.mqtt.sender import OutboxSender
    from edge_runtime.update.service import UpdateService

__all__ = ["Daemon", "sd_notify"]

log = logging.getLogger(__name__)

CHECK_S = 5.0
"""How often components are checked when systemd does not watch the daemon."""
SENDER_STALL_S = 120.0
"""An outbox sender whose loop has not turned for this long is stuck (a hung disk, a deadlock)."""


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
        self.facts_publisher: FactsPublisher | None = None
        self.profile_name = ""
        self.store: ModelStore | None = None
        self.updates: UpdateService | None = None
        self.failures: list[LoadFailure] = []
        self.outbox_reset: OutboxReset | None = None
        """Set when the outbox file was unusable at start (moved aside, or records kept in memory)."""
        self._stopping = False
        self._stop = threading.Event()

    @property
    def http_port(self) -> int | None:
        """The port the HTTP API listens on (after start), or None when disabled."""
        return self.http.port if self.http else None

    def dead_components(self, timeout: float = 1.0) -> list[str]:
        """The started components that do not answer now: http, mqtt, outbox-sender, telemetry."""
        http, link, sender, telemetry = self.http, self.link, self.sender, self.telemetry
        facts = self.facts_publisher
        checks: dict[str, Callable[[], bool]] = {}
        if http is not None:
            checks["http"] = lambda: http.responsive(timeout)
        healthy = getattr(link, "healthy", None)  # MqttLink.healthy(): network thread alive, not stuck
        if link is not None and callable(healthy):
            checks["mqtt"] = healthy
        if sender is not None:
            checks["outbox-sender"] = lambda: sender.alive and time.monotonic() - sender.beat < SENDER_STALL_S
        if telemetry is not None:
            checks["telemetry"] = lambda: telemetry.alive
        if facts is not None:
            checks["facts"] = lambda: facts.alive
        dead = []
        for name, answers in checks.items():
            try:
                ok = bool(answers())
            except Exception:  # a check that fails is a component that does not answer
                log.exception("checking %s failed", name)
                ok = False
            if not ok:
                dead.append(name)
        return dead

    def faults(self) -> list[str]:
        """What makes the daemon unhealthy besides models and broker: dead components, a volatile outbox."""
        faults = [f"{name} not answering" for name in self.dead_components()]
        if self.outbox is not None and not self.outbox.durable:
            faults.append("outbox in memory only")
        return faults

    def health(self) -> Health:
        """The current health state."""
        registry = self.registry
        return assess_health(
            ready=registry is not None and registry.ready,
            serving=len(registry.models()) if registry else 0,
            refused=len(registry.failures()) if registry else 0,
            broker_up=self.link is None or self.link.connected,
            stopping=self._stopping,
            faults=tuple(self.faults()),
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

    def facts(self) -> dict[str, Any]:
        """The retained facts record: profile, groups, health, and each model's version and state."""
        models = {name: {"version": info.get("version"), "state": info.get("state")}
                  for name, info in self.model_telemetry().items()}  # fmt: skip
        return {"profile": self.profile_name, "groups": list(self.settings.groups),
                "health": self.health().value, "models": models}  # fmt: skip

    def start(self) -> None:
        """Load the models and start serving (HTTP at once; MQTT connects in the background)."""
        settings = self.settings
        profile = load_profile(settings.profile)
        self.profile_name = profile.name
        self.registry = ModelRegistry(profile)
        self.store = self._open_store()
        self.failures = self.registry.load_all(self.store)
        self.dataplane = DataPlane(
            self.registry,
            max_request_bytes=settings.max_request_bytes,
            strict_readiness=settings.strict_readiness,
        )
        if settings.http.enabled:
            from edge_runtime.transports.http.server import HttpServer

            self.http = HttpServer(self.dataplane, settings.http)
            self.http.start()
        if settings.mqtt.enabled:
            self._start_mqtt(self.dataplane)
        _release_freed_memory()
        log.info(
            "serving %d model(s), %d refused", len(self.registry.models()), len(self.registry.failures())
        )

    def _open_store(self) -> ModelStore:
        """The model store of the settings; a missing store folder is a UsageError, never created."""
        settings = self.settings
        key = signing.load_public_key(Path(settings.public_key))
        return ModelStore(Path(settings.store), key, load_profile(settings.profile), create=False)

    def reload(self) -> None:
        """Re-read the store (SIGHUP): swap in new active versions, unload inactive ones; never raises."""
        if self.registry is None:
            return
        log.info("reloading the model store %s", self.settings.store)
        try:
            store = self._open_store()
            with store.lock():  # an update's activate-and-swap (under this lock) is seen whole
                report = self.registry.reload(store)
        except Exception as exc:  # a store gone or a key unreadable: keep serving what we have
            log.error("reload refused, still serving what was loaded: %s", exc)
            return
        self.failures = self.registry.failures()
        if self.outbox is None or not report.refused:
            return
        from edge_runtime.codecs.payloads import EventKind, encode_event

        try:
            for failure in report.refused:
                event = encode_event(EventKind.MODEL_REFUSED, self.settings.device_id, model=failure.name,
                                     version=failure.version, reason=failure.reason)  # fmt: skip
                self.outbox.put(self.topics.events, event, qos=1)
        except Exception as exc:  # the outbox's trouble is reported by the outbox; serving goes on
            log.warning("cannot queue the model_refused events of this reload: %s", exc)
        if self.sender is not None:
            self.sender.notify()

    def _on_hangup(self, _signum: int, _frame: FrameType | None) -> None:
        """SIGHUP: reload the store on a thread of its own (the handler itself must stay short)."""
        threading.Thread(target=self.reload, name="store-reload", daemon=True).start()

    def _start_mqtt(self, dataplane: DataPlane) -> None:
        from edge_runtime.codecs.payloads import EventKind, Presence, encode_event, encode_presence
        from edge_runtime.state.outbox_recovery import open_outbox
        from edge_runtime.transports.mqtt.infer import MqttService
        from edge_runtime.transports.mqtt.link import MqttLink, Will
        from edge_runtime.transports.mqtt.sender import OutboxSender

        settings, topics = self.settings, self.topics
        outbox, self.outbox_reset = open_outbox(
            Path(settings.outbox.path), settings.outbox.max_records, max_bytes=settings.outbox.max_bytes
        )
        self.outbox = outbox
        if self.outbox_reset is not None:
            reset = self.outbox_reset
            event = encode_event(
                EventKind.OUTBOX_RESET, settings.device_id, reason=reset.reason, moved_to=reset.moved_to,
                durable=reset.durable,
            )  # fmt: skip
            outbox.put(topics.events, event, qos=1)
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
            sources={"models": self.model_telemetry, "mqtt": service.stats, "faults": self.faults},
            health=self.health,
            on_queued=sender.notify,
            outbox_stats=sender.stats,
        )
        self._start_updates(link)
        facts = self._facts_publisher(link)
        link.start()
        sender.start()
        self.telemetry.start()
        facts.start()

    def _facts_publisher(self, link: MqttLink) -> FactsPublisher:
        """The retained facts record, published after every connect and on every change (not started)."""
        from edge_runtime.telemetry.facts import FactsPublisher

        topic = self.topics.facts
        self.facts_publisher = facts = FactsPublisher(
            self.settings.device_id, compute=self.facts,
            publish=lambda payload: link.publish(topic, payload, qos=1, retain=True),
            epoch=lambda: link.connection_epoch if link.connected else None,
        )  # fmt: skip
        link.add_connection_listener(lambda up: facts.notify() if up else None)
        return facts

    def _start_updates(self, link: MqttLink) -> None:
        """The model-update service on the update topics; unfinished jobs in its journal resume."""
        from edge_runtime.transports.mqtt.update import UpdateChannel
        from edge_runtime.update.service import UpdateService

        assert self.store is not None and self.registry is not None and self.dataplane is not None
        dataplane = self.dataplane
        self.updates = UpdateService(
            self.store, self.registry, UpdateChannel(link, self.topics),
            model_stats=lambda name: dataplane.metrics.snapshot()["models"].get(name),
            transfer=self.settings.update,
        )  # fmt: skip
        self.updates.start()

    def stop(self) -> None:
        """Stop in reverse order: telemetry, outbox sender, MQTT (publishing `offline`), outbox, HTTP."""
        self._stopping = True
        steps = [
            ("telemetry", self.telemetry.stop if self.telemetry else None),
            ("facts", self.facts_publisher.stop if self.facts_publisher else None),
            ("updates", self.updates.stop if self.updates else None),
            ("outbox-sender", self.sender.stop if self.sender else None),
            ("mqtt", self.link.stop if self.link else None),
            ("outbox", self.outbox.close if self.outbox else None),
            ("http", self.http.stop if self.http else None),
        ]
        for name, step in steps:
            try:
                if step is not None:
                    step()
            except Exception:  # one component failing to stop must not keep the others running
                log.exception("stopping %s failed", name)
        self._stop.set()

    def _watch(self, before: list[str], *, feed: bool, timeout: float) -> list[str]:
        """Check every component; ping the watchdog only if all answer; log a change once."""
        dead = self.dead_components(timeout)
        if dead != before:
            if dead:
                consequence = "not feeding the systemd watchdog (systemd restarts the daemon)" if feed else ""
                log.error("not answering: %s; %s", ", ".join(dead), consequence or "no watchdog configured")
                sd_notify(f"STATUS=degraded: {', '.join(dead)} not answering")
            else:
                log.warning("every component answers again")
                sd_notify("STATUS=serving")
        if feed and not dead:
            sd_notify("WATCHDOG=1")
        return dead

    def request_stop(self) -> None:
        """Ask `run()` to stop (thread- and signal-safe)."""
        self._stop.set()

    def run(self) -> int:
        """Start, tell systemd we are ready, serve until SIGTERM/SIGINT, stop cleanly; the exit code."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self._stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
        try:
            self.start()
            sd_notify(
                f"READY=1\nSTATUS=serving {len(self.registry.models()) if self.registry else 0} model(s)"
            )
            interval = _watchdog_interval()
            period = interval if interval is not None else CHECK_S
            dead: list[str] = []
            while not self._stop.wait(period):
                dead = self._watch(dead, feed=interval is not None, timeout=min(max(period / 2, 0.5), 2.0))
            sd_notify("STOPPING=1")
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0
