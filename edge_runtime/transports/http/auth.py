"""Who may use the HTTP API: an optional bearer token, and the TLS (optionally mutual TLS) context.

With ``http.token_file`` set, every request but the health probes (``/v2/health/live``,
``/v2/health/ready``: a supervisor or load balancer must reach them without a secret) needs
``Authorization: Bearer <token>``; anything else is answered 401 before its body is read, so an
unauthenticated client cannot make the server buffer a body. The token is compared in constant
time. With ``http.cert_file`` the server speaks HTTPS; with ``http.client_ca_file`` too, the TLS
handshake itself refuses a client without a certificate signed by that CA (mutual TLS).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl

from edge_runtime.config.settings import HttpSettings
from edge_runtime.core.errors import UsageError

__all__ = ["OPEN_PATHS", "BearerAuth", "is_loopback", "server_tls_context", "warn_if_exposed"]

log = logging.getLogger("edge_runtime.transports.http.server")

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
"""Paths answered without a token (probes); they say live/ready and which models serve or were refused."""
MIN_TOKEN_CHARS = 16
_SCHEME = "bearer "


class BearerAuth:
    """Checks the ``Authorization: Bearer`` header of each request against one token."""

    def __init__(self, token: str) -> None:
        if len(token) < MIN_TOKEN_CHARS:
            raise UsageError(f"the HTTP bearer token must be at least {MIN_TOKEN_CHARS} characters long")
        self._token = token.encode("utf-8")

    @classmethod
    def from_file(cls, path: str) -> BearerAuth:
        """The token on the first line of `path` (UsageError naming the file when it cannot be used)."""
        try:
            with open(path, encoding="utf-8") as file:
                token = file.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read http.token_file '{path}': {exc}") from exc
        try:
            return cls(token)
        except UsageError as exc:
            raise UsageError(f"http.token_file '{path}': {exc}") from None

    def allows(self, path: str, authorization: str | None) -> bool:
        """True for an open path, or a header carrying the token."""
        if path in OPEN_PATHS:
            return True
        if authorization is None or authorization[: len(_SCHEME)].lower() != _SCHEME:
            return False
        offered = authorization[len(_SCHEME) :].strip().encode("utf-8", "surrogateescape")
        return hmac.compare_digest(offered, self._token)


def server_tls_context(settings: HttpSettings) -> ssl.SSLContext | None:
    """The HTTPS context of `settings` (None for plain HTTP), requiring client certificates for mTLS."""
    if not settings.uses_tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.cert_file, settings.key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(
            f"cannot use http.cert_file '{settings.cert_file}' with http.key_file '{settings.key_file}': {exc}"
        ) from exc
    if settings.client_ca_file:
        try:
            context.load_verify_locations(cafile=settings.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot use http.client_ca_file '{settings.client_ca_file}': {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def is_loopback(host: str) -> bool:
    """True when `host` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything


def warn_if_exposed(settings: HttpSettings, host: str, port: int) -> None:
    """A WARNING when the API listens beyond loopback with neither a token nor client certificates."""
    if is_loopback(host) or settings.authenticated:
        return
    log.warning(
        "HTTP API on %s:%d is reachable from the network without authentication: anyone who reaches "
        "it can run and inspect models; set http.token_file or http.client_ca_file (mutual TLS), "
        "or bind http.host to 127.0.0.1",
        host,
        port,
    )
