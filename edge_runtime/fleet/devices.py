"""The fleet view: one row per device from what devices publish (presence, facts, telemetry, update reports).

`FleetView` subscribes to ``edge/+/status``, ``edge/+/facts`` and ``edge/+/update/state/+``
(retained: the whole fleet arrives at once) and ``edge/+/telemetry`` (the latest record of each
device, if one arrives while we listen). Every payload is untrusted: it is parsed with a size bound,
each field is type-checked and length-capped, anything else is counted in `rejected` and dropped;
the number of devices held is bounded too.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from edge_runtime.client.broker import Broker
from edge_runtime.codecs.payloads import decode_json
from edge_runtime.core.errors import EdgeError
from edge_runtime.transports.mqtt.topics import device_of, fleet_filter

__all__ = ["DeviceRow", "FleetView", "fleet_snapshot", "watch_fleet"]

MAX_PAYLOAD_BYTES = 256 << 10
MAX_DEVICES = 100_000
MAX_MODELS = 64
MAX_GROUPS = 32
_MAX_TEXT = 128
FILTERS = ("status", "facts", "telemetry", "update/state/+")


def _text(value: Any) -> str | None:
    """A short printable string from an untrusted value, or None."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    text = "".join(char if char.isprintable() else "?" for char in str(value)[:_MAX_TEXT])
    return text or None


def _ts(value: Any) -> float | None:
    """A plausible epoch timestamp, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value) if 0 < value < 1e11 else None


@dataclass
class DeviceRow:
    """What the fleet knows about one device."""

    device: str
    online: bool | None = None
    """From the retained presence (None: no presence seen)."""
    profile: str | None = None
    groups: tuple[str, ...] = ()
    health: str | None = None
    models: dict[str, dict[str, str | None]] = field(default_factory=dict)
    """Model -> {"version", "state"} (facts, or the latest telemetry record, whichever is newer)."""
    updates: dict[str, dict[str, str | None]] = field(default_factory=dict)
    """Model -> the last update report: {"version", "state", "job", "reason"}."""
    last_seen: float | None = None
    """The newest timestamp of anything the device published (its offline will excluded)."""
    _models_ts: float = 0.0

    def seen(self, ts: float | None) -> None:
        """Note a timestamp the device published."""
        if ts is not None and (self.last_seen is None or ts > self.last_seen):
            self.last_seen = ts

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON-ready data."""
        return {
            "device": self.device, "online": self.online, "profile": self.profile, "groups": list(self.groups),
            "health": self.health, "models": self.models, "updates": self.updates, "last_seen": self.last_seen,
        }  # fmt: skip


def _models(value: Any) -> dict[str, dict[str, str | None]] | None:
    if not isinstance(value, dict):
        return None
    models: dict[str, dict[str, str | None]] = {}
    for name, info in list(value.items())[:MAX_MODELS]:
        if isinstance(info, dict) and _text(name):
            models[str(_text(name))] = {
                "version": _text(info.get("version")),
                "state": _text(info.get("state")),
            }
    return models


class FleetView:
    """The rows of every device heard from; `handle` takes one message (thread-safe, never raises)."""

    def __init__(self) -> None:
        self.rejected = 0
        """Messages dropped as malformed (not JSON, wrong types, too large, too many devices)."""
        self._rows: dict[str, DeviceRow] = {}
        self._lock = threading.Lock()

    def rows(self, group: str | None = None) -> list[DeviceRow]:
        """Copies of the rows, sorted by device id (only members of `group` when given)."""
        with self._lock:
            rows = [
                replace(row, models=dict(row.models), updates=dict(row.updates))
                for row in self._rows.values()
            ]
        return sorted((r for r in rows if group is None or group in r.groups), key=lambda r: r.device)

    def get(self, device: str) -> DeviceRow | None:
        """A copy of one device's row, or None if nothing was heard from it."""
        with self._lock:
            row = self._rows.get(device)
            return None if row is None else replace(row, models=dict(row.models), updates=dict(row.updates))

    def handle(self, topic: str, payload: bytes) -> None:
        """Fold one message into the rows; a malformed one is counted and dropped."""
        try:
            self._handle(topic, payload)
        except (EdgeError, ValueError, TypeError, RecursionError):
            with self._lock:
                self.rejected += 1

    def _row(self, device: str) -> DeviceRow:
        row = self._rows.get(device)
        if row is None:
            if len(self._rows) >= MAX_DEVICES:
                raise ValueError("too many devices")
            row = self._rows[device] = DeviceRow(device)
        return row

    def _handle(self, topic: str, payload: bytes) -> None:
        where = device_of(topic)
        if where is None or not _text(where[0]) or len(where[0]) > _MAX_TEXT:
            raise ValueError(f"not a device topic: {topic[:80]!r}")
        device, rest = where
        if not payload:  # a retained message cleared
            return
        doc = decode_json(payload, max_bytes=MAX_PAYLOAD_BYTES)
        ts = _ts(doc.get("ts"))
        with self._lock:
            row = self._row(device)
            if rest == "status":
                state = doc.get("state")
                if state not in ("online", "offline"):
                    raise ValueError("presence state must be online or offline")
                row.online = state == "online"
                if row.online:
                    row.seen(ts)
            elif rest in ("facts", "telemetry"):
                self._state(row, doc, ts, facts=rest == "facts")
            elif rest.startswith("update/state/"):
                model = _text(rest.removeprefix("update/state/"))
                if model is None or (model not in row.updates and len(row.updates) >= MAX_MODELS):
                    raise ValueError("bad or too many update reports")
                row.updates[model] = {
                    key: _text(doc.get(key)) for key in ("version", "state", "job", "reason")
                }
                row.seen(ts)

    def _state(self, row: DeviceRow, doc: dict[str, Any], ts: float | None, *, facts: bool) -> None:
        models = _models(doc.get("models"))
        row.health = _text(doc.get("health")) or row.health
        if models is not None and (ts or 0.0) >= row._models_ts:
            row.models, row._models_ts = models, ts or 0.0
        if facts:
            row.profile = _text(doc.get("profile")) or row.profile
            groups = doc.get("groups")
            if isinstance(groups, list):
                row.groups = tuple(str(g) for g in (_text(g) for g in groups[:MAX_GROUPS]) if g)
        row.seen(ts)


@contextlib.contextmanager
def watch_fleet(
    broker: Broker | str, *, telemetry: bool = True, connect_timeout: float = 10.0
) -> Iterator[FleetView]:
    """A view kept current while the block runs (subscribed to the fleet topics; telemetry optional)."""
    view = FleetView()
    link = Broker.of(broker).link(
        "devices", workers=1, queue_size=1 << 16
    )  # retained bursts: queue, never shed
    for suffix in FILTERS if telemetry else tuple(f for f in FILTERS if f != "telemetry"):
        link.subscribe(fleet_filter(suffix), lambda m: view.handle(m.topic, m.payload), qos=1,
                       max_bytes=MAX_PAYLOAD_BYTES)  # fmt: skip
    link.start()
    try:
        link.require_connected(connect_timeout)  # a TLS or credential refusal: one line at once
        yield view
    finally:
        link.stop(timeout=1.0)


def fleet_snapshot(
    broker: Broker | str,
    *,
    wait_s: float = 1.5,
    on_view: Callable[[FleetView], None] | None = None,
    every_s: float = 2.0,
    stop: threading.Event | None = None,
) -> FleetView:
    """Listen to the fleet topics for `wait_s` seconds and return what arrived (retained state at once).

    With `on_view`, keep listening and call it with the view every `every_s` seconds until `stop` is
    set (a watch ended by a signal handler) or `on_view` raises.
    """
    stop = stop or threading.Event()
    with watch_fleet(broker) as view:
        if stop.wait(wait_s):
            return view
        while on_view is not None:
            on_view(view)
            if stop.wait(every_s):
                break
    return view
