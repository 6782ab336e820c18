"""Signed bundles: one zip file holding a model, its manifest, golden data and an ed25519 signature.

Layout (every member at the top level)::

    manifest.json   canonical JSON (see manifest.py), lists every other member with size + sha256
    manifest.sig    64-byte ed25519 signature over manifest.json's exact bytes
    model.onnx      the model (model.tflite for the TFLite engine)
    golden.npz      golden inputs and expected outputs for the on-device self-test

Reading verifies in this order: zip readable, manifest parses, signature present and valid for
the given key, then every member's size and sha256; members the manifest does not list are refused.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from edge_runtime.artifact import signing
from edge_runtime.artifact.golden import GoldenCase, unpack_golden
from edge_runtime.artifact.manifest import FileEntry, Manifest
from edge_runtime.core.errors import BundleError, SignatureError, UsageError
from edge_runtime.core.files import atomic_write, sha256_hex

__all__ = [
    "BUNDLE_SUFFIX",
    "Bundle",
    "read_bundle",
    "write_bundle",
]

BUNDLE_SUFFIX = ".edgebundle"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MAX_MEMBER_BYTES = 2 * 1024**3
"""Refuse members larger than this when reading (a zip bomb guard)."""


@dataclass(frozen=True)
class Bundle:
    """A bundle read into memory and verified."""

    path: Path
    manifest: Manifest
    members: dict[str, bytes]
    signed_by: str
    """Key id that verified the signature, or "" when read without a key (inspect only)."""

    @property
    def model_bytes(self) -> bytes:
        """The model file's bytes."""
        return self.members[self.manifest.model_file]

    def golden_cases(self) -> list[GoldenCase]:
        """The golden self-test cases, in order."""
        spec = self.manifest.golden
        if spec is None:
            return []
        return unpack_golden(self.members[spec.file])


def write_bundle(
    path: Path,
    manifest: Manifest,
    members: dict[str, bytes],
    private_key: signing.PrivateKey,
    *,
    force: bool = False,
) -> Manifest:
    """Pin every member in the manifest, sign it, and write the bundle atomically; returns the manifest."""
    path = Path(path)
    if path.exists() and not force:
        raise UsageError(f"{path} already exists (use --force to overwrite)")
    if not path.parent.is_dir():
        raise UsageError(f"output folder {path.parent} does not exist")
    if manifest.model_file not in members:
        raise BundleError(f"the model member '{manifest.model_file}' is missing from the bundle")
    files = {name: FileEntry(sha256=sha256_hex(data), size=len(data)) for name, data in members.items()}
    public_key = private_key.public_key()
    created = manifest.created or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    final = replace(manifest, files=files, signer=signing.key_id(public_key), created=created)
    manifest_bytes = final.to_json()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr(MANIFEST_NAME, manifest_bytes)
        archive.writestr(SIGNATURE_NAME, signing.sign(private_key, manifest_bytes))
        for name, data in sorted(members.items()):
            archive.writestr(name, data)
    atomic_write(path, buffer.getvalue())
    return final


def _read_members(path: Path) -> dict[str, bytes]:
    """Every member of the zip at `path`, refusing odd names and oversized members."""
    try:
        with zipfile.ZipFile(path) as archive:
            members: dict[str, bytes] = {}
            for info in archive.infolist():
                if "/" in info.filename or "\\" in info.filename or info.filename.startswith("."):
                    raise BundleError(f"{path}: member name '{info.filename}' is not allowed in a bundle")
                if info.file_size > MAX_MEMBER_BYTES:
                    raise BundleError(f"{path}: member '{info.filename}' is larger than {MAX_MEMBER_BYTES}")
                members[info.filename] = archive.read(info)
            return members
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"{path} is a directory, not a bundle") from exc
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as exc:
        raise BundleError(f"{path} is not a bundle (not a readable zip file: {exc})") from exc
    except OSError as exc:  # zlib/CRC errors on truncated or corrupted data surface here too
        raise BundleError(f"{path}: cannot read bundle: {exc}") from exc


def read_bundle(path: Path, public_key: signing.PublicKey | None) -> Bundle:
    """Read and verify a bundle; with `public_key=None` the signature is not checked (inspect only)."""
    path = Path(path)
    members = _read_members(path)
    if MANIFEST_NAME not in members:
        raise BundleError(f"{path} has no {MANIFEST_NAME}: not a bundle")
    manifest_bytes = members.pop(MANIFEST_NAME)
    signature = members.pop(SIGNATURE_NAME, None)
    manifest = Manifest.from_json(manifest_bytes)
    signed_by = ""
    if public_key is not None:
        if signature is None:
            raise SignatureError(f"{path} is unsigned (no {SIGNATURE_NAME}); refusing it")
        signing.verify_signature(public_key, manifest_bytes, signature)
        signed_by = signing.key_id(public_key)
    _check_members(path, manifest, members)
    return Bundle(path=path, manifest=manifest, members=members, signed_by=signed_by)


def _check_members(path: Path, manifest: Manifest, members: dict[str, bytes]) -> None:
    """Every listed member present with its size and sha256; nothing unlisted."""
    unlisted = sorted(set(members) - set(manifest.files))
    if unlisted:
        raise BundleError(f"{path}: member '{unlisted[0]}' is not listed in the manifest")
    for name, entry in sorted(manifest.files.items()):
        data = members.get(name)
        if data is None:
            raise BundleError(f"{path}: member '{name}' listed in the manifest is missing")
        if len(data) != entry.size or sha256_hex(data) != entry.sha256:
            raise BundleError(
                f"{path}: member '{name}' does not match its sha256 in the manifest (tampered?)"
            )
    if manifest.model_file not in manifest.files:
        raise BundleError(f"{path}: the manifest's model file '{manifest.model_file}' is not a member")
