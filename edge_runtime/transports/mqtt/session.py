"""One paho client's life on its own network thread: connect, run the loop, note why it ended.

No paho import here (link.py is the one module that imports it): the client is used through the
few calls below. `Session.stalled` is what the link's supervisor and watchdog probe ask.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.config.settings import MqttProtocol
from edge_runtime.transports.mqtt.security import tls_reason

__all__ = ["LOOP_S", "Session", "Will"]

log = logging.getLogger("edge_runtime.transports.mqtt.link")

LOOP_S = 0.25
"""Longest wait in paho's select: the network loop beats at least this often."""


@dataclass(frozen=True)
class Will:
    """A retained message: published on connect (`online`) and registered as last will (`offline`)."""

    topic: str
    online: bytes
    offline: bytes
    qos: int = 1


@dataclass(eq=False)
class Session:
    """One paho client, the thread running its network loop, and what happened to its connection."""

    number: int
    protocol: MqttProtocol
    client: Any
    """A ``paho.mqtt.client.Client``."""
    thread: threading.Thread | None = None
    retired: threading.Event = field(default_factory=threading.Event)
    beat: float = field(default_factory=time.monotonic)
    """When the network loop last made progress."""
    looping: bool = False
    connected_at: float | None = None
    refused: str | None = None
    """Why the broker refused the CONNECT, if it did."""
    downgrade: bool = False
    denied: str | None = None
    """Why the broker will not have us (TLS or credentials): retrying soon cannot help."""
    dropped: Any = None
    """The first disconnect reason (a paho ``ReasonCode``) of the current connection."""
    subscribe_mid: int | None = None
    connect_options: dict[str, Any] = field(default_factory=dict)
    """Extra ``connect`` arguments (MQTT 5 ``clean_start`` and CONNECT properties of a persistent session)."""

    def stalled(self, limit: float) -> str | None:
        """Why the network loop looks stuck (no progress for `limit` s while connected), or None.

        A late PINGRESP alone is no sign: it queues behind whatever the broker is still sending us
        (a backlog of large requests). paho itself drops a connection whose PINGREQ goes unanswered
        for a keep-alive period while no bytes arrive; that ends `pump` like any lost connection.
        """
        now = time.monotonic()
        if self.looping and now - self.beat > limit:
            return f"the network loop made no progress for {now - self.beat:.1f} s"
        return None

    def open(self, host: str, port: int, keepalive: int) -> str | None:
        """Open the TCP connection and send CONNECT; None, or why it failed."""
        self.beat, self.refused, self.dropped, self.denied = time.monotonic(), None, None, None
        self.connected_at = None
        try:
            self.client.connect(host, port, keepalive=keepalive, **self.connect_options)
        except socket.gaierror as exc:
            return f"cannot resolve MQTT broker host '{host}': {exc.strerror or exc}"
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self.denied = f"TLS handshake with MQTT broker {host}:{port} failed: {tls_reason(exc)}"
            return self.denied
        except (OSError, ValueError) as exc:
            return f"cannot connect to MQTT broker {host}:{port}: {exc}"
        return None

    def pump(self) -> None:
        """Run paho's loop until the connection ends; a failure inside paho ends it, never the thread."""
        self.looping = True
        try:
            while not self.retired.is_set():
                self.beat = time.monotonic()
                try:
                    rc = self.client.loop(LOOP_S)
                except Exception as exc:  # hostile bytes can make paho itself raise
                    log.warning("MQTT network loop failed (%s: %s); reconnecting", type(exc).__name__, exc)
                    break
                if rc != 0:  # MQTT_ERR_SUCCESS
                    break
        finally:
            self.looping = False

    def sleep(self, seconds: float, stopping: threading.Event) -> None:
        """Wait `seconds` (less if retired or stopping), beating so the wait never looks stuck."""
        deadline = time.monotonic() + seconds
        while not self.retired.is_set() and not stopping.is_set():
            self.beat = time.monotonic()
            left = deadline - self.beat
            if left <= 0:
                return
            self.retired.wait(min(left, 1.0))

    def wake(self) -> None:
        """Retire this session and wake its loop if blocked (shutdown; never close an fd it may use)."""
        self.retired.set()
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
