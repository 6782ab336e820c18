"""Staged rollouts: one bundle to many devices, a canary wave first, then waves under a concurrency cap.

Each wave goes out with `flash_many`; a device counts as done when it reports ``committed`` (which
the device sends only after its probation, when the offer carries one) and its retained facts show
the new version serving and its health no worse than before. After the canary wave any failure
stops the rollout; after a later wave, ``max_failures`` failures in all do. On a stop, the devices
this rollout committed can be rolled back (``rollback_on_stop``).

Resume rules (the journal, a JSON file written atomically before every offer and after every
outcome, keyed by the bundle's sha256):

- a device the journal has as committed, failed, rolled back or reverted is never offered again;
- a device the journal has as offered (the operator's process died mid-job) is re-attached to the
  *same* job id: its retained update report decides (terminal: the outcome is taken as is; not
  terminal: the host serves blocks again under that job, which the device dedups), so a device
  never gets a second job for one rollout;
- a pending device whose retained facts or update report already show the version is skipped;
- a rollout that stopped stays stopped (a new ``--state`` file starts over).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from edge_runtime.client.broker import Broker
from edge_runtime.client.flash import FlashResult, Prepared, bundle_identity, command, flash_many, prepare
from edge_runtime.codecs.update_payloads import CommandOp, Probation
from edge_runtime.core.errors import EdgeError, UsageError
from edge_runtime.core.files import atomic_write
from edge_runtime.fleet.devices import DeviceRow, FleetView, watch_fleet

__all__ = ["DeviceState", "Rollout", "RolloutJournal", "RolloutOptions", "RolloutSummary", "plan_waves"]

JOURNAL_VERSION = 1
HEALTH_WAIT_S = 15.0
"""How long a committed device's facts may take to show the new version serving."""


class DeviceState(StrEnum):
    """Where one device stands in a rollout (as journaled)."""

    PENDING = "pending"
    OFFERED = "offered"
    COMMITTED = "committed"
    ALREADY = "already"
    """It had the version before this rollout offered it anything."""
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    """The device rolled the update back itself (self-test, probation)."""
    REVERTED = "reverted"
    """Committed, then rolled back by this rollout when it stopped."""

    @property
    def failure(self) -> bool:
        """True for the outcomes that count against ``max_failures``."""
        return self in (DeviceState.FAILED, DeviceState.ROLLED_BACK)

    @property
    def open(self) -> bool:
        """True while the device still has to go through its wave."""
        return self in (DeviceState.PENDING, DeviceState.OFFERED)


@dataclass(frozen=True)
class RolloutOptions:
    """How the rollout is staged."""

    canary: int = 1
    wave_size: int = 10
    max_parallel: int = 4
    max_failures: int = 1
    rollback_on_stop: bool = False
    probation: Probation | None = None
    timeout: float = 600.0
    """Seconds per device (transfer, install, trial, probation)."""
    block_size: int = 128 << 10
    compression: str = "auto"


def plan_waves(devices: list[str], canary: int, wave_size: int) -> list[list[str]]:
    """The canary wave (the first `canary` devices), then waves of `wave_size`."""
    first, rest = devices[:canary], devices[canary:]
    return ([first] if first else []) + [rest[i : i + wave_size] for i in range(0, len(rest), wave_size)]


class RolloutJournal:
    """The rollout's progress on disk: written atomically (temp, fsync, rename, fsync dir) on every change."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path = path
        self.doc = doc
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, *, sha256: str, model: str, version: str, devices: list[str]) -> RolloutJournal:
        """The journal at `path` (resumed) or a new one for `devices`; UsageError if it is another rollout's."""
        if path.exists():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
                known = doc["bundle_sha256"], doc["devices"], doc["status"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UsageError(
                    f"rollout state {path} is unreadable ({exc}); move it away to start over"
                ) from exc
            if known[0] != sha256:
                raise UsageError(f"rollout state {path} belongs to another bundle ({doc.get('model')} "
                                 f"{doc.get('version')}); give another --state file")  # fmt: skip
            return cls(path, doc)
        status = {device: {"state": DeviceState.PENDING.value} for device in devices}
        doc = {"v": JOURNAL_VERSION, "bundle_sha256": sha256, "model": model, "version": version,
               "devices": devices, "status": status, "stopped": None, "started": round(time.time(), 3)}  # fmt: skip
        journal = cls(path, doc)
        journal.save()
        return journal

    @property
    def devices(self) -> list[str]:
        """The devices in rollout order (fixed when the rollout started)."""
        return list(self.doc["devices"])

    def state(self, device: str) -> DeviceState:
        """Where `device` stands."""
        return DeviceState(self.doc["status"][device]["state"])

    def entry(self, device: str) -> dict[str, Any]:
        """A copy of `device`'s journal entry."""
        with self._lock:
            return dict(self.doc["status"][device])

    def set(self, device: str, state: DeviceState, **fields: Any) -> None:
        """Record `device`'s new state (and fields such as job, reason) and save."""
        with self._lock:
            entry = self.doc["status"][device]
            entry.update(fields, state=state.value, ts=round(time.time(), 3))
            self._save_locked()

    def stop(self, reason: str) -> None:
        """Mark the rollout stopped and save."""
        with self._lock:
            self.doc["stopped"] = reason
            self._save_locked()

    def save(self) -> None:
        """Write the journal."""
        with self._lock:
            self._save_locked()

    def _save_locked(self) -> None:
        atomic_write(self.path, json.dumps(self.doc, indent=1, sort_keys=True).encode("utf-8"), mode=0o644)

    def counts(self) -> dict[str, int]:
        """Devices per state."""
        with self._lock:
            states = [entry["state"] for entry in self.doc["status"].values()]
        return {state.value: states.count(state.value) for state in DeviceState if state.value in states}


@dataclass
class RolloutSummary:
    """How a rollout run ended."""

    model: str
    version: str
    counts: dict[str, int]
    stopped: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        """True when it did not stop."""
        return self.stopped is None


class Rollout:
    """One staged rollout of a bundle, journaled in `state_path`; `progress` gets one line per event."""

    def __init__(
        self,
        broker: Broker | str,
        bundle: bytes,
        devices: list[str],
        state_path: Path,
        options: RolloutOptions = RolloutOptions(),
        progress: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.broker = Broker.of(broker)
        self.options = options
        self.progress = progress
        self.model, self.version, _signature = bundle_identity(bundle)
        self.prepared = prepare(bundle, block_size=options.block_size, compression=options.compression,
                                probation=options.probation)  # fmt: skip
        self.journal = RolloutJournal.open(state_path, sha256=hashlib.sha256(bundle).hexdigest(), model=self.model,
                                           version=self.version, devices=list(dict.fromkeys(devices)))  # fmt: skip

    def run(self) -> RolloutSummary:
        """Run (or resume) the rollout to its end or its stop."""
        started = time.monotonic()
        stopped = self.journal.doc.get("stopped")
        if stopped:
            self.progress(f"this rollout stopped earlier ({stopped}); a new --state file starts over")
        else:
            with watch_fleet(self.broker, telemetry=False) as view:
                time.sleep(1.0)  # the retained presence, facts and update reports arrive
                self._reconcile(view)
                stopped = self._waves(view)
        return RolloutSummary(
            self.model, self.version, self.journal.counts(), stopped, time.monotonic() - started
        )

    # -- resume ----------------------------------------------------------------------------------
    def _reconcile(self, view: FleetView) -> None:
        """Fold what the devices report into the journal: finished jobs, devices already on the version."""
        resumed = any(self.journal.state(d) is not DeviceState.PENDING for d in self.journal.devices)
        for device in self.journal.devices:
            state, row = self.journal.state(device), view.get(device)
            if row is None or not state.open:
                continue
            update = row.updates.get(self.model) or {}
            serving = (row.models.get(self.model) or {}).get("version")
            job = self.journal.entry(device).get("job")
            if state is DeviceState.OFFERED and update.get("job") == job:
                outcome = {"committed": DeviceState.COMMITTED, "failed": DeviceState.FAILED,
                           "rolled_back": DeviceState.ROLLED_BACK}.get(str(update.get("state")))  # fmt: skip
                if outcome is not None:
                    self.journal.set(device, outcome, job=job, reason=update.get("reason") or "")
                    self.progress(f"{device}: job {job} ended {outcome.value} while we were away")
            elif state is DeviceState.PENDING and (serving == self.version or (
                    update.get("version") == self.version and update.get("state") == "committed")):  # fmt: skip
                self.journal.set(device, DeviceState.ALREADY)
                self.progress(f"{device}: already on {self.model} {self.version}, skipped")
        if resumed:
            self.progress(f"resumed from {self.journal.path}: " + _counts(self.journal.counts()))

    # -- waves -----------------------------------------------------------------------------------
    def _waves(self, view: FleetView) -> str | None:
        options = self.options
        waves = plan_waves(self.journal.devices, options.canary, options.wave_size)
        for number, wave in enumerate(waves, 1):
            todo = [device for device in wave if self.journal.state(device).open]
            name = "canary" if number == 1 and options.canary else f"wave {number}/{len(waves)}"
            if todo:
                self.progress(f"{name}: {', '.join(todo)}")
                self._wave(todo, view)
            failures = [d for d in self.journal.devices if self.journal.state(d).failure]
            if failures and (name == "canary" or len(failures) >= options.max_failures):
                reason = f"{len(failures)} failure(s) ({', '.join(failures)}) after the {name}"
                self.journal.stop(reason)
                self.progress(f"stopping: {reason}")
                if options.rollback_on_stop:
                    self._revert()
                return reason
        return None

    def _wave(self, devices: list[str], view: FleetView) -> None:
        runnable = []
        for device in devices:
            row = view.get(device)
            if row is None or row.online is not True:
                why = "offline" if row is not None and row.online is False else "never seen on the broker"
                self.journal.set(device, DeviceState.FAILED, reason=why)
                self.progress(f"{device}: failed: {why}")
            else:
                runnable.append(device)
        jobs = [(device, self._planner(device, view.get(device))) for device in runnable]
        outcomes = flash_many(jobs, self.broker, max_parallel=self.options.max_parallel,
                              timeout=self.options.timeout, progress=self._on_report)  # fmt: skip
        for device, outcome in zip(runnable, outcomes, strict=True):
            self._record(device, outcome, view)

    def _planner(self, device: str, row: DeviceRow | None) -> Callable[[], Prepared]:
        def plan() -> Prepared:
            entry = self.journal.entry(device)
            job = entry.get("job") if entry["state"] == DeviceState.OFFERED else None
            if job is None:
                job = uuid.uuid4().hex[:16]
                health = row.health if row is not None else None
                self.journal.set(
                    device, DeviceState.OFFERED, job=job, health_before=health
                )  # before the offer
            return Prepared(dataclasses.replace(self.prepared.offer, job=job), self.prepared.blocks)

        return plan

    def _on_report(self, result: FlashResult, report: dict[str, Any]) -> None:
        state = report.get("state")
        if state in ("downloading",):
            return
        reason = f": {report['reason']}" if report.get("reason") and state != "committed" else ""
        self.progress(f"{result.device}: {result.model} {result.version} {state}{reason}")

    def _record(self, device: str, outcome: FlashResult | EdgeError, view: FleetView) -> None:
        if isinstance(outcome, EdgeError):
            self.journal.set(device, DeviceState.FAILED, reason=str(outcome))
            self.progress(f"{device}: failed: {outcome}")
            return
        if outcome.state == "committed":
            problem = self._unhealthy(device, view)
            if problem is None:
                self.journal.set(device, DeviceState.COMMITTED, reason="")
                return
            self.journal.set(device, DeviceState.FAILED, reason=problem)
            self.progress(f"{device}: failed: {problem}")
            return
        state = DeviceState.ROLLED_BACK if outcome.state == "rolled_back" else DeviceState.FAILED
        self.journal.set(device, state, reason=outcome.reason or outcome.state)

    def _unhealthy(self, device: str, view: FleetView) -> str | None:
        """Why a committed device does not look healthy in its facts (None: it does, or it has no facts)."""
        before = self.journal.entry(device).get("health_before")
        deadline = time.monotonic() + HEALTH_WAIT_S
        problem: str | None = None
        while time.monotonic() < deadline:
            row = view.get(device)
            if row is None or not row.models:
                return None  # a device that publishes no facts: its own probation is the gate
            model = row.models.get(self.model) or {}
            if model.get("version") != self.version or model.get("state") != "serving":
                problem = f"its facts show {self.model} {model.get('version')} {model.get('state')}, not {self.version} serving"
            elif row.health in ("errored", "starting") or (before == "running" and row.health != "running"):
                problem = f"health {row.health} after the update (was {before})"
            else:
                return None
            time.sleep(0.2)
        return problem

    def _revert(self) -> None:
        """Roll back every device this rollout committed."""
        for device in self.journal.devices:
            if self.journal.state(device) is not DeviceState.COMMITTED:
                continue
            try:
                answer = command(self.broker, device, CommandOp.ROLLBACK, model=self.model, timeout=30.0)
            except EdgeError as exc:
                self.journal.set(device, DeviceState.COMMITTED, reason=f"rollback failed: {exc}")
                self.progress(f"{device}: rollback failed: {exc}")
                continue
            self.journal.set(device, DeviceState.REVERTED, reason=f"rolled back to {answer.get('active')}")
            self.progress(f"{device}: rolled back to {self.model} {answer.get('active')}")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{number} {state}" for state, number in counts.items()) or "no devices"


def summary_line(summary: RolloutSummary) -> str:
    """One line: the model, the counts per state, stopped or finished, and the time."""
    how = f"stopped: {summary.stopped}" if summary.stopped else "finished"
    return f"rollout {summary.model} {summary.version}: {_counts(summary.counts)}; {how} ({summary.seconds:.1f} s)"
