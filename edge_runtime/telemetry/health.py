"""Health states as data: each says whether the daemon serves and whether it is healthy."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Health", "assess_health"]


class Health(StrEnum):
    """The daemon's health as data: each state says whether it serves and whether it is healthy."""

    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    """Serving, but a model was refused, the broker is unreachable or a component is not answering."""
    ERRORED = "errored"
    """No model serving."""
    STOPPING = "stopping"

    @property
    def is_serving(self) -> bool:
        """True when inference requests are answered."""
        return self in (Health.RUNNING, Health.DEGRADED)

    @property
    def is_healthy(self) -> bool:
        """True when nothing needs attention."""
        return self in (Health.STARTING, Health.RUNNING, Health.STOPPING)


def assess_health(
    *,
    ready: bool,
    serving: int,
    refused: int,
    broker_up: bool,
    stopping: bool,
    faults: tuple[str, ...] = (),
) -> Health:
    """The health state from the facts telemetry knows (`faults`: components not answering, a volatile outbox)."""
    if stopping:
        return Health.STOPPING
    if not ready:
        return Health.STARTING
    if serving == 0:
        return Health.ERRORED
    return Health.RUNNING if refused == 0 and broker_up and not faults else Health.DEGRADED
