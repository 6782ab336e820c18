"""The options every MQTT-speaking command shares: where the broker is, TLS, and credentials.

Each option also reads an environment variable (``EDGECTL_BROKER``, ``EDGECTL_CA_FILE`` ...), so a
fleet operator sets them once per shell; the password is best given by ``EDGECTL_PASSWORD`` or
``--password-file`` (a command line is visible to every user of the machine in ``ps``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from edge_runtime.client.broker import Broker, parse_broker
from edge_runtime.config.settings import MqttProtocol
from edge_runtime.core.errors import UsageError

__all__ = ["broker_options"]

F = TypeVar("F", bound=Callable[..., Any])
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_FIELDS = (
    "tls",
    "ca_file",
    "cert_file",
    "key_file",
    "username",
    "password",
    "password_file",
    "mqtt_protocol",
)


def _options(flag: str, required: bool, help_text: str) -> list[Callable[[F], F]]:
    env = "EDGECTL_BROKER" if required else None  # an optional address (predict --mqtt) is chosen by hand
    return [
        click.option(flag, "broker_address", required=required, envvar=env, help=help_text),
        click.option(
            "--mqtt-protocol",
            type=click.Choice(["5", "3.1.1"]),
            default="5",
            show_default=True,
            help="MQTT version to ask for (5 falls back to 3.1.1 when the broker refuses it).",
        ),
        click.option(
            "--tls", is_flag=True, envvar="EDGECTL_TLS", help="Connect over TLS (implied by --ca-file)."
        ),
        click.option(
            "--ca-file", type=_FILE, envvar="EDGECTL_CA_FILE", help="PEM CA that signed the broker."
        ),
        click.option("--cert-file", type=_FILE, envvar="EDGECTL_CERT_FILE", help="PEM client certificate."),
        click.option("--key-file", type=_FILE, envvar="EDGECTL_KEY_FILE", help="PEM key of --cert-file."),
        click.option("--username", envvar="EDGECTL_USERNAME", default="", help="MQTT username."),
        click.option(
            "--password",
            envvar="EDGECTL_PASSWORD",
            default="",
            help="MQTT password (prefer EDGECTL_PASSWORD or --password-file: a command line shows in ps).",
        ),
        click.option(
            "--password-file",
            type=_FILE,
            envvar="EDGECTL_PASSWORD_FILE",
            help="File whose first line is the password.",
        ),
    ]


def _broker(address: str | None, flag: str, values: dict[str, Any]) -> Broker | None:
    if address is None:
        return None
    host, port = parse_broker(address, flag)
    cert, key = values["cert_file"], values["key_file"]
    if bool(cert) != bool(key):
        raise UsageError("--cert-file and --key-file go together (mutual TLS needs both)")
    return Broker(
        host,
        port,
        protocol=MqttProtocol(values["mqtt_protocol"]),
        tls=bool(values["tls"]),
        ca_file=str(values["ca_file"] or ""),
        cert_file=str(cert or ""),
        key_file=str(key or ""),
        username=values["username"],
        password=values["password"],
        password_file=str(values["password_file"] or ""),
    )


def broker_options(
    flag: str = "--broker",
    *,
    required: bool = True,
    help_text: str = "MQTT broker HOST:PORT the devices use.",
) -> Callable[[F], F]:
    """Add the broker, TLS and credential options; the command gets one `broker: Broker | None` argument."""

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, broker_address: str | None, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in _FIELDS}
            return command(*args, broker=_broker(broker_address, flag, values), **kwargs)

        decorated: Any = wrapper
        for option in reversed(_options(flag, required, help_text)):
            decorated = option(decorated)
        return decorated  # type: ignore[no-any-return]

    return decorate
