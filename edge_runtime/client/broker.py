"""How a host-side command reaches the devices' broker: address, TLS and credentials, in one value.

Every ``edgectl`` command that talks MQTT (flash, models, rollback, predict, the fleet commands)
takes a `Broker` and opens its connections with `Broker.link`, so TLS and credentials are set up
in one place, the same way as the daemon's (`MqttSettings`).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_runtime.config.settings import MqttProtocol, MqttSettings
from edge_runtime.core.errors import UsageError

if TYPE_CHECKING:
    from edge_runtime.transports.mqtt.link import MqttLink

__all__ = ["Broker", "parse_broker"]


def parse_broker(broker: str, option: str = "--broker") -> tuple[str, int]:
    """(host, port) of a HOST:PORT broker address (UsageError otherwise)."""
    host, _, port = broker.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise UsageError(f"{option} '{broker}' must be HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Broker:
    """A broker and how to authenticate to it (the host side's half of `MqttSettings`)."""

    host: str
    port: int
    protocol: MqttProtocol = MqttProtocol.V5
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password: str = ""
    password_file: str = ""

    @classmethod
    def of(cls, value: Broker | str, **options: Any) -> Broker:
        """`value` itself, or a Broker for a HOST:PORT string (with `options` as fields)."""
        if isinstance(value, Broker):
            return value
        host, port = parse_broker(value)
        return cls(host, port, **options)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    def settings(self, **overrides: Any) -> MqttSettings:
        """`MqttSettings` for a short-lived host-side connection (quick reconnects), with `overrides`."""
        fields = {
            "host": self.host,
            "port": self.port,
            "protocol": self.protocol,
            "tls": self.tls,
            "ca_file": self.ca_file,
            "cert_file": self.cert_file,
            "key_file": self.key_file,
            "username": self.username,
            "password": self.password,
            "password_file": self.password_file,
            "workers": 2,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 1.0,
        }
        return dataclasses.replace(MqttSettings(), **{**fields, **overrides})

    def link(self, name: str, **overrides: Any) -> MqttLink:
        """A new (not started) link with client id ``edgectl-<name>-<random>``; UsageError for bad TLS files."""
        from edge_runtime.transports.mqtt.link import MqttLink

        return MqttLink(self.settings(**overrides), f"edgectl-{name}-{uuid.uuid4().hex[:8]}")
