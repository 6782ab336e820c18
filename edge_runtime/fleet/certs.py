"""A throwaway certificate authority for a test fleet: one CA, a broker certificate, and a client
certificate per device and operator (the one module besides ``artifact/signing.py`` that imports
`cryptography`).

A device certificate's common name is the device id, so a broker that takes the certificate's
identity as the user name (Mosquitto ``use_identity_as_username``) confines the device with ACL
patterns on ``%u``. Keys are ECDSA P-256, written with mode 0600. For a production fleet use your
own PKI (an HSM- or Vault-backed CA): this one keeps its key in a plain file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_runtime.core.errors import UsageError
from edge_runtime.core.topic_names import check_level

__all__ = ["CA_CERT", "CA_KEY", "CertFiles", "CertRole", "make_ca", "make_cert"]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"


class CertRole(StrEnum):
    """What a certificate is for (its extended key usage)."""

    DEVICE = "device"
    OPERATOR = "operator"
    SERVER = "server"


@dataclass(frozen=True)
class CertFiles:
    """The files of one certificate: itself, its private key, and the CA that signed it."""

    cert: Path
    key: Path
    ca: Path


def _write(path: Path, data: bytes, *, secret: bool, force: bool) -> None:
    if path.exists() and not force:
        raise UsageError(f"{path} exists (pass --force to overwrite it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _builder(
    subject: str, issuer: x509.Name, public: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


def make_ca(
    directory: Path, *, name: str = "edge test fleet CA", days: int = 365, force: bool = False
) -> CertFiles:
    """Write a new self-signed CA (``ca.crt``, ``ca.key``) into `directory`."""
    directory = Path(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    files = CertFiles(directory / CA_CERT, directory / CA_KEY, directory / CA_CERT)
    _write(files.key, _key_pem(key), secret=True, force=force)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), secret=False, force=force)
    return files


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the CA in {ca_dir} ({CA_CERT}, {CA_KEY}): {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"{ca_dir / CA_KEY} is not an EC key made by 'edgectl certs ca'")
    return cert, key


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_cert(
    ca_dir: Path,
    name: str,
    directory: Path,
    *,
    role: CertRole = CertRole.DEVICE,
    hosts: tuple[str, ...] = (),
    days: int = 365,
    force: bool = False,
) -> CertFiles:
    """Write ``<name>.crt`` and ``<name>.key`` signed by the CA in `ca_dir` (CN = `name`)."""
    check_level(name, f"{role.value} name")  # a file name, and for clients the MQTT user name (%u in ACLs)
    if role is CertRole.SERVER and not hosts:
        raise UsageError("a broker certificate needs at least one host name or IP address (--host)")
    ca_cert, ca_key = _load_ca(Path(ca_dir))
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role is CertRole.SERVER else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(name, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    directory = Path(directory)
    files = CertFiles(directory / f"{name}.crt", directory / f"{name}.key", Path(ca_dir) / CA_CERT)
    _write(files.key, _key_pem(key), secret=True, force=force)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), secret=False, force=force)
    return files
