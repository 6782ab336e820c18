"""`edgectl telemetry collect` and `edgectl telemetry summary`: the fleet's telemetry, stored and read."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click

from edge_runtime.cli.broker_options import broker_options
from edge_runtime.client.broker import Broker
from edge_runtime.core.errors import UsageError

if TYPE_CHECKING:
    from edge_runtime.fleet.collector import Collector

__all__ = ["telemetry"]

_DB_HELP = "Store: a file path or sqlite:///PATH (SQLite), or postgresql://USER@HOST:PORT/DB."


@click.group()
def telemetry() -> None:
    """Collect the fleet's telemetry into a database, and summarize it."""


@telemetry.command()
@broker_options()
@click.option("--db", "db_url", required=True, envvar="EDGECTL_DB", help=_DB_HELP)
@click.option("--share", default=None, help="Shared-subscription group: N collectors split the load.")
@click.option("--client-id", default=None, help="MQTT client id [default: edgectl-collect-<host>[-<share>]].")
@click.option("--session-expiry", default=86400, show_default=True, type=click.IntRange(0, 2**32 - 1),
              help="Seconds the broker keeps our session (and queues records) while we are away.")  # fmt: skip
@click.option("--batch", default=500, show_default=True, type=click.IntRange(1, 10000),
              help="Most records stored in one transaction.")  # fmt: skip
@click.option("--stats-every", default=60.0, show_default=True, type=click.FloatRange(0),
              help="Seconds between progress lines on stderr (0: only at exit).")  # fmt: skip
def collect(
    broker: Broker,
    db_url: str,
    share: str | None,
    client_id: str | None,
    session_expiry: int,
    batch: int,
    stats_every: float,
) -> None:
    """Store telemetry, events, status and update reports of every device, each record once.

    Runs until SIGTERM or Ctrl-C, then stores what it received and prints the counts.
    """
    from edge_runtime.fleet.collector import Collector
    from edge_runtime.fleet.db import open_db

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    client_id = client_id or f"edgectl-collect-{socket.gethostname()}" + (f"-{share}" if share else "")
    store = open_db(db_url)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    collector = Collector(broker, store, client_id=client_id, share=share, session_expiry_s=session_expiry,
                          batch=batch)  # fmt: skip
    click.echo(f"collecting {', '.join(collector.filters)} from {broker} into {store.url} as {client_id}",
               err=True)  # fmt: skip
    collector.start()
    try:
        _wait_subscribed(collector, stop)
        started = time.monotonic()
        while not stop.wait(stats_every or None):
            elapsed = time.monotonic() - started
            click.echo(f"collector: {collector.stats.line()} ({collector.stats.stored / elapsed:.0f} stored/s)",
                       err=True)  # fmt: skip
    finally:
        stats = collector.stop()
        store.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo(f"collector stopped: {stats.line()}")


def _wait_subscribed(collector: Collector, stop: threading.Event) -> None:
    """Say when the subscriptions are in place (what was published before is not ours to store),
    retrying while the broker is away; a refusal (TLS, credentials) is one line and exit 1."""
    while not stop.is_set():
        if collector.wait_connected(1.0):
            click.echo("collector: subscribed; storing", err=True)
            return
        refusal = collector.link.refusal()
        if refusal is not None:
            raise UsageError(refusal)


@telemetry.command()
@click.option("--db", "db_url", required=True, envvar="EDGECTL_DB", help=_DB_HELP)
@click.option("--since", default="1h", show_default=True, help="Window: 90s, 15m, 1h, 2d, 1w.")
@click.option("--device", default=None, help="Only this device.")
@click.option("--every", default=None, help="Width of the latency-over-time rows [default: the window / 6].")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw latency and request rate over time into this PNG file (needs matplotlib).")  # fmt: skip
def summary(db_url: str, since: str, device: str | None, every: str | None, plot_path: Path | None) -> None:
    """Per device and model: requests, errors, latency percentiles over time, last seen, version."""
    from edge_runtime.fleet import summary as fleet_summary
    from edge_runtime.fleet.db import open_db

    window = fleet_summary.parse_duration(since)
    width = fleet_summary.parse_duration(every, "--every") if every else window / 6
    start = time.time() - window
    if (
        not db_url.startswith(("postgresql://", "postgres://"))
        and not Path(db_url.removeprefix("sqlite://")).exists()
    ):
        raise UsageError(f"--db '{db_url}': no such store (the collector creates it)")
    store = open_db(db_url)
    try:
        summaries, devices = fleet_summary.load(store, start, device)
    finally:
        store.close()
    click.echo(fleet_summary.render(summaries, devices, start, width))
    if plot_path is not None:
        fleet_summary.plot(summaries, plot_path)
        click.echo(f"plot written to {plot_path}")
