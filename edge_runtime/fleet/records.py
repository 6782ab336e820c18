"""What devices publish, decoded into typed records for the collector: strict, bounded, never trusting.

One `decode(topic, payload)` per message. The device comes from the topic (``edge/<id>/...``: the
level a broker ACL confines each device to), never from the payload alone; a payload that names
another device is refused. Every field is checked for type, size and range; anything else raises
`BadRecord` (a `RequestError`) with the reason, which the collector counts and skips.

Telemetry and events carry the outbox's ``key`` (stable across re-deliveries). Status and update
state reports carry none: their key is built from what identifies the report (device, topic, state,
job, ts), so a retained message seen again after a reconnect is the same record.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from edge_runtime.codecs.payloads import PAYLOAD_VERSION
from edge_runtime.core.errors import RequestError, UsageError
from edge_runtime.core.topic_names import check_level

__all__ = [
    "MAX_MODELS",
    "MAX_PAYLOAD_BYTES",
    "BadRecord",
    "ModelSample",
    "Record",
    "RecordKind",
    "decode",
    "subscriptions",
]

MAX_PAYLOAD_BYTES = 256 * 1024
"""Larger payloads are refused unread (a telemetry record is about 1-2 KiB)."""
MAX_MODELS = 256
"""Models one telemetry record may report."""
MAX_TEXT = 256
"""Longest name, version, state, key or reason kept (characters)."""
MAX_COUNT = 2**63 - 1
_TS_RANGE = (0.0, 2.0**34)
"""Plausible UNIX times (1970 to year 2514): the store's REAL columns hold them exactly enough."""


class BadRecord(RequestError):
    """A message on a fleet topic that is not a valid record (the reason says what is wrong)."""


class RecordKind(StrEnum):
    """Which topic a record came from."""

    TELEMETRY = "telemetry"
    EVENT = "event"
    STATUS = "status"
    UPDATE = "update"


@dataclass(frozen=True)
class ModelSample:
    """One model's serving figures in one telemetry record (counters are since the daemon started)."""

    model: str
    version: str | None
    state: str | None
    requests: int | None
    errors: int | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True)
class Record:
    """One stored fact about a device."""

    device: str
    kind: RecordKind
    key: str
    ts: float
    topic: str
    body: str
    """The payload as compact JSON (validated, at most `MAX_PAYLOAD_BYTES`)."""
    state: str | None = None
    """Telemetry: health; event: its kind; status: online/offline; update: the job state."""
    model: str | None = None
    version: str | None = None
    job: str | None = None
    started: float | None = None
    """Telemetry: when the daemon started (counters reset then)."""
    models: tuple[ModelSample, ...] = ()


def subscriptions(share: str | None = None) -> list[str]:
    """The topic filters a collector subscribes to (``$share/<group>/...`` with `share`)."""
    filters = ["edge/+/telemetry", "edge/+/events", "edge/+/status", "edge/+/update/state/+"]
    if share is None:
        return filters
    try:
        check_level(share, "share group")
    except UsageError as exc:
        raise UsageError(f"--share: {exc}") from None
    return [f"$share/{share}/{topic}" for topic in filters]


def _text(doc: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = doc.get(name)
    if value is None:
        if required:
            raise BadRecord(f"'{name}' is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRecord(f"'{name}' must be a string")
    text = str(value)
    if not text or len(text) > MAX_TEXT or not text.isprintable():
        raise BadRecord(f"'{name}' must be 1-{MAX_TEXT} printable characters")
    return text


def _number(doc: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRecord(f"'{name}' must be a number")
    if not (math.isfinite(value) and low <= value <= high):
        raise BadRecord(f"'{name}' {value!r} is out of range")
    return float(value)


def _count(doc: dict[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise BadRecord(f"'{name}' must be a whole number from 0 to 2**63-1")
    return value


def _ts(doc: dict[str, Any]) -> float:
    ts = _number(doc, "ts", *_TS_RANGE)
    if ts is None:
        raise BadRecord("'ts' is missing")
    return ts


def _object(doc: dict[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRecord(f"'{name}' must be an object")
    return value


def _model_sample(name: str, figures: Any) -> ModelSample:
    if not isinstance(figures, dict):
        raise BadRecord(f"models.{name[:40]} must be an object")
    _text({"model": name}, "model")
    latency = _object(figures, "latency_ms")
    return ModelSample(
        model=name,
        version=_text(figures, "version"),
        state=_text(figures, "state"),
        requests=_count(figures, "requests"),
        errors=_count(figures, "errors"),
        p50_ms=_number(latency, "p50", 0.0, 1e9),
        p95_ms=_number(latency, "p95", 0.0, 1e9),
        p99_ms=_number(latency, "p99", 0.0, 1e9),
    )


def _parse(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise BadRecord(f"payload is {len(payload)} bytes, the limit is {MAX_PAYLOAD_BYTES}")
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadRecord(f"payload is not JSON: {str(exc)[:80]}") from None
    if not isinstance(doc, dict):
        raise BadRecord("payload must be a JSON object")
    version = doc.get("v", PAYLOAD_VERSION)
    if type(version) is not int or version != PAYLOAD_VERSION:
        raise BadRecord(f"payload schema v{str(version)[:20]} is not supported (v{PAYLOAD_VERSION} is)")
    return doc


def _route(topic: str) -> tuple[str, RecordKind, str | None]:
    """(device, kind, model) of a fleet topic; BadRecord for any other topic."""
    levels = topic.split("/")
    if len(levels) >= 3 and levels[0] == "edge" and levels[1] and levels[1].isprintable():
        device, rest = levels[1], levels[2:]
        if rest == ["telemetry"]:
            return device, RecordKind.TELEMETRY, None
        if rest == ["events"]:
            return device, RecordKind.EVENT, None
        if rest == ["status"]:
            return device, RecordKind.STATUS, None
        if len(rest) == 3 and rest[:2] == ["update", "state"] and rest[2]:
            return device, RecordKind.UPDATE, rest[2]
    raise BadRecord(f"topic {topic[:80]!r} is not a fleet record topic")


def decode(topic: str, payload: bytes) -> Record:
    """The record a message on a fleet topic carries; BadRecord saying why it is not one."""
    device, kind, topic_model = _route(topic)
    _text({"device": device, "model": topic_model}, "device")
    _text({"model": topic_model}, "model")
    doc = _parse(payload)
    claimed = _text(doc, "device")
    if claimed is not None and claimed != device:
        raise BadRecord(f"payload names device {claimed[:40]!r} on {device[:40]!r}'s topic")
    ts = _ts(doc)
    try:
        body = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    except (ValueError, RecursionError):
        raise BadRecord("payload holds NaN or Infinity, or is nested too deeply") from None
    common: dict[str, Any] = {"device": device, "kind": kind, "ts": ts, "topic": topic, "body": body}
    if kind is RecordKind.TELEMETRY:
        return _telemetry(doc, common)
    if kind is RecordKind.EVENT:
        return Record(
            key=_key(doc),
            state=_text(doc, "kind", required=True),
            model=_text(doc, "model"),
            version=_text(doc, "version"),
            **common,
        )
    if kind is RecordKind.STATUS:
        state = _text(doc, "state", required=True)
        return Record(key=f"{device}/status/{state}/{ts!r}", state=state, **common)
    model = _text(doc, "model") or topic_model
    if model != topic_model:
        raise BadRecord(f"payload names model {str(model)[:40]!r} on {str(topic_model)[:40]!r}'s topic")
    state = _text(doc, "state", required=True)
    job = _text(doc, "job")
    return Record(
        key=f"{device}/update/{model}/{job}/{state}/{ts!r}",
        state=state,
        model=model,
        version=_text(doc, "version"),
        job=job,
        **common,
    )


def _key(doc: dict[str, Any]) -> str:
    key = _text(doc, "key", required=True)
    assert key is not None
    return key


def _telemetry(doc: dict[str, Any], common: dict[str, Any]) -> Record:
    models = _object(doc, "models")
    if len(models) > MAX_MODELS:
        raise BadRecord(f"{len(models)} models in one record, the limit is {MAX_MODELS}")
    return Record(
        key=_key(doc),
        state=_text(doc, "health"),
        started=_number(doc, "started", *_TS_RANGE),
        models=tuple(_model_sample(name, figures) for name, figures in models.items()),
        **common,
    )
