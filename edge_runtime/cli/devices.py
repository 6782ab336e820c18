"""`edgectl devices`: the fleet view (one row per device) from the retained presence, facts and update reports.

Exit codes: 0 (also when ``--watch`` ends with Ctrl-C); 1 the broker cannot be reached; 2 bad arguments.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from types import FrameType

import click

from edge_runtime.cli.broker_options import broker_options
from edge_runtime.client.broker import Broker
from edge_runtime.fleet.devices import DeviceRow, FleetView, fleet_snapshot

__all__ = ["devices", "format_table"]

_HEADERS = ("DEVICE", "STATUS", "PROFILE", "GROUPS", "HEALTH", "MODELS", "LAST SEEN")


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    seconds = max(0.0, now - ts)
    return (
        f"{seconds:.0f}s ago"
        if seconds < 120
        else f"{seconds / 60:.0f}m ago"
        if seconds < 7200
        else (time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)))
    )


def _models(row: DeviceRow) -> str:
    parts = []
    for name in sorted(set(row.models) | set(row.updates)):
        info = row.models.get(name, {})
        text = f"{name} {info.get('version') or '?'}"
        if info.get("state") not in (None, "serving"):
            text += f" ({info.get('state')})"
        update = row.updates.get(name)
        if update and update.get("state") not in ("committed", None) and update.get("version"):
            text += f" [update {update['version']}: {update['state']}]"
        parts.append(text)
    return ", ".join(parts) or "-"


def format_table(rows: list[DeviceRow], now: float | None = None) -> str:
    """The rows as an aligned text table."""
    now = time.time() if now is None else now
    status = {True: "online", False: "offline", None: "?"}
    lines = [_HEADERS] + [
        (r.device, status[r.online], r.profile or "-", ",".join(r.groups) or "-", r.health or "-", _models(r),
         _ago(r.last_seen, now))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(_HEADERS) - 1)]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + "  " + line[-1]
           for line in lines]  # fmt: skip
    online = sum(r.online is True for r in rows)
    out.append(f"{len(rows)} device(s), {online} online")
    return "\n".join(line.rstrip() for line in out)


def _render(view: FleetView, group: str | None, as_json: bool) -> str:
    rows = view.rows(group)
    if as_json:
        return json.dumps([row.to_dict() for row in rows], sort_keys=True)
    text = format_table(rows)
    if view.rejected:
        text += f" ({view.rejected} malformed message(s) ignored)"
    return text


@click.command()
@broker_options()
@click.option("--group", help="Only devices that declare this group (the `groups` of their config).")
@click.option("--wait", type=click.FloatRange(0.1, 60), default=1.5, show_default=True,
              help="Seconds to listen (retained state arrives at once; telemetry within its interval).")  # fmt: skip
@click.option("--watch", type=click.FloatRange(0.2, 3600), is_flag=False, flag_value=2.0, default=None,
              help="Refresh every SECONDS (2 when given alone) until Ctrl-C.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON (one array per refresh).")
def devices(broker: Broker, group: str | None, wait: float, watch: float | None, as_json: bool) -> None:
    """List the fleet: device, online/offline, profile, groups, health, models and versions, last seen."""
    if watch is None:
        click.echo(_render(fleet_snapshot(broker, wait_s=wait), group, as_json))
        return
    tty = sys.stdout.isatty() and not as_json

    def show(view: FleetView) -> None:
        text = _render(view, group, as_json)
        click.echo(("\x1b[H\x1b[J" if tty else "") + text + ("" if tty else "\n"), nl=not tty)

    # Ctrl-C or SIGTERM sets an event the watch loop waits on: it ends between refreshes, never by an
    # exception unwinding whatever the main thread was doing.
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        fleet_snapshot(broker, wait_s=wait, on_view=show, every_s=watch, stop=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
