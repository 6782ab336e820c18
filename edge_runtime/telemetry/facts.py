"""The retained facts record: what a fleet view needs to show a device at once, kept current.

Telemetry is a stream (one record per interval, through the outbox); facts are a state: profile,
groups, health and the models serving with their versions, published retained on
``edge/<id>/facts`` after every (re)connect and whenever they change, so `edgectl devices` sees the
whole fleet the moment it subscribes. A thread checks every `check_s` seconds (a cheap dict
comparison) and publishes only on change or after a reconnect; a failed check is logged and the
thread goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from edge_runtime.codecs.payloads import encode_facts

__all__ = ["FactsPublisher"]

log = logging.getLogger(__name__)


class FactsPublisher:
    """Publish `compute()` (retained) through `publish` after each connect and on each change."""

    def __init__(
        self,
        device_id: str,
        *,
        compute: Callable[[], dict[str, Any]],
        publish: Callable[[bytes], object],
        epoch: Callable[[], int | None],
        check_s: float = 1.0,
    ) -> None:
        self.device_id = device_id
        self.compute = compute
        self.publish = publish
        self.epoch = epoch
        """The link's connection epoch while connected, None while not (a new epoch: publish again)."""
        self.check_s = check_s
        self.published = 0
        self._last: tuple[int, dict[str, Any]] | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="facts", daemon=True)

    @property
    def alive(self) -> bool:
        """True while the thread runs."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Start the checking thread."""
        self._thread.start()

    def notify(self) -> None:
        """Check now (a connect, a model swap): cheap, callable from any thread."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check(self) -> bool:
        """Publish the facts if they changed or the link reconnected since the last publish; True if sent."""
        epoch = self.epoch()
        if epoch is None:
            return False
        facts = self.compute()
        if self._last == (epoch, facts):
            return False
        self.publish(encode_facts(self.device_id, facts))
        self._last = (epoch, facts)
        self.published += 1
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # the facts must never take the daemon down
                log.exception("publishing the facts record failed")
            self._wake.wait(self.check_s)
            self._wake.clear()
