"""How the MQTT link proves who it is and judges a refusal: TLS context, credentials, and which
refusals retrying cannot fix (no paho here; link.py applies them to every client)."""

from __future__ import annotations

import ssl

from edge_runtime.config.settings import MqttSettings
from edge_runtime.core.errors import UsageError

__all__ = ["DENIED", "credentials", "tls_context", "tls_reason"]

DENIED = {
    133: "the client id is not valid for this broker",
    134: "check mqtt.username and the password",
    135: "wrong user name or password, or a client the broker does not admit",
    138: "this client is banned",
    140: "the broker wants another authentication method",
}
"""CONNACK reasons that retrying with the same settings cannot fix (3.1.1's 4 and 5 map to 134, 135).
Mosquitto answers a wrong password with 135 under MQTT 5."""


def tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    """The TLS context for `settings` (None without TLS); UsageError naming the file that cannot be used."""
    if not settings.uses_tls:
        return None
    try:
        context = ssl.create_default_context(cafile=settings.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use mqtt.ca_file '{settings.ca_file}': {exc}") from exc
    if settings.cert_file:
        try:
            context.load_cert_chain(settings.cert_file, settings.key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(
                f"cannot use the client certificate '{settings.cert_file}' with key '{settings.key_file}': {exc}"
            ) from exc
    return context


def credentials(settings: MqttSettings) -> tuple[str, str | None] | None:
    """(username, password) to send, the password read from ``password_file`` when given; None: anonymous."""
    password = settings.password or None
    if settings.password_file:
        try:
            with open(settings.password_file, encoding="utf-8") as file:
                password = file.readline().rstrip("\r\n") or None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read mqtt.password_file '{settings.password_file}': {exc}") from exc
    if not settings.username:
        return None
    return settings.username, password


def tls_reason(exc: BaseException | str) -> str:
    """A TLS failure (an exception, or the text paho logged) said the way a user can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError) and "mismatch" in str(exc.verify_message).lower():
        return (
            f"certificate verify failed: {exc.verify_message} (the broker's certificate does not name "
            "the host we connect to: connect by a name it holds, or reissue it with that --host)"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"certificate verify failed: {exc.verify_message} "
            "(is the CA file, mqtt.ca_file or --ca-file, the one that signed the broker?)"
        )
    reason = exc if isinstance(exc, str) else getattr(exc, "reason", None) or str(exc)
    text = str(reason).lower().replace("_", " ")
    if "alert" in text:
        return (
            f"the broker rejected our client certificate ({text}; is the client certificate, "
            "mqtt.cert_file or --cert-file, signed by the CA the broker trusts?)"
        )
    return text
