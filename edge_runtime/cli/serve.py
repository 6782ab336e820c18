"""`edgectl serve`: run the on-device daemon from a settings file."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import click

__all__ = ["serve"]


@click.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The daemon's TOML settings.",
)
@click.option("--store", type=click.Path(path_type=Path), help="Override the model store folder.")
@click.option("--http-port", type=int, help="Override the HTTP port (0: a free port).")
@click.option("--mqtt-host", help="Override the broker host.")
@click.option("--mqtt-port", type=int, help="Override the broker port.")
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning"])
)
def serve(
    config_path: Path,
    store: Path | None,
    http_port: int | None,
    mqtt_host: str | None,
    mqtt_port: int | None,
    log_level: str,
) -> None:
    """Serve the store's models over local HTTP (KServe v2) and MQTT until SIGTERM or Ctrl-C."""
    from edge_runtime.config.settings import load_settings
    from edge_runtime.daemon import Daemon

    settings = load_settings(config_path)
    if store is not None:
        settings = dataclasses.replace(settings, store=str(store.resolve()))
    if http_port is not None:
        settings = dataclasses.replace(settings, http=dataclasses.replace(settings.http, port=http_port))
    mqtt = settings.mqtt
    if mqtt_host is not None:
        mqtt = dataclasses.replace(mqtt, host=mqtt_host)
    if mqtt_port is not None:
        mqtt = dataclasses.replace(mqtt, port=mqtt_port)
    settings = dataclasses.replace(settings, mqtt=mqtt)
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    Daemon(settings).run()
