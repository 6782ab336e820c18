"""The bundle manifest: what a compressed model is, what it needs, and how to check it on a device."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_runtime.core.errors import BundleError
from edge_runtime.core.types import TensorSpec

__all__ = [
    "MANIFEST_VERSION",
    "FileEntry",
    "GoldenSpec",
    "Manifest",
]

MANIFEST_VERSION = 1
"""Schema version written as ``"v"``; a reader refuses versions it does not know."""


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
        return json.dumps(data, sort_keys=True, indent=1).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse and validate manifest bytes."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"manifest.json is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise BundleError("manifest.json must hold a JSON object")
        if data.get("v") != MANIFEST_VERSION:
            raise BundleError(
                f"manifest schema v{data.get('v')} is not supported (this runtime reads v{MANIFEST_VERSION})"
            )
        try:
            golden = data.get("golden")
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                profile=str(data["profile"]),
                engine=str(data["engine"]),
                model_file=str(data["model_file"]),
                inputs=tuple(TensorSpec.from_dict(item) for item in data["inputs"]),
                outputs=tuple(TensorSpec.from_dict(item) for item in data["outputs"]),
                files={name: FileEntry(**entry) for name, entry in data["files"].items()},
                golden=GoldenSpec(**golden) if golden else None,
                session_config={str(k): str(v) for k, v in data.get("session_config", {}).items()},
                report=dict(data.get("report", {})),
                created=str(data.get("created", "")),
                signer=str(data.get("signer", "")),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise BundleError(f"manifest.json is missing or mistypes a field: {exc}") from exc
