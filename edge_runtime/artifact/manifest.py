"""The bundle manifest: what a compressed model is, what it needs, and how to check it on a device.

Parsing is strict: the bytes are bounded in size and nesting before ``json.loads`` sees them, and
every field's type is checked, so any odd manifest (signed or not) is a ``BundleError``, never a
``TypeError`` or ``RecursionError``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edge_runtime.core.errors import BundleError
from edge_runtime.core.types import TensorSpec

__all__ = [
    "MANIFEST_VERSION",
    "MAX_JSON_DEPTH",
    "MAX_MANIFEST_BYTES",
    "SAFE_NAME",
    "FileEntry",
    "GoldenSpec",
    "Manifest",
    "check_json_depth",
    "is_safe_name",
]

MANIFEST_VERSION = 1
"""Schema version written as ``"v"``; a reader refuses versions it does not know."""
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""Largest manifest.json a reader accepts (the compressor's reports are tens of KB)."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects accepted in manifest.json and state.json."""
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
"""Model names, versions and bundle member names: one safe path component (use ``fullmatch``)."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
_OPENING = np.frombuffer(b"[{", np.uint8)
_CLOSING = np.frombuffer(b"]}", np.uint8)
_FIELDS = frozenset(
    {"v", "name", "version", "profile", "engine", "model_file", "inputs", "outputs", "files", "golden",
     "session_config", "engine_options", "report", "created", "signer"}
)  # fmt: skip


def is_safe_name(value: object) -> bool:
    """True for a string that is one safe path component (letters, digits, '._+-', at most 128)."""
    return isinstance(value, str) and SAFE_NAME.fullmatch(value) is not None


def check_json_depth(raw: bytes, what: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise BundleError when arrays/objects in JSON `raw` nest deeper than `limit` (before parsing).

    Linear time: escapes, then strings, are cut out by regexes that cannot backtrack, and the
    running depth over the brackets left is a numpy cumulative sum.
    """
    plain = np.frombuffer(_STRING.sub(b"", _ESCAPE.sub(b"", raw)), np.uint8)
    steps = np.isin(plain, _OPENING).astype(np.int32) - np.isin(plain, _CLOSING).astype(np.int32)
    if steps.size and int(np.cumsum(steps, dtype=np.int32).max()) > limit:
        raise BundleError(f"{what} nests deeper than {limit} levels; refusing it")


def load_json_object(raw: bytes, what: str, max_bytes: int = MAX_MANIFEST_BYTES) -> dict[str, Any]:
    """Decode bounded, shallow JSON bytes holding one object; BundleError naming `what` otherwise."""
    if len(raw) > max_bytes:
        raise BundleError(f"{what} is larger than {max_bytes} bytes; refusing it")
    check_json_depth(raw, what)
    try:
        data = json.loads(raw.decode("utf-8"))  # NaN/Infinity allowed: reports carry inf SQNR
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{what} must hold a JSON object, not {type(data).__name__}")
    return data


class _Fields:
    """Typed access to one JSON object's fields; every mistake names the field."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise BundleError(f"manifest.json: {where} must be an object, not {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.where = where

    def _fail(self, key: str, wanted: str) -> BundleError:
        value = self.data.get(key)
        return BundleError(f"manifest.json: {self.where}{key} must be {wanted}, not {type(value).__name__}")

    def get(self, key: str, kind: type | tuple[type, ...], wanted: str, default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise BundleError(f"manifest.json: {self.where}{key} is missing")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise self._fail(key, wanted)
        return value

    def text(self, key: str, default: Any = ...) -> str:
        return str(self.get(key, str, "a string", default))

    def name(self, key: str) -> str:
        value = self.text(key)
        if not is_safe_name(value):
            raise BundleError(
                f"manifest.json: {self.where}{key} '{value[:64]}' is not a safe name "
                "(letters, digits, '._+-', at most 128)"
            )
        return value

    def count(self, key: str, default: Any = ...) -> int:
        value = self.get(key, int, "a non-negative integer", default)
        if value < 0:
            raise self._fail(key, "a non-negative integer")
        return int(value)

    def number(self, key: str, default: Any = ...) -> float:
        value = self.get(key, (int, float), "a finite number", default)
        if not math.isfinite(value) or value < 0:
            raise self._fail(key, "a finite non-negative number")
        return float(value)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _tensor(item: object, where: str) -> TensorSpec:
    fields = _Fields(item, where)
    shape = fields.get("shape", list, "a list")
    for dim in shape:
        if (
            isinstance(dim, bool)
            or not isinstance(dim, int | str)
            or (isinstance(dim, str) and len(dim) > 64)
        ):
            raise BundleError(f"manifest.json: {where}shape holds {dim!r}, not an integer or a name")
    return TensorSpec(name=fields.text("name"), dtype=fields.text("dtype"), shape=tuple(shape))


def _tensors(fields: _Fields, key: str) -> tuple[TensorSpec, ...]:
    return tuple(_tensor(item, f"{key}[{i}].") for i, item in enumerate(fields.get(key, list, "a list")))


def _files(fields: _Fields) -> dict[str, FileEntry]:
    files: dict[str, FileEntry] = {}
    for name, entry in fields.get("files", dict, "an object").items():
        if not is_safe_name(name):
            raise BundleError(f"manifest.json: files lists '{name[:64]}', which is not a safe member name")
        member = _Fields(entry, f"files.{name}.")
        sha256 = member.text("sha256")
        if not _SHA256.fullmatch(sha256):
            raise BundleError(f"manifest.json: files.{name}.sha256 is not 64 lowercase hex digits")
        files[name] = FileEntry(sha256=sha256, size=member.count("size"))
    return files


def _golden(value: object) -> GoldenSpec | None:
    if value is None:
        return None
    fields = _Fields(value, "golden.")
    return GoldenSpec(
        file=fields.name("file"),
        cases=fields.count("cases"),
        rtol=fields.number("rtol"),
        atol=fields.number("atol"),
        min_top1_agreement=fields.number("min_top1_agreement", 1.0),
    )


def _string_map(fields: _Fields, key: str) -> dict[str, str]:
    mapping = fields.get(key, dict, "an object", {})
    if not all(isinstance(v, str) for v in mapping.values()):
        raise BundleError(f"manifest.json: every {key} value must be a string")
    return dict(mapping)


@dataclass(frozen=True)
class FileEntry:
    """One bundle member, pinned by size and sha256."""

    sha256: str
    size: int


@dataclass(frozen=True)
class GoldenSpec:
    """Golden inputs with expected outputs for the on-device self-test."""

    file: str
    """Bundle member (.npz) holding ``in/<case>/<input>`` and ``out/<case>/<output>`` arrays."""
    cases: int
    rtol: float
    atol: float
    min_top1_agreement: float = 1.0
    """For classifier outputs: share of cases whose arg-max must match exactly."""


@dataclass(frozen=True)
class Manifest:
    """Everything a device needs to know about one bundle, signed as a whole."""

    name: str
    version: str
    profile: str
    engine: str
    model_file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: dict[str, FileEntry]
    golden: GoldenSpec | None = None
    session_config: dict[str, str] = field(default_factory=dict)
    """ONNX Runtime session config entries the model must be loaded with."""
    engine_options: dict[str, str] = field(default_factory=dict)
    """Options for the manifest's engine (openvino: `inference_precision` f32 or bf16); written only
    when there are some, so a bundle without them reads on runtimes that predate the field."""
    report: dict[str, Any] = field(default_factory=dict)
    """The compressor's measured report (sizes, latency, fidelity, decisions)."""
    created: str = ""
    signer: str = ""
    """Key id (first 16 hex digits of the public key's sha256) of the signing key."""

    def to_json(self) -> bytes:
        """Canonical JSON bytes (sorted keys): exactly what the signature covers."""
        data = {
            "v": MANIFEST_VERSION,
            "name": self.name,
            "version": self.version,
            "profile": self.profile,
            "engine": self.engine,
            "model_file": self.model_file,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "files": {name: asdict(entry) for name, entry in sorted(self.files.items())},
            "golden": asdict(self.golden) if self.golden else None,
            "session_config": dict(self.session_config),
            "report": self.report,
            "created": self.created,
            "signer": self.signer,
        }
        if self.engine_options:
            data["engine_options"] = dict(self.engine_options)
        return json.dumps(data, sort_keys=True, indent=1).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse and validate manifest bytes (bounded size and depth, every field typed)."""
        data = load_json_object(raw, "manifest.json")
        if data.get("v") != MANIFEST_VERSION or isinstance(data.get("v"), bool):
            raise BundleError(
                f"manifest schema v{str(data.get('v'))[:16]} is not supported "
                f"(this runtime reads v{MANIFEST_VERSION})"
            )
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise BundleError(f"manifest.json: unknown field '{unknown[0][:64]}'")
        fields = _Fields(data, "")
        manifest = cls(
            name=fields.name("name"),
            version=fields.name("version"),
            profile=fields.text("profile"),
            engine=fields.text("engine"),
            model_file=fields.name("model_file"),
            inputs=_tensors(fields, "inputs"),
            outputs=_tensors(fields, "outputs"),
            files=_files(fields),
            golden=_golden(data.get("golden")),
            session_config=_string_map(fields, "session_config"),
            engine_options=_string_map(fields, "engine_options"),
            report=dict(fields.get("report", dict, "an object", {})),
            created=fields.text("created", ""),
            signer=fields.text("signer", ""),
        )
        for member in (manifest.model_file, manifest.golden.file if manifest.golden else None):
            if member is not None and member not in manifest.files:
                raise BundleError(f"manifest.json names '{member}', which its files list does not hold")
        return manifest
