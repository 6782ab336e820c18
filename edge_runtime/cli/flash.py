"""`edgectl flash`, `rollback`, `models`, `cancel`: model updates over MQTT, from a host.

Exit codes: 0 every device committed (or answered); 1 a device failed, refused or rolled back the
update (one line per device says why); 2 bad arguments; a broker or device that does not answer
in time is an error too (1).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import click

from edge_runtime.cli.broker_options import broker_options
from edge_runtime.client.broker import Broker
from edge_runtime.client.flash import (
    DEFAULT_BLOCK_SIZE,
    FlashResult,
    Prepared,
    base_for,
    bundle_identity,
    command,
    flash_many,
    prepare,
)
from edge_runtime.codecs.update_payloads import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, CommandOp, Probation
from edge_runtime.core.errors import EdgeError, UpdateError, UsageError

__all__ = ["cancel", "flash", "models", "rollback"]

_timeout = click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait.")


class _Progress:
    """One line per state change; on a terminal, the download percent rewritten in place."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, tuple[str, int]] = {}
        self._tty = sys.stdout.isatty()

    def __call__(self, result: FlashResult, report: dict[str, Any]) -> None:
        state, percent = str(report.get("state")), int(report.get("percent") or 0)
        with self._lock:
            if self._last.get(result.device) == (state, percent):
                return
            previous = self._last.get(result.device, ("", 0))[0]
            self._last[result.device] = (state, percent)
            where = f"{result.device}: {result.model} {result.version}"
            if state == "downloading" and self._tty:
                bar = "#" * (percent // 5)
                click.echo(f"\r{where} downloading [{bar:<20}] {percent:3d}%", nl=False)
            elif state == "downloading" and state == previous:
                return
            else:
                lead = "\n" if self._tty and previous == "downloading" else ""
                reason = f": {report['reason']}" if report.get("reason") and state != "committed" else ""
                click.echo(f"{lead}{where} {state}{reason}")


def probation_rules(
    seconds: float | None, error_rate: float, p95_ms: float | None, min_requests: int
) -> Probation | None:
    """The offer's probation from the command-line options (None without --probation)."""
    if seconds is None:
        if p95_ms is not None or error_rate < 1.0:
            raise UsageError("--max-error-rate and --max-p95-ms need --probation SECONDS")
        return None
    return Probation(seconds=seconds, max_error_rate=error_rate, max_p95_ms=p95_ms, min_requests=min_requests)


@click.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--device", "devices", multiple=True, required=True, help="Device id (repeat for several).")
@broker_options()
@click.option("--max-parallel", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Devices transferring at once.")  # fmt: skip
@click.option("--block-size", type=click.IntRange(MIN_BLOCK_SIZE, MAX_BLOCK_SIZE), default=DEFAULT_BLOCK_SIZE,
              show_default=True, help="Bytes per block.")  # fmt: skip
@click.option("--compression", type=click.Choice(["auto", "none", "zstd"]), default="auto", show_default=True,
              help="zstd-compress each block (auto: when it saves 5%).")  # fmt: skip
@click.option("--delta-from", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A bundle the device may have installed; a delta against it is sent when smaller.")  # fmt: skip
@click.option("--new", "new_model", is_flag=True, help="Allow a model the device has never had.")
@click.option(
    "--probation", type=click.FloatRange(0, 86400), help="Seconds to watch the new version after commit."
)
@click.option(
    "--max-error-rate", type=click.FloatRange(0, 1), default=1.0, help="Probation: roll back above this."
)
@click.option(
    "--max-p95-ms", type=click.FloatRange(0), help="Probation: roll back when p95 latency is above this."
)
@click.option("--min-requests", type=click.IntRange(1), default=10, show_default=True,
              help="Probation: judge only after this many requests.")  # fmt: skip
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds per device.")
def flash(
    bundle: Path,
    devices: tuple[str, ...],
    broker: Broker,
    max_parallel: int,
    block_size: int,
    compression: str,
    delta_from: tuple[Path, ...],
    new_model: bool,
    probation: float | None,
    max_error_rate: float,
    max_p95_ms: float | None,
    min_requests: int,
    timeout: float,
) -> None:
    """Push BUNDLE to each --device: pulled in blocks, verified, installed A/B, tried, committed or rolled back."""
    broker.link("check")  # bad TLS files or password file: refused here, before any work
    raw = bundle.read_bytes()
    name = bundle_identity(raw)[0]  # not a signed bundle: refused here, before any device is bothered
    rules = probation_rules(probation, max_error_rate, max_p95_ms, min_requests)

    def planner(device: str) -> Any:
        def plan() -> Prepared:
            base = None
            if delta_from:
                base = base_for(command(broker, device, CommandOp.MODELS)["models"], name, list(delta_from))
            return prepare(raw, block_size=block_size, compression=compression, base=base,
                           new_model=new_model, probation=rules)  # fmt: skip

        return plan

    outcomes = flash_many([(device, planner(device)) for device in dict.fromkeys(devices)], broker,
                          max_parallel=max_parallel, timeout=timeout, progress=_Progress())  # fmt: skip
    failed = []
    for device, outcome in zip(dict.fromkeys(devices), outcomes, strict=True):
        if isinstance(outcome, EdgeError):
            failed.append(f"{device}: {outcome}")
            continue
        click.echo(
            f"{device}: {outcome.model} {outcome.version} {outcome.state} ({outcome.encoding}, "
            f"{outcome.blocks} blocks, {outcome.bytes_sent} bytes sent, {outcome.blocks_resent} re-sent)"
        )
        if not outcome.ok:
            failed.append(f"{device}: {outcome.model} {outcome.version} {outcome.state}: {outcome.reason}")
    if failed:
        raise UpdateError("; ".join(failed))


@click.command()
@click.argument("model")
@click.option("--device", required=True, help="Device id.")
@broker_options()
@_timeout
def rollback(model: str, device: str, broker: Broker, timeout: float) -> None:
    """Make MODEL's previous version active again on a device (hot swap, no restart)."""
    answer = command(broker, device, CommandOp.ROLLBACK, model=model, timeout=timeout)
    click.echo(f"{device}: {model} rolled back to {answer.get('active')} (was {answer.get('previous')})")


@click.command()
@click.argument("model")
@click.option("--device", required=True, help="Device id.")
@broker_options()
@click.option("--timeout", type=float, default=20.0, show_default=True, help="Seconds to wait.")
def cancel(model: str, device: str, broker: Broker, timeout: float) -> None:
    """End MODEL's running update on a device as failed (while it downloads; the running version stays)."""
    answer = command(broker, device, CommandOp.CANCEL, model=model, timeout=timeout)
    click.echo(
        f"{device}: {model} {answer.get('version')} failed: {answer.get('reason')} (job {answer.get('job')})"
    )


@click.command()
@click.option("--device", required=True, help="Device id.")
@broker_options()
@_timeout
@click.option("--json", "as_json", is_flag=True, help="Print the device's answer as JSON.")
def models(device: str, broker: Broker, timeout: float, as_json: bool) -> None:
    """List a device's models: versions installed, active, previous, serving, and the last update."""
    answer = command(broker, device, CommandOp.MODELS, timeout=timeout)["models"]
    if as_json:
        click.echo(json.dumps(answer, indent=1, sort_keys=True))
        return
    if not answer:
        click.echo(f"{device}: no models installed")
    for name, info in sorted(answer.items()):
        if "error" in info:
            click.echo(f"{name}: {info['error']}")
            continue
        versions = ", ".join(f"{v} ({item['role']})" for v, item in sorted(info["versions"].items()))
        click.echo(f"{name}: serving {info['serving'] or '-'}; active {info['active'] or '-'}, "
                   f"previous {info['previous'] or '-'}; installed: {versions or '-'}")  # fmt: skip
        update = info.get("update")
        if update:
            reason = (
                f": {update['reason']}" if update.get("reason") and update["state"] != "committed" else ""
            )
            click.echo(f"  last update: {update['version']} {update['state']} (job {update['job']}){reason}")
