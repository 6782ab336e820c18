"""When to reconnect, and when a dropped connection means another client has our client id (no paho here)."""

from __future__ import annotations

import random

__all__ = ["SESSION_TAKEN_OVER", "Backoff", "DropWatch"]

SESSION_TAKEN_OVER = 0x8E
"""DISCONNECT reason an MQTT 5 broker sends when another client connected with our client id."""
BRIEF_DROPS = 3
"""This many drops in a row soon after a CONNACK: another client probably uses our client id."""


class Backoff:
    """Exponential reconnect delays with jitter: ``min * 2**n`` capped at ``max``, drawn from [d/2, d]."""

    def __init__(self, minimum: float, maximum: float, *, rng: random.Random | None = None) -> None:
        self.minimum = minimum
        self.maximum = max(minimum, maximum)
        self.attempt = 0
        self._rng = rng or random.Random()

    @property
    def nominal(self) -> float:
        """The delay before jitter that the next `draw` is based on."""
        return min(self.maximum, self.minimum * 2 ** min(self.attempt, 64))

    def draw(self) -> float:
        """The next delay in seconds (never below `minimum`); each call doubles the next one."""
        nominal = self.nominal
        self.attempt += 1
        return max(self.minimum, self._rng.uniform(nominal / 2, nominal))

    def reset(self) -> None:
        """Start again from `minimum` (after a connection that stayed up)."""
        self.attempt = 0

    def longest(self) -> None:
        """Wait `maximum` from now on (until `reset`): retrying sooner cannot help."""
        while self.nominal < self.maximum:
            self.attempt += 1


class DropWatch:
    """Judges each ended connection: a takeover, a suspicious brief one, or an ordinary drop.

    Mosquitto closes the older of two connections with the same client id without saying why
    (MQTT 5 brokers such as EMQX and HiveMQ send reason 0x8E); either way the two clients would
    take the session from each other at the minimum delay forever. Only a connection that stayed
    up for `stable_s` and was not taken over restarts the backoff, and once another client is
    known (or suspected) to hold our id, the delay is the longest: such a pair backs off.
    """

    def __init__(self, backoff: Backoff, client_id: str, stable_s: float) -> None:
        self.backoff = backoff
        self.client_id = client_id
        self.stable_s = stable_s
        self.brief = 0
        """Connections in a row that ended within `stable_s` of their CONNACK."""
        self.takeovers = 0

    def ended(self, uptime: float, reason_code: int | None) -> str | None:
        """Note a connection that was up `uptime` s; an ERROR text when another client has our id."""
        if reason_code == SESSION_TAKEN_OVER:
            self.takeovers += 1
            self.backoff.longest()
            return self._text("the broker says the session was taken over")
        if uptime < self.stable_s:
            self.brief += 1
            if self.brief >= BRIEF_DROPS:
                self.takeovers += 1
                self.backoff.longest()
                return self._text(
                    f"the broker closed the connection soon after accepting it {self.brief} times in a row"
                )
            return None
        self.brief = 0
        self.backoff.reset()
        return None

    def _text(self, what: str) -> str:
        return (
            f"{what}: another client is probably connected with the same client id "
            f"'{self.client_id}' (give each device its own device_id or mqtt.client_id); backing off"
        )
