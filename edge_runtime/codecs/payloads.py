"""Versioned MQTT payloads (``{"v": 1, ...}``): encode and decode, with clear `RequestError`s.

Inference requests are v2-shaped JSON (the KServe Open Inference Protocol request body) plus
optional ``"v"``, ``"reply_to"`` (MQTT 3.1.1 clients) and ``"model_version"``; replies are the v2
response body plus ``"v"``. Tensor decoding and encoding is `codecs.v2`'s, shared with HTTP.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from edge_runtime.codecs.v2 import (
    JsonError,
    decode_infer_document,
    decode_infer_request,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
    json_loads,
)
from edge_runtime.core.errors import (
    EdgeError,
    NotFoundError,
    PayloadTooLarge,
    RequestError,
    UnavailableError,
)
from edge_runtime.core.types import InferRequest, InferResponse, StreamDecoding

__all__ = [
    "PAYLOAD_VERSION",
    "Envelope",
    "EventKind",
    "Presence",
    "decode_json",
    "decode_reply",
    "decode_stream",
    "encode_error",
    "encode_event",
    "encode_facts",
    "encode_presence",
    "encode_reply",
    "encode_request",
    "encode_stream_result",
    "encode_telemetry",
    "read_envelope",
]

PAYLOAD_VERSION = 1


class Presence(StrEnum):
    """The retained state on the status topic."""

    ONLINE = "online"
    OFFLINE = "offline"


class EventKind(StrEnum):
    """What an event on the events topic reports."""

    MODEL_REFUSED = "model_refused"
    """A bundle failed verification, loading or its self-test; the other models keep serving."""
    TELEMETRY_DROPPED = "telemetry_dropped"
    """The outbox hit its bound while the broker was unreachable; the oldest records were dropped."""
    OUTBOX_RESET = "outbox_reset"
    """The outbox file was unusable at start: moved aside for a fresh one, or records kept in memory."""


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


_VERSION_ONLY = _dumps({"v": PAYLOAD_VERSION})


def _with_version(body: bytes, **fields: Any) -> bytes:
    """Prefix a JSON object body with ``"v": 1`` and `fields` (cheap: no re-parse of the tensors)."""
    head = _dumps({"v": PAYLOAD_VERSION, **fields}) if fields else _VERSION_ONLY
    return head[:-1] + b"," + body[1:] if body != b"{}" else head


def decode_json(raw: bytes, *, max_bytes: int) -> dict[str, Any]:
    """A JSON object payload of at most `max_bytes`; its ``"v"``, if present, must be 1."""
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"payload is {len(raw)} bytes, the limit is {max_bytes}")
    try:
        doc = json_loads(raw)
    except JsonError as exc:
        raise RequestError(f"payload is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RequestError("payload must be a JSON object")
    version = doc.get("v", PAYLOAD_VERSION)
    if type(version) is not int or version != PAYLOAD_VERSION:
        raise RequestError(
            f"payload schema v{doc.get('v')} is not supported (this device reads v{PAYLOAD_VERSION})"
        )
    return doc


@dataclass(frozen=True)
class Envelope:
    """The routing part of an inference request: who to answer, and how to correlate."""

    doc: dict[str, Any]
    """The parsed request (parsed once: `request` decodes its tensors from it)."""
    id: str | None
    reply_to: str | None
    """The topic a 3.1.1 client asked for, unchecked (the MQTT transport vets reply topics)."""
    model_version: str | None
    reply_to_error: str | None = None
    """Why ``reply_to`` cannot be used (it was not a string); the reply then goes to the default topic."""

    def request(self, model: str) -> InferRequest:
        """Decode the tensors into an InferRequest for `model`."""
        return decode_infer_document(self.doc, model, self.model_version)


def _optional_str(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise RequestError(f"'{key}' must be a string, got {_brief(value)}")
    return str(value)


def _brief(value: Any) -> str:
    """A short readable form of a JSON value for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} {text[:57]}..."


def read_envelope(raw: bytes, *, max_bytes: int) -> Envelope:
    """Parse an inference request's id, reply_to and model_version (tensors are decoded later).

    A ``reply_to`` that is not a string does not fail the parse: it is reported in `reply_to_error`,
    so the caller can still answer on the default topic with the request's ``id``.
    """
    doc = decode_json(raw, max_bytes=max_bytes)
    request_id = _optional_str(doc, "id")
    reply_to = doc.get("reply_to")
    reply_to_error = None
    if reply_to is not None and not isinstance(reply_to, str):
        reply_to_error = f"'reply_to' must be a string, got {_brief(reply_to)}"
        reply_to = None
    return Envelope(doc, request_id, reply_to, _optional_str(doc, "model_version"), reply_to_error)


def encode_reply(response: InferResponse) -> bytes:
    """A successful inference reply: the v2 response body with ``"v": 1``."""
    body, _ = encode_infer_response(response)
    return _with_version(body)


def encode_request(request: InferRequest, *, reply_to: str | None = None) -> bytes:
    """A client's inference request payload (`reply_to` for MQTT 3.1.1 clients)."""
    body, _ = encode_infer_request(request)
    fields: dict[str, Any] = {"reply_to": reply_to} if reply_to else {}
    if request.version is not None:
        fields["model_version"] = request.version
    return _with_version(body, **fields)


_ERRORS_BY_STATUS: dict[int, type[EdgeError]] = {
    400: RequestError,
    404: NotFoundError,
    413: PayloadTooLarge,
    503: UnavailableError,
}


def decode_reply(raw: bytes) -> InferResponse:
    """A client's view of a reply: the response, or the device's error raised as the matching EdgeError."""
    doc = decode_json(raw, max_bytes=len(raw))
    if "error" in doc:
        status = doc.get("status")
        raise _ERRORS_BY_STATUS.get(status if isinstance(status, int) else 0, EdgeError)(str(doc["error"]))
    return decode_infer_response(raw)


def encode_error(message: str, status: int, request_id: str | None) -> bytes:
    """An error reply: ``{"v": 1, "id": ..., "error": ..., "status": <HTTP-like code>}``."""
    return _dumps({"v": PAYLOAD_VERSION, "id": request_id, "error": message, "status": status})


def encode_presence(state: Presence, device_id: str) -> bytes:
    """The retained status payload."""
    return _dumps(
        {"v": PAYLOAD_VERSION, "device": device_id, "state": state.value, "ts": round(time.time(), 3)}
    )


def encode_facts(device_id: str, facts: dict[str, Any]) -> bytes:
    """The retained facts record: ``{"v": 1, "device": ..., "ts": ..., "profile": ..., "groups": [...],
    "health": ..., "models": {name: {"version": ..., "state": ...}}}``."""
    return _dumps({"v": PAYLOAD_VERSION, "device": device_id, "ts": round(time.time(), 3), **facts})


def encode_telemetry(doc: dict[str, Any]) -> bytes:
    """A telemetry record."""
    return _dumps({"v": PAYLOAD_VERSION, **doc})


def encode_event(kind: EventKind, device_id: str, **fields: Any) -> bytes:
    """An event record: ``{"v": 1, "kind": ..., "device": ..., "ts": ..., ...}``."""
    return _dumps(
        {"v": PAYLOAD_VERSION, "kind": kind.value, "device": device_id, "ts": round(time.time(), 3), **fields}
    )


def encode_stream_result(response: InferResponse, source_topic: str) -> bytes:
    """A stream binding's result: v2 response body with ``"v": 1`` and the topic the input came from."""
    body, _ = encode_infer_response(response)
    return _with_version(body, topic=source_topic, ts=round(time.time(), 3))


def _reshape(array: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """`array` in `shape` (one -1 allowed), or a RequestError naming the sizes."""
    if not shape:
        return array
    if shape.count(-1) > 1 or any(dim < -1 for dim in shape):
        raise RequestError(f"{what}: shape {list(shape)} may hold one -1 and no other negative size")
    fixed = math.prod(dim for dim in shape if dim != -1)
    if (-1 in shape and (fixed == 0 or array.size % fixed)) or (-1 not in shape and array.size != fixed):
        raise RequestError(f"{what}: {array.size} values do not fit shape {list(shape)}")
    return array.reshape(shape)


def decode_stream(
    raw: bytes,
    *,
    model: str,
    decoding: StreamDecoding,
    input_name: str,
    dtype: str,
    shape: tuple[int, ...],
    max_bytes: int,
) -> InferRequest:
    """A stream payload (JSON array, raw little-endian tensor, or v2 request) as an InferRequest."""
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"payload is {len(raw)} bytes, the limit is {max_bytes}")
    if decoding is StreamDecoding.V2:
        return decode_infer_request(raw, model, None)
    target = np.dtype(dtype)
    if decoding is StreamDecoding.RAW:
        if len(raw) % target.itemsize:
            raise RequestError(f"raw payload of {len(raw)} bytes is not a whole number of {dtype} values")
        array = np.frombuffer(raw, dtype=target.newbyteorder("<")).astype(target)
    else:
        try:
            values = np.array(json_loads(raw))
        except (JsonError, ValueError) as exc:  # ValueError: a ragged list
            raise RequestError(f"payload is not a JSON array of numbers: {exc}") from None
        if values.dtype.kind not in "biuf" or values.ndim == 0:
            raise RequestError("payload must be a JSON (nested) array of numbers")
        array = values.astype(target)
    return InferRequest(model=model, inputs={input_name: _reshape(array, shape, f"input '{input_name}'")})
