"""What happens to a received message after paho hands it over, and which acks matter (no paho here).

`Dispatcher.dispatch` is called on paho's network thread and never blocks or publishes: the
message goes on the work queue (bounded in count and in bytes) for a worker thread, or, when it
does not fit or is over its route's size limit, on a small refusal queue answered by the replier
thread; when even that is full, the refusal is dropped and counted. `AckBook` tells the acks of
QoS 1 publishes (which listeners want) from paho's "sent" reports of QoS 0 ones.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

__all__ = ["AckBook", "Dispatcher", "Incoming", "Refusal", "Refused", "Route", "WorkQueue"]

log = logging.getLogger(__name__)

T = TypeVar("T")
REFUSAL_QUEUE = 256
"""Refusals waiting for the replier; beyond it they are counted, not answered."""


@dataclass(frozen=True)
class Incoming:
    """One received message, as handlers see it."""

    topic: str
    payload: bytes
    qos: int
    response_topic: str | None = None
    """MQTT 5 Response Topic property."""
    correlation_data: bytes | None = None
    """MQTT 5 Correlation Data property."""
    mid: int = 0
    """The packet id (QoS 1 and 2), for `MqttLink.ack` when the link acknowledges by hand."""
    session: int = 0
    """The link session (paho client) that received it: a packet id means nothing to another one."""


class Refusal(StrEnum):
    """Why a message was answered without running its handler."""

    BUSY = "busy"
    """The work queue was full (count or bytes)."""
    TOO_LARGE = "too_large"
    """The payload was over the route's size limit."""


@dataclass(frozen=True)
class Refused:
    """A refused message for the refusal handler; `message` carries no payload (it was not kept)."""

    message: Incoming | None
    """None when `count` refusals were dropped unanswered (the refusal queue itself was full)."""
    reason: Refusal
    size: int
    count: int = 1


Handler = Callable[[Incoming], None]
RefusalHandler = Callable[[Refused], None]


@dataclass(frozen=True)
class Route:
    """Where messages matching one subscription go."""

    filter: str
    handler: Handler
    on_refused: RefusalHandler | None
    qos: int
    max_bytes: int
    """Larger payloads are refused as too large (0: no limit)."""


class WorkQueue(Generic[T]):
    """A FIFO bounded by item count and by payload bytes; `offer` never blocks, `take` waits.

    One item is always admitted into an empty queue, so the bytes held stay below
    ``max(max_bytes, one item)`` and a single large request is never refused for its size alone.
    """

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: collections.deque[tuple[T, int]] = collections.deque()
        self._bytes = 0
        self._peak_bytes = 0
        self._closed = False
        self._ready = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        """Payload bytes waiting (taken items no longer count)."""
        return self._bytes

    @property
    def peak_bytes(self) -> int:
        """The most payload bytes ever waiting at once."""
        return self._peak_bytes

    def offer(self, item: T, size: int) -> bool:
        """Queue `item` of `size` bytes if both bounds allow it; False (and nothing queued) if not."""
        with self._ready:
            if self._closed or len(self._items) >= self.max_items:
                return False
            if self._items and self._bytes + size > self.max_bytes:
                return False
            self._items.append((item, size))
            self._bytes += size
            self._peak_bytes = max(self._peak_bytes, self._bytes)
            self._ready.notify()
            return True

    def take(self) -> T | None:
        """The oldest item, waiting for one; None once closed and drained."""
        with self._ready:
            while not self._items and not self._closed:
                self._ready.wait()
            if not self._items:
                return None
            item, size = self._items.popleft()
            self._bytes -= size
            return item

    def close(self) -> None:
        """Refuse new items; `take` hands out what is left, then returns None."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()


class Dispatcher:
    """Worker threads for handlers and one replier thread for refusals, fed from the network thread."""

    def __init__(self, workers: int, queue_size: int, queue_bytes: int) -> None:
        self.workers = max(1, workers)
        self.routes: list[Route] = []
        self.shed = 0
        """Messages refused because the work queue was full."""
        self.replies_dropped = 0
        """Refusals left unanswered because the refusal queue was full too."""
        self.accepting = True
        self._work: WorkQueue[tuple[Handler, Incoming]] = WorkQueue(queue_size, queue_bytes)
        self._refusals: queue.Queue[tuple[Route, Refused]] = queue.Queue(REFUSAL_QUEUE)
        self._unanswered: dict[int, int] = {}  # route index -> refusals dropped, not yet reported
        self._lock = threading.Lock()  # guards _unanswered; a leaf lock, held for a dict update only
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def queued(self) -> int:
        """Messages waiting for a worker."""
        return len(self._work)

    @property
    def queued_bytes(self) -> int:
        """Payload bytes waiting for a worker."""
        return self._work.bytes

    @property
    def peak_queued_bytes(self) -> int:
        """The most payload bytes ever waiting at once."""
        return self._work.peak_bytes

    def add(self, route: Route) -> int:
        """Register a route; its index, for `dispatch`."""
        self.routes.append(route)
        return len(self.routes) - 1

    def dispatch(self, index: int, incoming: Incoming) -> None:
        """On the network thread: queue `incoming` for its route's handler, or refuse it. Never blocks."""
        if not self.accepting:
            return
        route = self.routes[index]
        size = len(incoming.payload)
        if route.max_bytes and size > route.max_bytes:
            self._refuse(index, incoming, Refusal.TOO_LARGE, size)
        elif not self._work.offer((route.handler, incoming), size):
            self.shed += 1
            self._refuse(index, incoming, Refusal.BUSY, size)

    def _refuse(self, index: int, incoming: Incoming, reason: Refusal, size: int) -> None:
        route = self.routes[index]
        if route.on_refused is None:
            return
        refused = Refused(dataclasses.replace(incoming, payload=b""), reason, size)
        try:
            self._refusals.put_nowait((route, refused))
        except queue.Full:
            with self._lock:
                self.replies_dropped += 1
                self._unanswered[index] = self._unanswered.get(index, 0) + 1

    def start(self) -> None:
        """Start the workers and the replier."""
        targets = [(f"mqtt-worker-{i}", self._worker) for i in range(self.workers)]
        for name, target in [*targets, ("mqtt-replier", self._replier)]:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float) -> None:
        """Refuse new messages, let the workers finish what is queued, stop the threads."""
        self.accepting = False
        self._work.close()
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout)

    def dead(self) -> list[str]:
        """Names of threads that died (none should: every handler call is guarded)."""
        if self._stopping.is_set():
            return []
        return [thread.name for thread in self._threads if not thread.is_alive()]

    def _worker(self) -> None:
        while (item := self._work.take()) is not None:
            handler, incoming = item
            try:
                handler(incoming)
            except Exception:  # a handler bug must not kill the worker
                log.exception("handler for %s failed", incoming.topic)

    def _replier(self) -> None:
        while not self._stopping.is_set():
            try:
                route, refused = self._refusals.get(timeout=0.5)
            except queue.Empty:
                pass
            else:
                self._answer(route, refused)
            with self._lock:
                unanswered, self._unanswered = self._unanswered, {}
            for index, count in unanswered.items():
                self._answer(self.routes[index], Refused(None, Refusal.BUSY, 0, count))

    @staticmethod
    def _answer(route: Route, refused: Refused) -> None:
        if route.on_refused is None:
            return
        try:
            route.on_refused(refused)
        except Exception:
            log.exception("refusal handler for %s failed", route.filter)


class AckBook:
    """The message ids of QoS > 0 publishes not acknowledged yet; a leaf lock, never held calling paho."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wanted: set[int] = set()
        self._publishing = 0  # QoS > 0 publish calls whose message id is not known yet

    def begin(self) -> None:
        """A QoS > 0 publish call starts (its ack may arrive before it returns)."""
        with self._lock:
            self._publishing += 1

    def end(self, mid: int | None) -> None:
        """That publish call returned message id `mid` (None: it failed)."""
        with self._lock:
            self._publishing -= 1
            if mid is not None:
                self._wanted.add(mid)

    def acked(self, mid: int) -> bool:
        """True if `mid` is an ack listeners want (paho reports QoS 0 publishes as sent too)."""
        with self._lock:
            if mid in self._wanted:
                self._wanted.discard(mid)
                return True
            return self._publishing > 0  # an ack racing its own publish call is passed on

    def clear(self) -> None:
        """Forget every id (the client was replaced: its ids are void)."""
        with self._lock:
            self._wanted.clear()
