"""The host side of a model update: encode the payload, offer it, serve the blocks the device asks for,
follow its state reports to the end; plus the ``models`` and ``rollback`` commands.

The payload is the bundle itself, or a bsdiff4 delta against a version the device reports having
(chosen when smaller); each block travels as is or zstd-compressed, whichever is smaller overall.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.client.broker import Broker, parse_broker
from edge_runtime.codecs.update_payloads import (
    CommandOp,
    Compression,
    Delta,
    DeltaFormat,
    Offer,
    Probation,
    decode_block_request,
    decode_update_json,
    encode_block,
    encode_json,
)
from edge_runtime.core.errors import EdgeError, TransientError, UsageError

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "FlashResult",
    "Prepared",
    "bundle_identity",
    "command",
    "flash",
    "flash_many",
    "parse_broker",
    "prepare",
    "shared_fraction",
]

DEFAULT_BLOCK_SIZE = 128 << 10
TERMINAL_REPORTS = {"committed", "rolled_back", "failed"}
_ZSTD_LEVEL = 10


def bundle_identity(raw: bytes) -> tuple[str, str, str]:
    """(model name, version, manifest signature hex) of bundle bytes (not verified: the device does)."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            manifest = json.loads(archive.read("manifest.json"))
            signature = archive.read("manifest.sig").hex()
    except KeyError as exc:
        raise UsageError(f"not a signed bundle: {exc.args[0]}") from exc
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise UsageError(f"not a bundle (not a readable zip with a manifest): {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("name"), str):
        raise UsageError("not a bundle: manifest.json names no model")
    return manifest["name"], str(manifest.get("version")), signature


@dataclass(frozen=True)
class Prepared:
    """An offer and its blocks as they travel."""

    offer: Offer
    blocks: tuple[bytes, ...]
    notes: tuple[str, ...] = ()
    """How the payload was chosen (delta computed or not, and the sizes compared)."""

    @property
    def encoding(self) -> str:
        """full, zstd, delta or delta+zstd."""
        name = "delta" if self.offer.delta else "full"
        return (
            name
            if self.offer.compression is Compression.NONE
            else f"{name}+zstd"
            if self.offer.delta
            else "zstd"
        )

    @property
    def wire_bytes(self) -> int:
        """Bytes of block data on the wire for one full transfer."""
        return sum(len(block) for block in self.blocks)


def _cut(payload: bytes, block_size: int) -> list[bytes]:
    return [payload[i : i + block_size] for i in range(0, len(payload), block_size)]


def _encode(payload: bytes, block_size: int, compression: str) -> tuple[Compression, list[bytes]]:
    """Blocks raw or zstd-compressed one by one ("auto": zstd only if it saves at least 5%)."""
    raw = _cut(payload, block_size)
    if compression == Compression.NONE:
        return Compression.NONE, raw
    import zstandard

    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    packed = [compressor.compress(block) for block in raw]
    if compression == Compression.ZSTD or sum(map(len, packed)) < 0.95 * len(payload):
        return Compression.ZSTD, packed
    return Compression.NONE, raw


def shared_fraction(base: bytes, new: bytes, *, samples: int = 64, span: int = 32) -> float:
    """Share of `samples` pieces of `new` (`span` bytes each, spread evenly) found anywhere in `base`.

    A cheap hint (a few scans of `base`) of how much a binary delta could reuse: a fully retrained
    model's compressed weights share next to nothing with the old ones, and bsdiff would take
    seconds to find that out."""
    if len(new) < span or len(base) < span:
        return 0.0
    step = (len(new) - span) / max(1, samples - 1)
    positions = sorted({int(i * step) for i in range(samples)})
    return sum(base.find(new[at : at + span]) >= 0 for at in positions) / len(positions)


DELTA_MIN_SHARED = 0.1
"""A delta is computed only when at least this share of the new bundle's sampled pieces is in the base."""


def prepare(
    bundle: bytes,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    compression: str = "auto",
    base: tuple[str, bytes] | None = None,
    new_model: bool = False,
    probation: Probation | None = None,
    job: str | None = None,
    delta_min_shared: float = DELTA_MIN_SHARED,
) -> Prepared:
    """The offer for `bundle`: full, or a delta against `base` = (version, bytes) when smaller on the wire."""
    name, version, signature = bundle_identity(bundle)
    kind, blocks = _encode(bundle, block_size, compression)
    choices: list[tuple[int, bytes, Compression, list[bytes], Delta | None]] = [
        (sum(map(len, blocks)), bundle, kind, blocks, None)
    ]
    notes = []
    if base is not None:
        shared = shared_fraction(base[1], bundle)
        if shared < delta_min_shared:
            notes.append(f"no delta against {base[0]}: {shared:.0%} of the bundle's sampled pieces are in it")
        else:
            import bsdiff4

            patch = bsdiff4.diff(base[1], bundle)
            against = Delta(DeltaFormat.BSDIFF4, base[0], hashlib.sha256(base[1]).hexdigest())
            kind, blocks = _encode(patch, block_size, compression)
            choices.append((sum(map(len, blocks)), patch, kind, blocks, against))
            chosen = "delta" if choices[1][0] < choices[0][0] else "full"
            notes.append(f"delta against {base[0]}: {choices[1][0]} bytes on the wire, full: {choices[0][0]}; "
                         f"sending the {chosen}")  # fmt: skip
    _size, payload, kind, blocks, delta = min(choices, key=lambda choice: choice[0])  # a tie: the full one
    offer = Offer(
        job=job or uuid.uuid4().hex[:16], model=name, version=version, size=len(bundle),
        sha256=hashlib.sha256(bundle).hexdigest(), signature=signature, payload_size=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(), block_size=block_size,
        block_sha256=tuple(hashlib.sha256(piece).hexdigest() for piece in _cut(payload, block_size)),
        compression=kind, delta=delta, probation=probation, new_model=new_model,
    )  # fmt: skip
    return Prepared(offer, tuple(blocks), tuple(notes))


@dataclass
class FlashResult:
    """How one device's update ended."""

    device: str
    job: str
    model: str
    version: str
    state: str = "unknown"
    reason: str = ""
    encoding: str = ""
    blocks: int = 0
    blocks_sent: int = 0
    blocks_resent: int = 0
    """Blocks sent more than once (each extra send counted)."""
    bytes_sent: int = 0
    duplicates: int = 0
    """Blocks the device received twice (counted by the device: includes MQTT-level redelivery)."""
    reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True if the device committed the new version."""
        return self.state == "committed"


def _link(broker: Broker | str, name: str) -> Any:
    return Broker.of(broker).link(name)


class _Session:
    """One flash: serve blocks for the job, follow its reports, decide when it ended."""

    def __init__(
        self, link: Any, device: str, prepared: Prepared, progress: Callable[[FlashResult, dict], None]
    ):
        from edge_runtime.transports.mqtt.topics import DeviceTopics

        self.link, self.prepared, self.progress = link, prepared, progress
        self.topics = DeviceTopics(device)
        offer = prepared.offer
        self.result = FlashResult(device, offer.job, offer.model, offer.version,
                                  encoding=prepared.encoding, blocks=offer.blocks)  # fmt: skip
        self.sent: collections.Counter[int] = collections.Counter()
        self.heard = threading.Event()
        self.done = threading.Event()
        self._lock = threading.Lock()

    def attach(self) -> None:
        offer = self.prepared.offer
        self.link.subscribe(self.topics.update_get(offer.job), self._on_get, qos=1)
        self.link.subscribe(self.topics.update_state(offer.model), self._on_state, qos=1)
        self.link.subscribe(self.topics.update_errors, self._on_error, qos=1)

    def _on_get(self, message: Any) -> None:
        try:
            request = decode_block_request(message.payload)
        except EdgeError:
            return
        self.heard.set()
        blocks = self.prepared.blocks
        for index in request.indices():
            if index < len(blocks):
                self.link.publish(
                    self.topics.update_block(self.result.job), encode_block(index, blocks[index]), qos=1
                )
                with self._lock:
                    self.sent[index] += 1
                    self.result.blocks_sent += 1
                    self.result.bytes_sent += len(blocks[index])
                    self.result.blocks_resent = sum(count - 1 for count in self.sent.values())

    def _on_state(self, message: Any) -> None:
        try:
            report = decode_update_json(message.payload)
        except EdgeError:
            return
        if report.get("job") != self.result.job:
            return  # the retained state of an earlier update
        self.heard.set()
        self.result.reports.append(report)
        self.result.state = str(report.get("state"))
        self.result.reason = str(report.get("reason", ""))
        blocks = report.get("blocks")
        if isinstance(blocks, dict) and isinstance(blocks.get("duplicate"), int):
            self.result.duplicates = blocks["duplicate"]
        self.progress(self.result, report)
        if self.result.state in TERMINAL_REPORTS:
            self.done.set()

    def _on_error(self, message: Any) -> None:
        try:
            report = decode_update_json(message.payload)
        except EdgeError:
            return
        if report.get("job") == self.result.job and str(report.get("error", "")).startswith("offer refused"):
            self.result.state, self.result.reason = "failed", str(report.get("error"))
            self.progress(self.result, {"state": "failed", "reason": self.result.reason})
            self.done.set()

    def run(self, timeout: float, offer_retry_s: float) -> FlashResult:
        deadline = time.monotonic() + timeout
        payload = self.prepared.offer.encode()
        while not self.done.is_set():
            if self.link.connected and not self.heard.is_set():
                self.link.publish(self.topics.update_offer, payload, qos=1)  # the device dedups by job id
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransientError(
                    f"device '{self.result.device}' did not finish within {timeout:g} s "
                    f"(last state: {self.result.state})"
                )
            self.done.wait(min(left, offer_retry_s))
        return self.result


def flash(
    broker: Broker | str,
    device: str,
    prepared: Prepared,
    *,
    timeout: float = 600.0,
    offer_retry_s: float = 5.0,
    progress: Callable[[FlashResult, dict], None] = lambda result, report: None,
) -> FlashResult:
    """Offer `prepared` to `device` through `broker`, serve its blocks, return the final state."""
    link = _link(broker, "flash")
    session = _Session(link, device, prepared, progress)
    session.attach()
    link.start()
    try:
        link.require_connected(min(timeout, 15.0))
        return session.run(timeout, offer_retry_s)
    finally:
        link.stop(timeout=2.0)


def flash_many(
    jobs: list[tuple[str, Callable[[], Prepared]]],
    broker: Broker | str,
    *,
    max_parallel: int,
    **options: Any,
) -> list[FlashResult | EdgeError]:
    """Flash several devices, at most `max_parallel` transfers at once; one result or error each."""

    def one(item: tuple[str, Callable[[], Prepared]]) -> FlashResult | EdgeError:
        device, make = item
        try:
            return flash(broker, device, make(), **options)
        except EdgeError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, max_parallel)) as pool:
        return list(pool.map(one, jobs))


def command(
    broker: Broker | str, device: str, op: CommandOp, *, model: str | None = None, timeout: float = 10.0
) -> dict:
    """Send ``models``, ``rollback`` or ``cancel`` to a device and return its answer (EdgeError if it refused)."""
    from edge_runtime.transports.mqtt.topics import DeviceTopics

    topics = DeviceTopics(device)
    token = uuid.uuid4().hex[:16]
    link = _link(broker, "cmd")
    answers: list[dict] = []
    arrived = threading.Event()

    def on_reply(message: Any) -> None:
        try:
            answers.append(decode_update_json(message.payload, max_bytes=16 << 20))
        except EdgeError:
            return
        arrived.set()

    link.subscribe(topics.update_reply(token), on_reply, qos=1)
    link.start()
    try:
        link.require_connected(min(timeout, 15.0))
        doc: dict[str, Any] = {"op": op.value, "token": token}
        if model is not None:
            doc["model"] = model
        link.publish(topics.update_cmd, encode_json(doc), qos=1)
        if not arrived.wait(timeout):
            raise TransientError(f"no answer from device '{device}' within {timeout:g} s (is it online?)")
    finally:
        link.stop(timeout=1.0)
    answer = answers[0]
    if not answer.get("ok"):
        raise UsageError(f"device '{device}' refused: {answer.get('error')}")
    return answer


def base_for(models: dict[str, Any], model: str, candidates: list[Path]) -> tuple[str, bytes] | None:
    """Among `candidates` (bundle files), one the device has installed for `model`: (version, bytes)."""
    installed = {
        info.get("sha256"): version for version, info in (models.get(model, {}).get("versions") or {}).items()
    }
    for path in candidates:
        raw = Path(path).read_bytes()
        version = installed.get(hashlib.sha256(raw).hexdigest())
        if version is not None:
            return version, raw
    return None
