"""Signed bundles: one zip file holding a model, its manifest, golden data and an ed25519 signature.

Layout (every member at the top level)::

    manifest.json   canonical JSON (see manifest.py), lists every other member with size + sha256
    manifest.sig    64-byte ed25519 signature over manifest.json's exact bytes
    model.onnx      the model (model.tflite for the TFLite engine)
    golden.npz      golden inputs and expected outputs for the on-device self-test

Reading checks, in this order, and reads nothing it has not yet bounded: the zip's directory
(member names one safe path component, no duplicates, no encryption, stored or deflated only);
manifest.json and manifest.sig read with small caps; the signature over the manifest's raw bytes
(before they are parsed); the manifest parsed strictly; then every listed member streamed in
chunks, stopping as soon as it outgrows its declared size, the total cap or the compression-ratio
cap, and checked against its sha256. Members the manifest does not list are refused.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from edge_runtime.artifact import signing
from edge_runtime.artifact.golden import GoldenCase, unpack_golden
from edge_runtime.artifact.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest, is_safe_name
from edge_runtime.core.errors import BundleError, SignatureError, UsageError
from edge_runtime.core.files import atomic_write, sha256_hex

__all__ = [
    "BUNDLE_SUFFIX",
    "Bundle",
    "ReadLimits",
    "read_bundle",
    "read_manifest",
    "write_bundle",
]

BUNDLE_SUFFIX = ".edgebundle"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
SIGNATURE_BYTES = 64
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what reading one bundle may inflate (zip bombs, lying headers)."""

    max_total_bytes: int = 4 * 1024**3
    """Sum of the members' declared sizes; a bundle declaring more is refused before any is read."""
    max_ratio: int = 200
    """Inflated / compressed bytes per member, checked while streaming (past `ratio_floor`)."""
    ratio_floor: int = 1 << 20
    """Members inflating to less than this are never refused for their ratio."""
    max_members: int = 16
    max_manifest_bytes: int = MAX_MANIFEST_BYTES


DEFAULT_LIMITS = ReadLimits()


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
        """The model file's bytes (BundleError when the bundle was read without a key)."""
        return self._member(self.manifest.model_file)

    def _member(self, name: str) -> bytes:
        if not self.signed_by:
            raise BundleError(f"{self.path} was read without a key: its members are not kept")
        return self.members[name]

    def golden_cases(self) -> list[GoldenCase]:
        """The golden self-test cases, in order."""
        spec = self.manifest.golden
        if spec is None:
            return []
        return unpack_golden(self._member(spec.file))


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
    _check_names(manifest, members)
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


def _check_names(manifest: Manifest, members: dict[str, bytes]) -> None:
    """Model name, version and member names must be safe path components (a reader refuses others)."""
    for what, value in (("model name", manifest.name), ("version", manifest.version)):
        if not is_safe_name(value):
            raise BundleError(
                f"{what} '{value}' cannot go in a bundle (letters, digits, '._+-', at most 128)"
            )
    for name in members:
        if not is_safe_name(name) or name in (MANIFEST_NAME, SIGNATURE_NAME):
            raise BundleError(f"member name '{name}' cannot go in a bundle")


def _directory(path: Path, archive: zipfile.ZipFile, limits: ReadLimits) -> dict[str, zipfile.ZipInfo]:
    """The zip's members by name, refusing odd names, duplicates, encryption and odd compression."""
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise BundleError(f"{path} has {len(infos)} members; a bundle has at most {limits.max_members}")
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        if not is_safe_name(name):
            raise BundleError(f"{path}: member name '{name[:64]}' is not allowed in a bundle")
        if name in members:
            raise BundleError(f"{path}: member '{name}' appears twice; refusing an ambiguous bundle")
        if info.flag_bits & 0x1:
            raise BundleError(f"{path}: member '{name}' is encrypted; bundles are signed, not encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise BundleError(f"{path}: member '{name}' uses compression method {info.compress_type}")
        members[name] = info
    return members


class _CountingFile(io.FileIO):
    """A file that counts the bytes read from it: the compressed bytes a member's inflation consumed."""

    consumed = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.consumed += len(data or b"")
        return data or b""


def _read_member(
    path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int, limits: ReadLimits,
    *, keep: bool = True,
) -> tuple[bytes, str]:  # fmt: skip
    """A member's bytes (b"" unless `keep`) and sha256, read in chunks; BundleError as soon as it
    passes `max_bytes` or inflates more than `limits.max_ratio` times the compressed bytes read."""
    source = archive.fp
    counter = source if isinstance(source, _CountingFile) else None
    start = counter.consumed if counter else 0
    chunks: list[bytes] = []
    digest = hashlib.sha256()
    size = 0
    with archive.open(info) as member:
        while chunk := member.read(min(CHUNK_BYTES, max_bytes + 1 - size)):
            size += len(chunk)
            if size > max_bytes:
                raise BundleError(
                    f"{path}: member '{info.filename}' inflates beyond the {max_bytes} bytes allowed for it"
                )
            compressed = (counter.consumed - start) if counter else info.compress_size
            if size > limits.ratio_floor and size > limits.max_ratio * max(compressed, 1):
                raise BundleError(
                    f"{path}: member '{info.filename}' inflates more than {limits.max_ratio}x "
                    "(a zip bomb?); refusing it"
                )
            digest.update(chunk)
            if keep:
                chunks.append(chunk)
    return b"".join(chunks), digest.hexdigest()


def _verified_member(
    path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, entry: FileEntry, limits: ReadLimits,
    *, keep: bool,
) -> bytes:  # fmt: skip
    """A listed member's bytes, bounded by its declared size and checked against its sha256."""
    data, sha256 = _read_member(path, archive, info, entry.size, limits, keep=keep)
    if sha256 != entry.sha256:
        raise BundleError(
            f"{path}: member '{info.filename}' does not match its sha256 in the manifest (tampered?)"
        )
    return data


@contextmanager
def _opened(path: Path) -> Iterator[zipfile.ZipFile]:
    """The zip at `path`, read through a counting file; zip, zlib and I/O errors become BundleError."""
    try:
        source = _CountingFile(path, "r")
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"{path} is a directory, not a bundle") from exc
    except OSError as exc:
        raise BundleError(f"{path}: cannot read bundle: {exc.strerror or exc}") from exc
    try:
        with zipfile.ZipFile(source) as archive:
            yield archive
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, zlib.error) as exc:
        raise BundleError(f"{path} is not a bundle (not a readable zip file: {exc})") from exc
    except OSError as exc:  # the file vanished or the disk failed mid-read
        raise BundleError(f"{path}: cannot read bundle: {exc}") from exc
    finally:
        source.close()


def _manifest(
    path: Path, archive: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo],
    public_key: signing.PublicKey | None, limits: ReadLimits,
) -> tuple[Manifest, str]:  # fmt: skip
    """The manifest, its signature verified over the raw bytes before they are parsed."""
    if MANIFEST_NAME not in infos:
        raise BundleError(f"{path} has no {MANIFEST_NAME}: not a bundle")
    raw, _ = _read_member(path, archive, infos[MANIFEST_NAME], limits.max_manifest_bytes, limits)
    signed_by = ""
    if public_key is not None:
        if SIGNATURE_NAME not in infos:
            raise SignatureError(f"{path} is unsigned (no {SIGNATURE_NAME}); refusing it")
        signature, _ = _read_member(path, archive, infos[SIGNATURE_NAME], SIGNATURE_BYTES, limits)
        signing.verify_signature(public_key, raw, signature)
        signed_by = signing.key_id(public_key)
    return Manifest.from_json(raw), signed_by


def read_bundle(
    path: Path, public_key: signing.PublicKey | None, *, limits: ReadLimits = DEFAULT_LIMITS
) -> Bundle:
    """Read and verify a bundle; with `public_key=None` the signature is not checked (inspect only).

    Without a key every member is still checked against its sha256, streaming, but none is kept:
    nothing unsigned is held in memory, so ``members`` is empty.
    """
    path = Path(path)
    with _opened(path) as archive:
        infos = _directory(path, archive, limits)
        manifest, signed_by = _manifest(path, archive, infos, public_key, limits)
        unlisted = sorted(set(infos) - set(manifest.files) - {MANIFEST_NAME, SIGNATURE_NAME})
        if unlisted:
            raise BundleError(f"{path}: member '{unlisted[0]}' is not listed in the manifest")
        declared = sum(entry.size for entry in manifest.files.values())
        if declared > limits.max_total_bytes:
            raise BundleError(
                f"{path}: members declare {declared} bytes, more than the {limits.max_total_bytes} allowed"
            )
        members: dict[str, bytes] = {}
        for name, entry in sorted(manifest.files.items()):
            if name not in infos or name in (MANIFEST_NAME, SIGNATURE_NAME):
                raise BundleError(f"{path}: member '{name}' listed in the manifest is missing")
            data = _verified_member(path, archive, infos[name], entry, limits, keep=bool(signed_by))
            if signed_by:
                members[name] = data
    return Bundle(path=path, manifest=manifest, members=members, signed_by=signed_by)


def read_manifest(
    path: Path, public_key: signing.PublicKey | None, *, limits: ReadLimits = DEFAULT_LIMITS
) -> tuple[Manifest, str]:
    """A bundle's manifest and the id of the key that verified it ("" without a key); members unread."""
    path = Path(path)
    with _opened(path) as archive:
        return _manifest(path, archive, _directory(path, archive, limits), public_key, limits)
