"""The install state machine of one update job, as one transition table (after Mender's daemon).

Read the table top to bottom: a job is offered, downloaded block by block, verified (signature,
sha256, profile), installed into the inactive version slot, tried (loaded, golden inputs run),
committed (activated and hot-swapped: the new model loads before the old one goes), optionally
watched through a probation window, and otherwise rolled back. Each state has one handler, a short
function returning an event; the job is written to the journal *before* each handler runs, so a
restart re-enters the state it was in and every handler is safe to run twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from edge_runtime.codecs.update_payloads import Offer, decode_offer
from edge_runtime.core.errors import EdgeError

__all__ = [
    "STATES",
    "TERMINAL",
    "TRANSITIONS",
    "Event",
    "Interrupted",
    "Job",
    "State",
    "StateInfo",
    "run_job",
]

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Raised by a handler when the daemon stops: the job stays in its state and resumes at next start."""


class State(StrEnum):
    """Where an update job stands."""

    OFFERED = "offered"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    TRIAL = "trial"
    COMMITTING = "committing"
    PROBATION = "probation"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class Event(StrEnum):
    """What a state handler reports."""

    SUCCESS = "success"
    FAILURE = "failure"
    NOTHING_TO_DO = "nothing_to_do"
    """The offered version is already the active one, with the same bytes."""


_ = State
TRANSITIONS: dict[tuple[State, Event], State] = {
    # state               event                 next state
    (_.OFFERED,      Event.SUCCESS):       _.DOWNLOADING,
    (_.OFFERED,      Event.NOTHING_TO_DO): _.COMMITTED,
    (_.OFFERED,      Event.FAILURE):       _.FAILED,
    (_.DOWNLOADING,  Event.SUCCESS):       _.VERIFYING,
    (_.DOWNLOADING,  Event.FAILURE):       _.FAILED,
    (_.VERIFYING,    Event.SUCCESS):       _.INSTALLING,
    (_.VERIFYING,    Event.FAILURE):       _.FAILED,
    (_.INSTALLING,   Event.SUCCESS):       _.TRIAL,
    (_.INSTALLING,   Event.FAILURE):       _.FAILED,
    (_.TRIAL,        Event.SUCCESS):       _.COMMITTING,
    (_.TRIAL,        Event.FAILURE):       _.ROLLING_BACK,
    (_.COMMITTING,   Event.SUCCESS):       _.PROBATION,
    (_.COMMITTING,   Event.FAILURE):       _.ROLLING_BACK,
    (_.PROBATION,    Event.SUCCESS):       _.COMMITTED,
    (_.PROBATION,    Event.FAILURE):       _.ROLLING_BACK,
    (_.ROLLING_BACK, Event.SUCCESS):       _.ROLLED_BACK,
    (_.ROLLING_BACK, Event.FAILURE):       _.FAILED,
}  # fmt: skip
del _


@dataclass(frozen=True)
class StateInfo:
    """What a state means to the outside (states are data, not `if` chains)."""

    report_as: str
    """The state name in reports (the job-style vocabulary: queued, downloading, ...)."""
    terminal: bool = False
    success: bool = False


STATES: dict[State, StateInfo] = {
    State.OFFERED: StateInfo("queued"),
    State.DOWNLOADING: StateInfo("downloading"),
    State.VERIFYING: StateInfo("verifying"),
    State.INSTALLING: StateInfo("installing"),
    State.TRIAL: StateInfo("trial"),
    State.COMMITTING: StateInfo("committing"),
    State.PROBATION: StateInfo("probation"),
    State.COMMITTED: StateInfo("committed", terminal=True, success=True),
    State.ROLLING_BACK: StateInfo("rolling_back"),
    State.ROLLED_BACK: StateInfo("rolled_back", terminal=True),
    State.FAILED: StateInfo("failed", terminal=True),
}
TERMINAL = frozenset(state for state, info in STATES.items() if info.terminal)


@dataclass
class Job:
    """One update job as the journal keeps it (mutable: the machine moves it along)."""

    offer: Offer
    state: State = State.OFFERED
    reason: str = ""
    from_version: str | None = None
    """The version active when the offer was accepted (what a rollback returns to)."""
    preinstalled: bool = False
    """The offered version was in the store before this job (a rollback leaves it there)."""
    have: bytearray = field(default_factory=bytearray)
    """Bitmap of the payload blocks written and fsynced (bit i of byte i // 8, LSB first)."""
    history: list[State] = field(default_factory=list)
    blocks: dict[str, int] = field(default_factory=dict)
    """Block counts of the download: received, duplicate (arrived twice), bad (failed its sha256)."""
    updated: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        """The job id (from the offer)."""
        return self.offer.job

    @property
    def model(self) -> str:
        """The model this job updates."""
        return self.offer.model

    def to_json(self) -> dict[str, Any]:
        """The journal's form."""
        return {
            "offer": self.offer.to_dict(), "state": self.state.value, "reason": self.reason,
            "from_version": self.from_version, "preinstalled": self.preinstalled, "have": self.have.hex(),
            "history": [state.value for state in self.history], "blocks": self.blocks, "updated": self.updated,
        }  # fmt: skip

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Job:
        """Rebuild a job from the journal (EdgeError, KeyError, ValueError or TypeError if mangled)."""
        offer_doc = dict(doc["offer"])
        offer_doc["v"] = 1
        from_version = doc.get("from_version")
        return cls(
            offer=decode_offer(offer_doc),
            state=State(doc["state"]),
            reason=str(doc.get("reason", "")),
            from_version=None if from_version is None else str(from_version),
            preinstalled=bool(doc.get("preinstalled", False)),
            have=bytearray.fromhex(str(doc.get("have", ""))),
            history=[State(value) for value in doc.get("history", [])],
            blocks={str(key): int(value) for key, value in dict(doc.get("blocks") or {}).items()},
            updated=float(doc.get("updated", 0.0)),
        )


Handler = Callable[[Job], "tuple[Event, str]"]
"""A state handler: does that state's work, returns (event, reason); reason matters on failure."""


def run_job(
    job: Job,
    handlers: dict[State, Handler],
    save: Callable[[Job], None],
    report: Callable[[Job], None],
) -> State:
    """Drive `job` through the table until a terminal state; saved and reported before each step."""
    if not job.history:
        job.history.append(job.state)
    while job.state not in TERMINAL:
        job.updated = time.time()
        save(job)
        report(job)
        event, reason = _step(handlers[job.state], job)
        following = TRANSITIONS[(job.state, event)]
        if event is Event.FAILURE:
            if job.state is State.ROLLING_BACK:
                job.reason = f"{job.reason}; the rollback failed too: {reason}"
            else:
                job.reason = f"{job.state.value}: {reason}"
        log.info("update %s (%s %s): %s -> %s %s", job.id, job.model, job.offer.version, job.state.value,
                 following.value, job.reason if event is Event.FAILURE else "")  # fmt: skip
        job.state = following
        job.history.append(following)
    job.updated = time.time()
    save(job)
    report(job)
    return job.state


def _step(handler: Handler, job: Job) -> tuple[Event, str]:
    """Run one handler; an error becomes a FAILURE event with a readable reason."""
    try:
        return handler(job)
    except Interrupted:
        raise
    except EdgeError as exc:
        return Event.FAILURE, str(exc)
    except Exception as exc:  # a bug in a step fails the job, never the daemon
        log.exception("update %s: %s step failed", job.id, job.state.value)
        return Event.FAILURE, f"internal error: {type(exc).__name__}: {exc}"
