"""The MQTT connection (the one module that imports paho-mqtt).

Threads, and what runs on each:

- ``mqtt-net-<n>``: our loop around paho's ``loop()``: connect, read, write, keep-alive. Every paho
  callback is guarded (no exception escapes into paho) and only queues: received messages go to
  the work queue (bounded in count and bytes); a message that does not fit, or is over the size
  limit, goes to the small refusal queue instead (or is dropped and counted when even that is full).
- ``mqtt-worker-<i>``: run the handlers (inference) from the work queue.
- ``mqtt-replier``: answers refusals (busy 503, too large 413), so no reply is published from the
  network thread.
- ``mqtt-supervisor``: rebuilds the connection (new paho client, same subscriptions, presence
  published again) when the network thread died or stopped making progress, with a WARNING.

Every failed connect attempt logs a WARNING with the reason and the next attempt's time; delays
grow exponentially with jitter between ``reconnect_min_s`` and ``reconnect_max_s``. A session
taken over by another client with the same id (MQTT 5 reason 0x8E, or a broker that keeps closing
the connection right after accepting it) is an ERROR naming the client id, and the delays keep
growing instead of flapping. MQTT 5 first, falling back to 3.1.1 if the broker refuses it.

A broker that will not have us (TLS handshake failed, our certificate rejected, bad user name or
password, not authorized, banned) is an ERROR naming the cause, and the delay jumps to
``reconnect_max_s`` until a connect succeeds: the same settings will be refused again.
`MqttLink.refusal` says why, so `wait_connected` and `require_connected` (edgectl) return at once
instead of waiting out their timeout; a broker that is down or unreachable is not a refusal.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_runtime.config.settings import MqttProtocol, MqttSettings
from edge_runtime.core.errors import TransientError, UsageError
from edge_runtime.transports.mqtt.dispatch import (
    AckBook,
    Dispatcher,
    Handler,
    Incoming,
    Refusal,
    RefusalHandler,
    Refused,
    Route,
)
from edge_runtime.transports.mqtt.retry import Backoff, DropWatch
from edge_runtime.transports.mqtt.security import DENIED, credentials, tls_context, tls_reason
from edge_runtime.transports.mqtt.session import Session, Will

__all__ = ["Incoming", "MqttLink", "Refusal", "Refused", "Will", "credentials", "tls_context"]

log = logging.getLogger(__name__)

_UNSUPPORTED_PROTOCOL = 132
"""CONNACK reason "Unsupported Protocol Version" (paho maps a 3.1.1 broker's refusal to it)."""
F = TypeVar("F", bound=Callable[..., Any])


def _no_delay(sock: object) -> None:
    """Disable Nagle: replies are small and latency-bound (paho leaves it on)."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _delivered_as(topic_filter: str) -> str:
    """The filter messages of a subscription arrive matching: a shared one (``$share/<group>/<filter>``,
    or ``$queue/<filter>`` on brokers that offer it) delivers on the plain topics, which paho must match."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else topic_filter
    return topic_filter.removeprefix("$queue/")


class MqttLink:
    """A broker connection that survives outages, dispatching received messages to worker threads."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        *,
        presence: Will | None = None,
        manual_ack: bool = False,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.presence = presence
        self.manual_ack = manual_ack
        """QoS 1 messages are acknowledged by `ack` (after the handler's work is safe), not on arrival."""
        self.rebuilds = 0
        """Times the supervisor replaced a dead or stuck network thread."""
        self.callback_errors = 0
        self.pingresps = 0
        """Keep-alive answers received (the network loop is alive and the broker hears us)."""
        self.retry_delays: list[tuple[float, float]] = []
        """The last (nominal, drawn) reconnect delays in seconds, newest last."""
        self.dispatcher = Dispatcher(settings.workers, settings.queue_size, settings.queue_bytes)
        self._refusal: str | None = None
        self._ack_listeners: list[Callable[[int, bool], None]] = []
        self._acks = AckBook()
        self._local = threading.local()
        self._connection_listeners: list[Callable[[bool], None]] = []
        self._connected = threading.Event()
        self._epoch = 0
        self._started = False
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        stable = max(settings.keepalive, 2 * settings.reconnect_max_s)
        self._drops = DropWatch(self._backoff, client_id, stable)
        self._swap = threading.Lock()
        self._tls = tls_context(settings)
        self._credentials = credentials(settings)
        self._session = self._new_session(1, settings.protocol)

    # -- state -----------------------------------------------------------------------------
    @property
    def protocol(self) -> MqttProtocol:
        """The protocol version in use (3.1.1 after a fallback)."""
        return self._session.protocol

    @property
    def connected(self) -> bool:
        """True while the broker accepted us, the subscriptions are in place and the loop runs."""
        return self._connected.is_set() and self.problem() is None

    @property
    def connection_epoch(self) -> int:
        """Incremented on every successful (re)connect."""
        return self._epoch

    @property
    def session(self) -> int:
        """Incremented whenever the paho client is replaced (fallback, rebuild): its in-flight ids are void."""
        return self._session.number

    @property
    def shed(self) -> int:
        """Messages refused because the work queue was full."""
        return self.dispatcher.shed

    @property
    def queued(self) -> int:
        """Messages waiting for a worker."""
        return self.dispatcher.queued

    @property
    def queued_bytes(self) -> int:
        """Payload bytes waiting for a worker (bounded by ``mqtt.queue_bytes``)."""
        return self.dispatcher.queued_bytes

    @property
    def peak_queued_bytes(self) -> int:
        """The most payload bytes ever waiting at once."""
        return self.dispatcher.peak_queued_bytes

    @property
    def takeovers(self) -> int:
        """Times the session was (probably) taken over by another client with our client id."""
        return self._drops.takeovers

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (True), or `timeout` seconds passed or the broker refused us (False)."""
        deadline = time.monotonic() + timeout
        while not self._connected.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if self._refusal is not None or time.monotonic() >= deadline:
                return False
        return self.connected

    def refusal(self) -> str | None:
        """Why the broker will not have us (TLS, credentials, ACL), until a connect succeeds; else None.

        A broker that is down or unreachable is not a refusal: that is transient.
        """
        return self._refusal

    def require_connected(self, timeout: float) -> None:
        """Wait until connected: UsageError at once when refused (TLS, credentials), TransientError on timeout."""
        if self.wait_connected(timeout):
            return
        refusal = self._refusal
        if refusal is not None:
            raise UsageError(refusal)
        raise TransientError(
            f"cannot connect to the MQTT broker at {self.settings.address} within {timeout:g} s"
        )

    def problem(self) -> str | None:
        """Why the link cannot work now (a thread died or is stuck), or None; a broker outage is not one."""
        if not self._started or self._stopping.is_set():
            return "not running"
        dead = self.dispatcher.dead()
        session = self._session
        for thread in (self._supervisor, session.thread):
            if thread is not None and not thread.is_alive():
                dead.append(thread.name)
        if dead:
            return f"thread {', '.join(dead)} died"
        return session.stalled(self.settings.keepalive * 1.5)

    def healthy(self) -> bool:
        """True while every thread of the link runs and the network loop makes progress (for a watchdog)."""
        return self.problem() is None

    def stats(self) -> dict[str, Any]:
        """Link facts for telemetry (request counts live in the dataplane's metrics)."""
        return {
            "connected": self.connected,
            "protocol": self.protocol.value,
            "reconnects": max(0, self._epoch - 1),
            "rebuilds": self.rebuilds,
            "takeovers": self.takeovers,
            "queued": self.dispatcher.queued,
            "queued_bytes": self.dispatcher.queued_bytes,
            "shed": self.dispatcher.shed,
            "replies_dropped": self.dispatcher.replies_dropped,
        }

    # -- registration (before or after start) ----------------------------------------------
    def subscribe(
        self,
        topic_filter: str,
        handler: Handler,
        *,
        qos: int = 1,
        on_refused: RefusalHandler | None = None,
        max_bytes: int = 0,
    ) -> None:
        """Run `handler` on a worker for each message on `topic_filter`; `on_refused` if it cannot be queued.

        A message over `max_bytes` (0: no limit) is refused as too large without being queued.
        """
        index = self.dispatcher.add(Route(topic_filter, handler, on_refused, qos, max_bytes))
        session = self._session
        self._attach(session, index)
        if self._connected.is_set():
            session.client.subscribe(topic_filter, qos)

    def add_ack_listener(self, listener: Callable[[int, bool], None]) -> None:
        """Call `listener(mid, ok)` on the network thread for every acknowledged publish (keep it tiny)."""
        self._ack_listeners.append(listener)

    def add_connection_listener(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(connected)` on every (dis)connect, on the network or supervisor thread (keep it tiny)."""
        self._connection_listeners.append(listener)

    # -- publishing ------------------------------------------------------------------------
    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
    ) -> int | None:
        """Queue a message for the broker; its message id, or None if paho refused it."""
        client = self._session.client
        properties = self._properties(qos, correlation_data, response_topic)
        if qos > 0:
            self._acks.begin()
        info = None
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except ValueError as exc:  # paho's check of topic and payload
            raise UsageError(f"cannot publish to '{topic}': {exc}") from exc
        finally:
            if qos > 0:
                self._acks.end(info.mid if info is not None else None)
        if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN) and (
            qos > 0 or info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        ):
            return info.mid
        return None

    def _properties(
        self, qos: int, correlation_data: bytes | None, response_topic: str | None
    ) -> Properties | None:
        """MQTT 5 publish properties; a QoS 0 reply reuses this thread's object (paho packs it at once)."""
        if self.protocol is not MqttProtocol.V5 or (correlation_data is None and not response_topic):
            return None
        if qos == 0 and correlation_data is not None and not response_topic:
            properties = getattr(self._local, "reply", None)
            if properties is None:
                properties = self._local.reply = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation_data
            return properties
        properties = Properties(PacketTypes.PUBLISH)
        if correlation_data is not None:
            properties.CorrelationData = correlation_data
        if response_topic:
            properties.ResponseTopic = response_topic
        return properties

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the threads and connect in the background (retrying until the broker answers)."""
        self._started = True
        self.dispatcher.start()
        self._supervisor = threading.Thread(target=self._supervise, name="mqtt-supervisor", daemon=True)
        self._supervisor.start()
        self._run_session(self._session)

    def stop(self, timeout: float = 5.0) -> None:
        """Finish queued work, publish `offline` (if presence is set), disconnect, stop the threads."""
        self.dispatcher.stop(timeout)
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        session = self._session
        if self.presence is not None and self._connected.is_set():
            info = session.client.publish(
                self.presence.topic, self.presence.offline, qos=self.presence.qos, retain=True
            )
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                info.wait_for_publish(timeout)
        session.client.disconnect()
        if session.thread is not None and session.thread.is_alive():
            session.thread.join(timeout)
        session.retired.set()
        self._connected.clear()

    # -- sessions (one paho client each) ----------------------------------------------------
    def _new_session(self, number: int, protocol: MqttProtocol) -> Session:
        version = MQTTProtocolVersion.MQTTv5 if protocol is MqttProtocol.V5 else MQTTProtocolVersion.MQTTv311
        persistent = self.settings.session_expiry_s > 0
        clean = None if protocol is MqttProtocol.V5 else not persistent
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=version, clean_session=clean
        )
        session = Session(number, protocol, client, connect_options=self._connect_options(protocol))
        client.manual_ack_set(self.manual_ack)
        client.suppress_exceptions = True  # ours are guarded anyway; paho's own then only log
        client.on_connect = self._guard(functools.partial(self._on_connect, session))
        client.on_disconnect = self._guard(functools.partial(self._on_disconnect, session))
        client.on_publish = self._guard(functools.partial(self._on_publish, session))
        client.on_subscribe = self._guard(functools.partial(self._on_subscribe, session))
        client.on_log = self._guard(functools.partial(self._on_log, session))
        client.on_socket_open = self._guard(lambda _c, _u, sock: _no_delay(sock))
        client.on_socket_register_write = lambda *_: None  # a publish from any thread only queues
        client.max_inflight_messages_set(64)
        if self._credentials is not None:
            client.username_pw_set(*self._credentials)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        if self.presence is not None:
            client.will_set(self.presence.topic, self.presence.offline, qos=self.presence.qos, retain=True)
        for index in range(len(self.dispatcher.routes)):
            self._attach(session, index)
        return session

    def _connect_options(self, protocol: MqttProtocol) -> dict[str, Any]:
        """MQTT 5 CONNECT options: resume the session when it persists; with manual acks, a Receive
        Maximum of the work queue's size, so the broker never sends more than the queue holds."""
        if protocol is not MqttProtocol.V5:
            return {}
        properties = Properties(PacketTypes.CONNECT)
        expiry = min(max(self.settings.session_expiry_s, 0), 0xFFFFFFFF)
        if expiry:
            properties.SessionExpiryInterval = expiry
        if self.manual_ack:
            properties.ReceiveMaximum = max(1, min(self.settings.queue_size, 65535))
        options: dict[str, Any] = {"properties": properties} if expiry or self.manual_ack else {}
        if expiry:
            options["clean_start"] = False
        return options

    def ack(self, message: Incoming) -> None:
        """Acknowledge a QoS 1 `message` (links made with ``manual_ack``); a no-op for QoS 0 or an old session.

        A message of a replaced client is never acked: the broker sends it again (to a persistent
        session), and a consumer that deduplicates stores it once.
        """
        session = self._session
        if not self.manual_ack or message.qos == 0 or message.session != session.number:
            return
        session.client.ack(message.mid, message.qos)

    def reconnect(self, why: str) -> None:
        """Replace the connection (new client, same subscriptions): a persistent session then gets
        every message it has not acknowledged sent again (MQTT re-sends only on a new connection)."""
        session = self._session
        log.warning("%s; reconnecting", why)
        self._replace(session, session.protocol, why)

    def _run_session(self, session: Session) -> None:
        session.thread = threading.Thread(
            target=self._network, args=(session,), name=f"mqtt-net-{session.number}", daemon=True
        )
        session.thread.start()

    def _replace(self, session: Session, protocol: MqttProtocol, why: str) -> None:
        """Retire `session` and start a new client (same subscriptions); the old thread is not joined."""
        with self._swap:
            if session is not self._session or self._stopping.is_set():
                return
            fresh = self._new_session(session.number + 1, protocol)
            self._acks.clear()
            self._lost(
                session
            )  # before the swap: `connected` must never be read off the new, unconnected client
            self._session = fresh
            session.wake()
        log.info("new MQTT client %d (%s)", fresh.number, why)
        self._run_session(fresh)

    def _lost(self, session: Session) -> None:
        """The connection of `session` is gone: say so once."""
        if session.connected_at is None or not self._connected.is_set():
            return
        self._connected.clear()
        for listener in self._connection_listeners:
            self._call_listener(listener, False)

    # -- the network thread ------------------------------------------------------------------
    def _network(self, session: Session) -> None:
        """Connect, run paho's loop until the connection ends, back off, again; until retired."""
        while not (session.retired.is_set() or self._stopping.is_set()):
            failure = session.open(self.settings.host, self.settings.port, self.settings.keepalive)
            if failure is None:
                session.pump()
                failure = self._ended(session)
            if session.retired.is_set() or self._stopping.is_set():
                return
            if session.downgrade:
                log.warning("broker refused MQTT 5; retrying with MQTT 3.1.1")
                self._replace(session, MqttProtocol.V311, "MQTT 3.1.1 fallback")
                return
            if session.denied is not None:
                self._denied(session.denied)
            self._wait_retry(session, failure)

    def _denied(self, why: str) -> None:
        """The broker will not have us: an ERROR naming the cause, and the longest delay until a connect works."""
        self._refusal = f"{why} (client id '{self.client_id}')"
        log.error("%s; retrying only every %.0f s", self._refusal, self._backoff.maximum)
        self._backoff.longest()

    def _ended(self, session: Session) -> str:
        """After a connection ended: what to log (and an ERROR when another client has our id)."""
        if session is self._session:
            self._lost(session)
        if session.denied is not None:
            return session.denied
        if session.refused is not None:
            return session.refused
        if session.connected_at is None:
            return (
                f"MQTT broker {self.settings.host}:{self.settings.port} closed the connection before CONNACK"
            )
        uptime = time.monotonic() - session.connected_at
        reason = session.dropped
        takeover = self._drops.ended(uptime, reason.value if reason is not None else None)
        if takeover:
            log.error(takeover)
        said = str(reason) if reason is not None else "connection lost"
        return f"disconnected from MQTT broker after {uptime:.1f} s ({said})"

    def _wait_retry(self, session: Session, failure: str) -> None:
        nominal = self._backoff.nominal
        delay = self._backoff.draw()
        self.retry_delays = [*self.retry_delays[-31:], (nominal, delay)]
        at = time.strftime("%H:%M:%S", time.localtime(time.time() + delay))
        log.warning("%s; next attempt in %.1f s (at %s)", failure, delay, at)
        session.sleep(delay, self._stopping)

    # -- paho callbacks (network thread; guarded, they only note or queue) --------------------
    def _guard(self, callback: F) -> F:
        """`callback` such that no exception escapes into paho (it would end the network loop)."""

        @functools.wraps(callback)
        def guarded(*args: Any) -> Any:
            try:
                return callback(*args)
            except Exception:
                self.callback_errors += 1
                if self.callback_errors == 1 or self.callback_errors % 1000 == 0:
                    log.exception("MQTT callback failed (%d so far)", self.callback_errors)
                return None

        return guarded  # type: ignore[return-value]

    def _attach(self, session: Session, index: int) -> None:
        def enqueue(_client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
            if session.retired.is_set():
                return
            props = message.properties if session.protocol is MqttProtocol.V5 else None
            incoming = Incoming(
                topic=message.topic,
                payload=cast(bytes, message.payload),  # paho reads it as bytes
                qos=message.qos,
                response_topic=getattr(props, "ResponseTopic", None),
                correlation_data=getattr(props, "CorrelationData", None),
                mid=message.mid,
                session=session.number,
            )
            self.dispatcher.dispatch(index, incoming)

        session.client.message_callback_add(
            _delivered_as(self.dispatcher.routes[index].filter), self._guard(enqueue)
        )

    def _on_connect(
        self, session: Session, client: paho.Client, _u: object, _f: object, reason: ReasonCode, _p: object
    ) -> None:
        if session.retired.is_set():
            return
        where = f"{self.settings.host}:{self.settings.port}"
        if reason.is_failure:
            session.downgrade = (
                reason.value == _UNSUPPORTED_PROTOCOL
                and session.protocol is MqttProtocol.V5
                and self.settings.fallback
            )
            session.refused = f"MQTT broker {where} refused the connection: {reason}"
            if reason.value in DENIED:
                session.denied = f"{session.refused} ({DENIED[reason.value]})"
            return
        session.connected_at = time.monotonic()
        self._refusal = None
        log.info("connected to %s (MQTT %s)", where, session.protocol.value)
        routes = self.dispatcher.routes
        if routes:
            _, session.subscribe_mid = client.subscribe([(route.filter, route.qos) for route in routes])
        else:
            self._up()
        if self.presence is not None:
            client.publish(self.presence.topic, self.presence.online, qos=self.presence.qos, retain=True)

    def _on_subscribe(
        self, session: Session, _c: paho.Client, _u: object, mid: int, reasons: list[ReasonCode], _p: object
    ) -> None:
        if mid != session.subscribe_mid or session.retired.is_set():
            return
        for route, reason in zip(self.dispatcher.routes, reasons, strict=False):
            if reason.is_failure:
                log.warning("broker refused the subscription to '%s': %s", route.filter, reason)
        self._up()

    def _up(self) -> None:
        """Connected and subscribed: wake the waiters, tell the listeners."""
        self._epoch += 1
        self._connected.set()
        for listener in self._connection_listeners:
            self._call_listener(listener, True)

    def _on_disconnect(
        self, session: Session, _c: paho.Client, _u: object, _f: object, reason: ReasonCode, _p: object
    ) -> None:
        if session.dropped is None:  # the broker's own reason comes first; then paho's "connection lost"
            session.dropped = reason
        if session is self._session and not session.retired.is_set():
            self._lost(session)

    def _on_publish(
        self, session: Session, _c: paho.Client, _u: object, mid: int, reason: ReasonCode, _p: object
    ) -> None:
        if session is not self._session:
            return
        if not self._acks.acked(mid):
            return
        ok = not reason.is_failure
        for listener in self._ack_listeners:
            self._call_listener(listener, mid, ok)

    def _on_log(self, session: Session, _c: paho.Client, _u: object, level: int, text: str) -> None:
        if text == "Received PINGRESP":
            self.pingresps += 1
        elif level == paho.MQTT_LOG_ERR and "[SSL" in text and session.connected_at is None:
            # The broker refused our certificate after the handshake (TLS 1.3): paho only logs it.
            cause = text.split("] ", 1)[-1].split(" (_ssl.c")[0]
            where = f"{self.settings.host}:{self.settings.port}"
            session.denied = f"TLS with MQTT broker {where} failed: {tls_reason(cause)}"

    def _call_listener(self, listener: Callable[..., None], *args: Any) -> None:
        try:
            listener(*args)
        except Exception:  # a listener bug must not end the loop or the supervisor
            self.callback_errors += 1
            log.exception("MQTT listener failed")

    # -- the supervisor thread -----------------------------------------------------------------
    def _supervise(self) -> None:
        """Replace the network thread's client when that thread died or stopped making progress."""
        period = min(1.0, self.settings.keepalive / 4)
        while not self._stopping.wait(period):
            try:
                self._check_network()
            except Exception:  # the supervisor must outlive whatever it supervises
                log.exception("MQTT supervisor check failed")

    def _check_network(self) -> None:
        session = self._session
        thread = session.thread
        if thread is not None and not thread.is_alive():
            why = f"MQTT network thread {thread.name} died"
        else:
            why = session.stalled(self.settings.keepalive * 1.5) or ""
        if why and not self._stopping.is_set():
            self.rebuilds += 1
            log.warning("%s; rebuilding the MQTT connection (new client, same subscriptions)", why)
            self._replace(session, session.protocol, why)
