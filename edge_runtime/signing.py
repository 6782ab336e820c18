"""ed25519 keys and signatures (the one module that imports `cryptography`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.errors import SignatureError, UsageError

__all__ = [
    "PrivateKey",
    "PublicKey",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign",
    "verify_signature",
]

PrivateKey = Ed25519PrivateKey
PublicKey = Ed25519PublicKey


def key_id(public_key: PublicKey) -> str:
    """Short, stable id of a public key: first 16 hex digits of the sha256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(directory: Path, name: str = "signing", *, force: bool = False) -> tuple[Path, Path]:
    """Write `<name>.key` (PKCS#8 PEM, mode 0600) and `<name>.pub` into `directory`."""
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise UsageError(f"{path} already exists (use --force to overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def load_private_key(path: Path) -> PrivateKey:
    """Load an ed25519 private key from a PEM file."""
    try:
        key = serialization.load_pem_private_key(_read(path, "private key"), password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} holds a {type(key).__name__}, not an ed25519 private key")
    return key


def load_public_key(path: Path) -> PublicKey:
    """Load an ed25519 public key from a PEM file."""
    try:
        key = serialization.load_pem_public_key(_read(path, "public key"))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{path} holds a {type(key).__name__}, not an ed25519 public key")
    return key


def sign(private_key: PrivateKey, payload: bytes) -> bytes:
    """The 64-byte ed25519 signature of `payload`."""
    return private_key.sign(payload)


def verify_signature(public_key: PublicKey, payload: bytes, signature: bytes) -> None:
    """Raise SignatureError unless `signature` is `public_key`'s signature of `payload`."""
    try:
        public_key.verify(signature, payload)
    except InvalidSignature as exc:
        raise SignatureError(
            f"signature does not verify with key {key_id(public_key)}: the manifest was changed "
            "or signed by another key"
        ) from exc
