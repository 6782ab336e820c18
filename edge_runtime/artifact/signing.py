"""ed25519 keys and signatures (the one module that imports `cryptography`).

Verifying needs only cryptography's ed25519 module: its `serialization` package (which also
loads the SSH, RSA, DSA, EC and cipher modules, about 1 MB resident) is imported only for
private keys and for public key files that are not a plain ed25519 PEM.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.core.errors import SignatureError, UsageError

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
_PEM_PUBLIC = (b"-----BEGIN PUBLIC KEY-----", b"-----END PUBLIC KEY-----")
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
"""DER SubjectPublicKeyInfo of an ed25519 key (RFC 8410) up to its 32 raw key bytes."""


def key_id(public_key: PublicKey) -> str:
    """Short, stable id of a public key: first 16 hex digits of the sha256 of its raw bytes."""
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()[:16]


def generate_keypair(directory: Path, name: str = "signing", *, force: bool = False) -> tuple[Path, Path]:
    """Write `<name>.key` (PKCS#8 PEM, mode 0600) and `<name>.pub` into `directory`."""
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise UsageError(f"{path} already exists (use --force to overwrite)")
    from cryptography.hazmat.primitives import serialization

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
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(_read(path, "private key"), password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} holds a {type(key).__name__}, not an ed25519 private key")
    return key


def _plain_ed25519(pem: bytes) -> PublicKey | None:
    """The key in a one-key ed25519 SubjectPublicKeyInfo PEM, or None for anything else."""
    lines = pem.strip().splitlines()
    if len(lines) < 3 or (lines[0].strip(), lines[-1].strip()) != _PEM_PUBLIC:
        return None
    try:
        der = base64.b64decode(b"".join(line.strip() for line in lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
        return None
    return Ed25519PublicKey.from_public_bytes(der[len(_ED25519_SPKI_PREFIX) :])


def load_public_key(path: Path) -> PublicKey:
    """Load an ed25519 public key from a PEM file."""
    pem = _read(path, "public key")
    plain = _plain_ed25519(pem)
    if plain is not None:
        return plain
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(pem)
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
