"""The daemon's configuration: one TOML file read once at start into frozen dataclasses.

Unknown keys are an error naming the key and the file (the same validation as device profiles).
Relative paths are resolved against the folder of the configuration file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import ssl
import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np

from edge_runtime.config.profiles import build_from_table
from edge_runtime.core.errors import UsageError
from edge_runtime.core.topic_names import check_level, check_topic
from edge_runtime.core.types import StreamDecoding

__all__ = [
    "HttpSettings",
    "MqttProtocol",
    "MqttSettings",
    "OutboxSettings",
    "Settings",
    "StreamBinding",
    "TelemetrySettings",
    "UpdateSettings",
    "check_files",
    "load_settings",
    "parse_settings",
]


class MqttProtocol(StrEnum):
    """The MQTT protocol version the daemon asks the broker for first."""

    V5 = "5"
    V311 = "3.1.1"


@dataclass(frozen=True)
class HttpSettings:
    """The local KServe v2 HTTP API."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    """0 picks a free port."""
    max_connections: int = 256
    """Open client connections; one more is answered 503 and closed (keep it well under LimitNOFILE)."""
    header_timeout_s: float = 10.0
    """A request head (line and headers) must arrive whole within this time of its first byte."""
    body_timeout_s: float = 10.0
    body_min_bytes_per_s: int = 256 * 1024
    """A body of n bytes must arrive within ``body_timeout_s + n / body_min_bytes_per_s``."""
    idle_timeout_s: float = 60.0
    """A keep-alive connection with no request in progress is closed after this long."""
    write_timeout_s: float = 60.0
    """A client that reads none of its replies for this long is disconnected."""
    write_high_water_bytes: int = 256 * 1024
    """Replies queued for a client beyond which its connection stops reading requests."""
    max_header_bytes: int = 64 * 1024
    max_pending_body_bytes: int = 64 * 1024 * 1024
    """Request bodies held at once over all connections; a body that would exceed it gets 503."""
    inline_max_body_bytes: int = 64 * 1024
    """Only requests with smaller bodies may run on the event loop (the rest go to a worker)."""
    inline_max_ms: float = 1.0
    """... and only for models whose recent requests took less than this."""
    workers: int = 4
    """Threads that decode, run and encode requests too large or slow to answer on the loop."""
    token_file: str = ""
    """A file whose first line is the bearer token every request must carry (``Authorization: Bearer``);
    the health endpoints stay open for probes. Empty: no token."""
    cert_file: str = ""
    """PEM server certificate: serve HTTPS (needs ``key_file``)."""
    key_file: str = ""
    """PEM private key of ``cert_file``."""
    client_ca_file: str = ""
    """PEM CA(s): clients must present a certificate signed by one (mutual TLS; needs ``cert_file``)."""

    @property
    def uses_tls(self) -> bool:
        """True when the server speaks HTTPS."""
        return bool(self.cert_file)

    @property
    def authenticated(self) -> bool:
        """True when a request must prove who sent it (bearer token or client certificate)."""
        return bool(self.token_file or self.client_ca_file)

    def check(self, source: str) -> None:
        """UsageError naming the first limit that is not positive, or a TLS file without its partner."""
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name not in ("enabled", "host", "port") and not isinstance(value, str) and value <= 0:
                raise UsageError(f"{source}: http.{item.name} must be positive, got {value}")
        if bool(self.cert_file) != bool(self.key_file):
            raise UsageError(f"{source}: http.cert_file and http.key_file go together (HTTPS needs both)")
        if self.client_ca_file and not self.cert_file:
            raise UsageError(
                f"{source}: http.client_ca_file (mutual TLS) needs http.cert_file and http.key_file"
            )


@dataclass(frozen=True)
class MqttSettings:
    """The broker connection."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: MqttProtocol = MqttProtocol.V5
    fallback: bool = True
    """When the broker refuses MQTT 5, retry with 3.1.1."""
    keepalive: int = 30
    client_id: str = ""
    """Empty: ``edge-<device_id>``."""
    username: str = ""
    password: str = ""
    password_file: str = ""
    """A file holding the password (first line), so it need not sit in the config; wins over ``password``."""
    tls: bool = False
    """Connect over TLS (implied by ``ca_file`` or ``cert_file``); without ``ca_file``, the system's CAs."""
    ca_file: str = ""
    """PEM file of the CA(s) that signed the broker's certificate."""
    cert_file: str = ""
    """PEM client certificate (mutual TLS); needs ``key_file``."""
    key_file: str = ""
    """PEM private key of ``cert_file``."""
    workers: int = 2
    """Threads running inference for MQTT requests (never paho's network thread)."""
    queue_size: int = 256
    """Messages waiting for a worker; beyond it requests are answered "busy" (503)."""
    queue_bytes: int = 64 * 1024 * 1024
    """Payload bytes waiting for a worker; beyond it requests are answered "busy" (503)."""
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    session_expiry_s: int = 0
    """0: a clean session on every connect. Above 0: the broker keeps our subscriptions and queues QoS 1
    messages for this many seconds while we are away (MQTT 5 session expiry; 3.1.1: a persistent
    session); needs a fixed ``client_id``."""

    @property
    def uses_tls(self) -> bool:
        """True when the connection is TLS (asked for, or implied by a CA or client certificate)."""
        return self.tls or bool(self.ca_file or self.cert_file)

    @property
    def address(self) -> str:
        """``host:port``, for messages."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TelemetrySettings:
    """Periodic telemetry."""

    interval_s: float = 30.0


@dataclass(frozen=True)
class OutboxSettings:
    """The on-disk queue for telemetry, events and durable stream results."""

    path: str = "outbox.sqlite"
    max_records: int = 10000
    max_bytes: int = 16 * 1024 * 1024
    """Bound on the records' bytes (topics + payloads); beyond it, as beyond max_records, the oldest go."""


@dataclass(frozen=True)
class StreamBinding:
    """Subscribe to `topic`, decode, run `model`, publish the result to `output_topic`."""

    topic: str
    model: str
    output_topic: str
    decode: StreamDecoding = StreamDecoding.JSON
    input: str = ""
    """Input tensor name (json / raw); empty: the model's only input."""
    dtype: str = "float32"
    shape: tuple[int, ...] = ()
    """Shape to reshape the values to (one -1 allowed); empty: as decoded."""
    qos: int = 1
    durable: bool = False
    """Queue results in the on-disk outbox (survive outages, at one fsync per result)."""


@dataclass(frozen=True)
class UpdateSettings:
    """Model updates over MQTT: the block transfer and the space an update may use."""

    window: int = 16
    """Blocks in flight at once (at most this many are sent again after a broker restart); 1 to 256."""
    save_bytes: int = 4 << 20
    """Received bytes at most not yet fdatasynced (what a power cut can cost; a sync starts at half)."""
    stall_s: float = 3.0
    """Ask for the blocks in flight again when none of them arrived for this long."""
    give_up_s: float = 600.0
    """Fail the job when no block at all arrived for this long."""
    reserve_bytes: int = 16 << 20
    """Free bytes the store keeps beyond what an update needs (an offer that would eat them is refused)."""

    def check(self, source: str) -> None:
        """UsageError naming the first value out of its range."""
        limits = {"window": (1, 256), "save_bytes": (1, 1 << 40), "stall_s": (0.01, 86400.0),
                  "give_up_s": (self.stall_s, 7 * 86400.0), "reserve_bytes": (0, 1 << 50)}  # fmt: skip
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise UsageError(f"{source}: update.{name} must be from {low:g} to {high:g}, got {value}")


@dataclass(frozen=True)
class Settings:
    """Everything the daemon is built from."""

    device_id: str
    profile: str
    """Built-in device profile name, or a path to a .toml profile."""
    store: str
    public_key: str
    max_request_bytes: int = 16 * 1024 * 1024
    strict_readiness: bool = True
    """Ready only when every model in the store serves (as Triton's strict readiness); false: when any does."""
    http: HttpSettings = field(default_factory=HttpSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    streams: tuple[StreamBinding, ...] = ()
    update: UpdateSettings = field(default_factory=UpdateSettings)
    groups: tuple[str, ...] = ()
    """Fleet groups this device belongs to (``["line-3", "canary"]``), published in its facts record."""
    source: str = ""
    """The file the settings were read from."""

    @property
    def client_id(self) -> str:
        """The MQTT client id to use."""
        return self.mqtt.client_id or f"edge-{self.device_id}"


def _check(settings: Settings, source: str) -> None:
    """Reject values that are well-typed but unusable."""
    check_level(settings.device_id, f"{source}: device_id")
    for group in settings.groups:
        check_level(group, f"{source}: groups")
    for port, key in ((settings.http.port, "http.port"), (settings.mqtt.port, "mqtt.port")):
        if not 0 <= port <= 65535:
            raise UsageError(f"{source}: {key} must be between 0 and 65535, got {port}")
    positive = {
        "mqtt.keepalive": settings.mqtt.keepalive,
        "mqtt.workers": settings.mqtt.workers,
        "mqtt.queue_size": settings.mqtt.queue_size,
        "mqtt.queue_bytes": settings.mqtt.queue_bytes,
        "telemetry.interval_s": settings.telemetry.interval_s,
        "outbox.max_records": settings.outbox.max_records,
        "outbox.max_bytes": settings.outbox.max_bytes,
        "max_request_bytes": settings.max_request_bytes,
        "mqtt.reconnect_min_s": settings.mqtt.reconnect_min_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UsageError(f"{source}: {key} must be positive, got {value}")
    settings.http.check(source)
    settings.update.check(source)
    if settings.mqtt.keepalive > 65535:  # a 16-bit field in the MQTT CONNECT packet
        raise UsageError(f"{source}: mqtt.keepalive must be at most 65535 s, got {settings.mqtt.keepalive}")
    if settings.mqtt.reconnect_max_s < settings.mqtt.reconnect_min_s:
        raise UsageError(
            f"{source}: mqtt.reconnect_max_s ({settings.mqtt.reconnect_max_s}) is below "
            f"mqtt.reconnect_min_s ({settings.mqtt.reconnect_min_s})"
        )
    if bool(settings.mqtt.cert_file) != bool(settings.mqtt.key_file):
        raise UsageError(f"{source}: mqtt.cert_file and mqtt.key_file go together (mutual TLS needs both)")
    for index, binding in enumerate(settings.streams):
        where = f"{source}: streams[{index}]"
        try:
            check_topic(binding.topic.replace("{device}", settings.device_id), wildcards=True)
            check_topic(binding.output_topic.replace("{device}", settings.device_id))
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
        _check_stream_tensor(binding, where)
        if binding.qos not in (0, 1, 2):
            raise UsageError(f"{where}: qos must be 0, 1 or 2, got {binding.qos}")


def _check_stream_tensor(binding: StreamBinding, where: str) -> None:
    """A stream's dtype is a numeric numpy dtype and its shape has non-negative dims and at most one -1."""
    kind: str = ""
    with contextlib.suppress(TypeError, ValueError, SyntaxError):  # numpy's dtype parser raises any of these
        kind = np.dtype(binding.dtype).kind
    if kind not in ("b", "i", "u", "f"):
        raise UsageError(
            f"{where}: dtype '{binding.dtype}' is not a numeric numpy dtype name (float32, int64, uint8, bool ...)"
        )
    if any(dim < -1 for dim in binding.shape) or binding.shape.count(-1) > 1:
        raise UsageError(f"{where}: shape {list(binding.shape)} may hold sizes >= 0 and at most one -1")


def _resolve(settings: Settings, base: Path) -> Settings:
    """Paths made absolute against `base` (the config file's folder)."""

    def absolute(value: str) -> str:
        return str(base / value) if value and not Path(value).is_absolute() else value

    http = dataclasses.replace(
        settings.http,
        token_file=absolute(settings.http.token_file),
        cert_file=absolute(settings.http.cert_file),
        key_file=absolute(settings.http.key_file),
        client_ca_file=absolute(settings.http.client_ca_file),
    )

    profile = absolute(settings.profile) if settings.profile.endswith(".toml") else settings.profile
    outbox = dataclasses.replace(settings.outbox, path=absolute(settings.outbox.path))
    mqtt = dataclasses.replace(
        settings.mqtt,
        password_file=absolute(settings.mqtt.password_file),
        ca_file=absolute(settings.mqtt.ca_file),
        cert_file=absolute(settings.mqtt.cert_file),
        key_file=absolute(settings.mqtt.key_file),
    )
    return dataclasses.replace(
        settings,
        profile=profile,
        http=http,
        mqtt=mqtt,
        store=absolute(settings.store),
        public_key=absolute(settings.public_key),
        outbox=outbox,
    )


def _check_file(path: str, key: str, source: str) -> None:
    """UsageError unless `path` (when set) is a readable file."""
    if not path:
        return
    if not os.path.isfile(path):
        raise UsageError(f"{source}: {key} '{path}' does not exist or is not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{source}: {key} '{path}' is not readable by this user")


def _check_tls_pair(cert: str, key: str, ca: str, names: tuple[str, str, str], source: str) -> None:
    """UsageError when the CA, or the certificate and key, cannot be loaded (wrong PEM, key of another cert)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"{source}: {names[0]} '{ca}' holds no usable PEM certificate: {exc}") from None
    if cert:
        try:
            context.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(
                f"{source}: {names[1]} '{cert}' and {names[2]} '{key}' do not load as a "
                f"PEM certificate and its private key: {exc}"
            ) from None


def check_files(settings: Settings) -> None:
    """UsageError naming the first TLS, token or password file that is missing, unreadable or unusable."""
    source, mqtt, http = settings.source, settings.mqtt, settings.http
    files = {
        "mqtt.ca_file": mqtt.ca_file,
        "mqtt.cert_file": mqtt.cert_file,
        "mqtt.key_file": mqtt.key_file,
        "mqtt.password_file": mqtt.password_file,
        "http.token_file": http.token_file,
        "http.cert_file": http.cert_file,
        "http.key_file": http.key_file,
        "http.client_ca_file": http.client_ca_file,
    }
    for key, path in files.items():
        _check_file(path, key, source)
    if mqtt.enabled:
        _check_tls_pair(mqtt.cert_file, mqtt.key_file, mqtt.ca_file,
                        ("mqtt.ca_file", "mqtt.cert_file", "mqtt.key_file"), source)  # fmt: skip
    if http.enabled:
        _check_tls_pair(http.cert_file, http.key_file, http.client_ca_file,
                        ("http.client_ca_file", "http.cert_file", "http.key_file"), source)  # fmt: skip


def parse_settings(text: str, source: str, base: Path | None = None) -> Settings:
    """Parse and validate settings from TOML text; `source` names it in errors."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: not valid TOML: {exc}") from exc
    settings = build_from_table(Settings, table, source, error=UsageError)
    _check(settings, source)
    settings = _resolve(settings, base or Path.cwd())
    return dataclasses.replace(settings, source=source)


def load_settings(path: Path) -> Settings:
    """Read the daemon's settings from a TOML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read settings {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"settings {path} are not UTF-8 text: {exc}") from exc
    settings = parse_settings(text, str(path), path.resolve().parent)
    check_files(settings)
    return settings
