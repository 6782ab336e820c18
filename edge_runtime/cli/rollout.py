"""`edgectl rollout`: one bundle to a fleet in waves (canary first), journaled so a re-run resumes.

Exit codes: 0 the rollout finished (every device committed or already had the version, or failures
stayed under ``--max-failures``); 1 it stopped (the summary says why) or the broker cannot be
reached; 2 bad arguments.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from edge_runtime.cli.broker_options import broker_options
from edge_runtime.cli.flash import probation_rules
from edge_runtime.client.broker import Broker
from edge_runtime.client.flash import DEFAULT_BLOCK_SIZE, bundle_identity
from edge_runtime.codecs.update_payloads import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE
from edge_runtime.core.errors import UpdateError, UsageError
from edge_runtime.core.topic_names import check_level
from edge_runtime.fleet.devices import fleet_snapshot
from edge_runtime.fleet.rollout import Rollout, RolloutOptions, summary_line

__all__ = ["read_devices", "rollout"]

MAX_DEVICES_FILE_BYTES = 16 << 20


def read_devices(path: Path) -> list[str]:
    """Device ids from a file: one per line, blank lines and ``#`` comments ignored, duplicates dropped."""
    try:
        if path.stat().st_size > MAX_DEVICES_FILE_BYTES:
            raise UsageError(f"--devices {path} is over {MAX_DEVICES_FILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --devices {path}: {exc}") from exc
    devices = []
    for number, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if item:
            devices.append(check_level(item, f"--devices {path} line {number}: device id"))
    if not devices:
        raise UsageError(f"--devices {path} lists no device")
    return list(dict.fromkeys(devices))


def _group(broker: Broker, group: str) -> list[str]:
    devices = [row.device for row in fleet_snapshot(broker, wait_s=1.5).rows(group)]
    if not devices:
        raise UsageError(
            f"no device declares group '{group}' (edgectl devices --group {group} shows the same)"
        )
    return devices


@click.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--devices", "devices_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File of device ids, one per line (# comments).")  # fmt: skip
@click.option("--group", help="Every device whose facts declare this group.")
@broker_options()
@click.option("--canary", type=click.IntRange(0, 10_000), default=1, show_default=True,
              help="Devices in the first wave; any failure there stops the rollout.")  # fmt: skip
@click.option("--wave-size", type=click.IntRange(1, 100_000), default=10, show_default=True,
              help="Devices per later wave.")  # fmt: skip
@click.option("--max-parallel", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Transfers at once within a wave.")  # fmt: skip
@click.option("--max-failures", type=click.IntRange(1), default=1, show_default=True,
              help="Stop after a wave that brings the failures to this many.")  # fmt: skip
@click.option(
    "--rollback-on-stop", is_flag=True, help="On a stop, roll back the devices this rollout committed."
)
@click.option(
    "--probation", type=click.FloatRange(0, 86400), help="Seconds each device watches the new version."
)
@click.option(
    "--max-error-rate", type=click.FloatRange(0, 1), default=1.0, help="Probation: roll back above this."
)
@click.option("--max-p95-ms", type=click.FloatRange(0), help="Probation: roll back above this p95 latency.")
@click.option("--min-requests", type=click.IntRange(1), default=10, show_default=True,
              help="Probation: judge only after this many requests.")  # fmt: skip
@click.option("--block-size", type=click.IntRange(MIN_BLOCK_SIZE, MAX_BLOCK_SIZE), default=DEFAULT_BLOCK_SIZE,
              show_default=True, help="Bytes per block.")  # fmt: skip
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds per device.")
@click.option("--state", "state_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Progress journal (default: rollout-<model>-<version>-<sha8>.json here); re-run to resume.")  # fmt: skip
def rollout(
    bundle: Path, devices_file: Path | None, group: str | None, broker: Broker, canary: int, wave_size: int,
    max_parallel: int, max_failures: int, rollback_on_stop: bool, probation: float | None,
    max_error_rate: float, max_p95_ms: float | None, min_requests: int, block_size: int, timeout: float,
    state_file: Path | None,
) -> None:  # fmt: skip
    """Push BUNDLE to a fleet: a canary wave, then waves of --wave-size; stop after --max-failures."""
    if (devices_file is None) == (group is None):
        raise UsageError("give one of --devices FILE or --group NAME")
    broker.link("check")  # bad TLS files or password file: refused here, before any work
    raw = bundle.read_bytes()
    model, version, _ = bundle_identity(raw)
    state_path = state_file or Path(f"rollout-{model}-{version}-{hashlib.sha256(raw).hexdigest()[:8]}.json")
    devices = read_devices(devices_file) if devices_file is not None else []
    if group is not None and not state_path.exists():  # resuming keeps the journal's device list
        devices = _group(broker, group)
    options = RolloutOptions(canary=canary, wave_size=wave_size, max_parallel=max_parallel,
                             max_failures=max_failures, rollback_on_stop=rollback_on_stop,
                             probation=probation_rules(probation, max_error_rate, max_p95_ms, min_requests),
                             timeout=timeout, block_size=block_size)  # fmt: skip
    job = Rollout(broker, raw, devices, state_path, options, progress=click.echo)
    planned = job.journal.devices
    if devices and devices != planned:
        click.echo(
            f"resuming {state_path}: its {len(planned)} device(s) are used, not the {len(devices)} given"
        )
    click.echo(f"rollout {model} {version} to {len(planned)} device(s); state in {state_path}")
    summary = job.run()
    click.echo(summary_line(summary))
    if not summary.ok:
        raise UpdateError(f"rollout stopped: {summary.stopped}")
