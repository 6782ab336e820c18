"""Versioned (``"v": 1``) payloads of the model-update flow, shared by the device and `edgectl flash`.

Every JSON payload is an object with ``"v": 1``; a block is binary (a 4-byte magic that carries the
version, the block index, the block's bytes). Decoders refuse anything out of bounds with a
`RequestError` that says which field is wrong, so one bad message costs one error report.

The offer names the bundle (model, version, size, sha256, signature) and the *payload* the device
pulls block by block: the bundle itself or a bsdiff4 delta against a version the device has, cut in
``block_size`` pieces, each optionally zstd-compressed on the wire, each pinned by its sha256.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from edge_runtime.core.errors import PayloadTooLarge, RequestError

__all__ = [
    "BLOCK_MAGIC",
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "UPDATE_PAYLOAD_VERSION",
    "BlockRequest",
    "Command",
    "CommandOp",
    "Compression",
    "Delta",
    "DeltaFormat",
    "Offer",
    "Probation",
    "decode_block",
    "decode_block_request",
    "decode_command",
    "decode_offer",
    "decode_update_json",
    "encode_block",
    "encode_json",
]

UPDATE_PAYLOAD_VERSION = 1
BLOCK_MAGIC = b"EUB1"
"""First bytes of a block message: "edge update block", payload schema 1."""
_BLOCK_HEAD = struct.Struct(">4sI")
MIN_BLOCK_SIZE = 1024
MAX_BLOCK_SIZE = 1 << 20
MAX_BUNDLE_BYTES = 2 * 1024**3
MAX_OFFER_BYTES = 4 << 20
"""An offer lists one sha256 per block: 2 GiB in 128 KiB blocks is about 1.1 MB of JSON."""
MAX_CONTROL_BYTES = 64 << 10
MAX_WINDOW = 256
"""At most this many blocks asked for in one request."""
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIGNATURE = re.compile(r"[0-9a-f]{128}")


class Compression(StrEnum):
    """How each block travels: as is, or zstd-compressed one block at a time."""

    NONE = "none"
    ZSTD = "zstd"


class DeltaFormat(StrEnum):
    """Binary delta formats a device can apply."""

    BSDIFF4 = "bsdiff4"


class CommandOp(StrEnum):
    """What a command on ``update/cmd`` asks for."""

    MODELS = "models"
    ROLLBACK = "rollback"
    CANCEL = "cancel"
    """End the model's running update (while it is still downloading) as failed."""


def encode_json(doc: dict[str, Any]) -> bytes:
    """Compact JSON with ``"v": 1`` first."""
    return json.dumps({"v": UPDATE_PAYLOAD_VERSION, **doc}, separators=(",", ":")).encode("utf-8")


def decode_update_json(raw: bytes, *, max_bytes: int = MAX_CONTROL_BYTES) -> dict[str, Any]:
    """A JSON object of at most `max_bytes` whose ``"v"`` is 1."""
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"update payload is {len(raw)} bytes, the limit is {max_bytes}")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RequestError(f"update payload is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RequestError("update payload must be a JSON object")
    if doc.get("v") != UPDATE_PAYLOAD_VERSION:
        raise RequestError(
            f"update payload schema v{doc.get('v')} is not supported (this side reads "
            f'v{UPDATE_PAYLOAD_VERSION}; "v" is required)'
        )
    return doc


def _field(doc: dict[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"update payload: '{key}' must be a {kind.__name__}")
    return value


def _matching(doc: dict[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
    value = _field(doc, key, str)
    if not pattern.fullmatch(value):
        raise RequestError(f"update payload: '{key}' is not {what}")
    return str(value)


def _bounded(doc: dict[str, Any], key: str, low: float, high: float) -> Any:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(f"update payload: '{key}' must be a number from {low:g} to {high:g}")
    return value


@dataclass(frozen=True)
class Delta:
    """The payload is a binary delta against a version the device has installed."""

    format: DeltaFormat
    base_version: str
    base_sha256: str
    """sha256 of the device's installed base bundle file (the delta applies to those exact bytes)."""


@dataclass(frozen=True)
class Probation:
    """After commit, watch the new version this long; roll back when a threshold is exceeded."""

    seconds: float
    max_error_rate: float = 1.0
    max_p95_ms: float | None = None
    min_requests: int = 1
    """Judge the error rate and latency only once this many requests were served."""


@dataclass(frozen=True)
class Offer:
    """An update offer: the bundle it results in, and the payload blocks that carry it."""

    job: str
    model: str
    version: str
    size: int
    sha256: str
    signature: str
    """Hex of the bundle's manifest.sig (checked against the bundle the payload rebuilds)."""
    payload_size: int
    payload_sha256: str
    block_size: int
    block_sha256: tuple[str, ...]
    compression: Compression = Compression.NONE
    delta: Delta | None = None
    probation: Probation | None = None
    new_model: bool = False
    """True to allow a model the device has never had (guards against a mistyped name)."""

    @property
    def blocks(self) -> int:
        """Number of payload blocks."""
        return len(self.block_sha256)

    def block_length(self, index: int) -> int:
        """Decoded length of block `index` (the last one may be short)."""
        return min(self.block_size, self.payload_size - index * self.block_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what `encode_json` sends and the journal keeps)."""
        doc = asdict(self)
        doc["block_sha256"] = list(self.block_sha256)
        return doc

    def encode(self) -> bytes:
        """The offer message."""
        return encode_json(self.to_dict())


def _delta(doc: Any) -> Delta | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise RequestError("update payload: 'delta' must be an object or null")
    try:
        fmt = DeltaFormat(str(doc.get("format")))
    except ValueError:
        raise RequestError(f"update payload: delta format {doc.get('format')!r} is not supported") from None
    return Delta(fmt, _matching(doc, "base_version", _NAME, "a version"),
                 _matching(doc, "base_sha256", _HEX64, "a sha256 hex digest"))  # fmt: skip


def _probation(doc: Any) -> Probation | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise RequestError("update payload: 'probation' must be an object or null")
    p95 = doc.get("max_p95_ms")
    return Probation(
        seconds=float(_bounded(doc, "seconds", 0, 86400)),
        max_error_rate=float(_bounded(doc, "max_error_rate", 0, 1)) if "max_error_rate" in doc else 1.0,
        max_p95_ms=None if p95 is None else float(_bounded(doc, "max_p95_ms", 0, 1e9)),
        min_requests=int(_bounded(doc, "min_requests", 1, 1e9)) if "min_requests" in doc else 1,
    )


def decode_offer(raw: bytes | dict[str, Any]) -> Offer:
    """Parse and bound-check an offer (bytes from MQTT, or the dict a journal kept)."""
    doc = decode_update_json(raw, max_bytes=MAX_OFFER_BYTES) if isinstance(raw, bytes) else raw
    size = int(_bounded(doc, "size", 1, MAX_BUNDLE_BYTES))
    payload_size = int(_bounded(doc, "payload_size", 1, MAX_BUNDLE_BYTES))
    block_size = int(_bounded(doc, "block_size", MIN_BLOCK_SIZE, MAX_BLOCK_SIZE))
    digests = doc.get("block_sha256")
    expected = -(-payload_size // block_size)
    if not isinstance(digests, list) or len(digests) != expected:
        raise RequestError(f"update payload: 'block_sha256' must list {expected} digests, one per block")
    if not all(isinstance(d, str) and _HEX64.fullmatch(d) for d in digests):
        raise RequestError("update payload: every 'block_sha256' entry must be a sha256 hex digest")
    try:
        compression = Compression(doc.get("compression", Compression.NONE))
    except ValueError:
        raise RequestError(
            f"update payload: compression {doc.get('compression')!r} is not supported"
        ) from None
    return Offer(
        job=_matching(doc, "job", _JOB_ID, "a job id (letters, digits, '_-', at most 64)"),
        model=_matching(doc, "model", _NAME, "a model name"),
        version=_matching(doc, "version", _NAME, "a version"),
        size=size,
        sha256=_matching(doc, "sha256", _HEX64, "a sha256 hex digest"),
        signature=_matching(doc, "signature", _SIGNATURE, "an ed25519 signature in hex"),
        payload_size=payload_size,
        payload_sha256=_matching(doc, "payload_sha256", _HEX64, "a sha256 hex digest"),
        block_size=block_size,
        block_sha256=tuple(digests),
        compression=compression,
        delta=_delta(doc.get("delta")),
        probation=_probation(doc.get("probation")),
        new_model=bool(_field(doc, "new_model", bool, optional=True)),
    )


@dataclass(frozen=True)
class BlockRequest:
    """The device asks for blocks ``offset + i`` for every bit i set in `bitmap` (LSB first)."""

    job: str
    offset: int
    bitmap: bytes

    @classmethod
    def of(cls, job: str, indices: list[int]) -> BlockRequest:
        """The request for `indices` (sorted, within one window)."""
        offset = min(indices)
        bitmap = bytearray((max(indices) - offset) // 8 + 1)
        for index in indices:
            bitmap[(index - offset) // 8] |= 1 << ((index - offset) % 8)
        return cls(job, offset, bytes(bitmap))

    def indices(self) -> list[int]:
        """The block indices asked for, ascending."""
        return [self.offset + byte * 8 + bit for byte, value in enumerate(self.bitmap)
                for bit in range(8) if value >> bit & 1]  # fmt: skip

    def encode(self) -> bytes:
        """The request message."""
        return encode_json({"job": self.job, "offset": self.offset, "bitmap": self.bitmap.hex()})


def decode_block_request(raw: bytes) -> BlockRequest:
    """Parse a block request (at most `MAX_WINDOW` blocks)."""
    doc = decode_update_json(raw)
    bitmap_hex = _field(doc, "bitmap", str)
    try:
        bitmap = bytes.fromhex(bitmap_hex)
    except ValueError:
        raise RequestError("update payload: 'bitmap' must be hex") from None
    if not bitmap or len(bitmap) > MAX_WINDOW // 8:
        raise RequestError(f"update payload: 'bitmap' must cover 1 to {MAX_WINDOW} blocks")
    offset = int(_bounded(doc, "offset", 0, MAX_BUNDLE_BYTES // MIN_BLOCK_SIZE))
    return BlockRequest(_matching(doc, "job", _JOB_ID, "a job id"), offset, bitmap)


def encode_block(index: int, data: bytes) -> bytes:
    """One block message: magic, big-endian index, the block's bytes (as they travel)."""
    return _BLOCK_HEAD.pack(BLOCK_MAGIC, index) + data


def decode_block(raw: bytes, *, max_bytes: int) -> tuple[int, bytes]:
    """(index, bytes as they travel) of a block message of at most `max_bytes` of data."""
    if len(raw) < _BLOCK_HEAD.size or raw[:4] != BLOCK_MAGIC:
        raise RequestError("update block: not a v1 block message (bad magic)")
    if len(raw) - _BLOCK_HEAD.size > max_bytes:
        raise PayloadTooLarge(f"update block: {len(raw) - _BLOCK_HEAD.size} bytes, the limit is {max_bytes}")
    _magic, index = _BLOCK_HEAD.unpack_from(raw)
    return index, raw[_BLOCK_HEAD.size :]


@dataclass(frozen=True)
class Command:
    """A request on ``update/cmd``, answered on ``update/reply/<token>``."""

    op: CommandOp
    token: str
    model: str | None = None


def decode_command(raw: bytes) -> Command:
    """Parse a command (rollback and cancel need a model)."""
    doc = decode_update_json(raw)
    try:
        op = CommandOp(str(doc.get("op")))
    except ValueError:
        ops = ", ".join(op.value for op in CommandOp)
        raise RequestError(f"update command: 'op' must be one of {ops}") from None
    token = _matching(doc, "token", _JOB_ID, "a reply token (letters, digits, '_-', at most 64)")
    model = _matching(doc, "model", _NAME, "a model name") if op is not CommandOp.MODELS else None
    return Command(op, token, model)
