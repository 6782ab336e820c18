"""The MQTT connection (the one module that imports paho-mqtt).

paho runs its network loop on its own thread and calls our callbacks there while holding its
callback lock, so a slow callback stalls keep-alive for everybody. Callbacks here only put the
message on a bounded queue (or note an ack or a state change) and return; a small pool of worker
threads runs the handlers. MQTT 5 first, falling back to 3.1.1 if the broker refuses it;
reconnects with exponential backoff; presence via a retained last will.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_runtime.config.settings import MqttProtocol, MqttSettings
from edge_runtime.core.errors import TransientError, UsageError

__all__ = ["Incoming", "MqttLink", "Will"]

log = logging.getLogger(__name__)

_UNSUPPORTED_PROTOCOL = 132
"""CONNACK reason "Unsupported Protocol Version" (paho maps a 3.1.1 broker's refusal to it)."""
_STOP = object()


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


@dataclass(frozen=True)
class Will:
    """A retained message: published on connect (`online`) and registered as last will (`offline`)."""

    topic: str
    online: bytes
    offline: bytes
    qos: int = 1


Handler = Callable[[Incoming], None]


@dataclass(frozen=True)
class _Subscription:
    filter: str
    handler: Handler
    on_busy: Handler | None
    qos: int


def _no_delay(_client: paho.Client, _userdata: object, sock: object) -> None:
    """Disable Nagle: replies are small and latency-bound (paho leaves it on)."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttLink:
    """A broker connection that survives outages, dispatching received messages to worker threads."""

    def __init__(self, settings: MqttSettings, client_id: str, *, presence: Will | None = None) -> None:
        self.settings = settings
        self.client_id = client_id
        self.presence = presence
        self.protocol = settings.protocol
        self.shed = 0
        """Messages refused because the work queue was full."""
        self._subs: list[_Subscription] = []
        self._ack_listeners: list[Callable[[int, bool], None]] = []
        self._ack_lock = threading.Lock()  # a leaf lock: never held while calling paho
        self._ack_wanted: set[int] = set()  # message ids of QoS > 0 publishes not acknowledged yet
        self._ack_publishing = 0  # QoS > 0 publish calls whose message id is not in _ack_wanted yet
        self._local = threading.local()
        self._connection_listeners: list[Callable[[bool], None]] = []
        self._queue: queue.Queue = queue.Queue(maxsize=settings.queue_size)
        self._workers: list[threading.Thread] = []
        self._connected = threading.Event()
        self._epoch = 0
        self._accepting = True
        self._client = self._make_client(self.protocol)

    # -- state -----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while the broker has accepted the connection."""
        return self._connected.is_set()

    @property
    def connection_epoch(self) -> int:
        """Incremented on every successful (re)connect."""
        return self._epoch

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (True) or `timeout` seconds passed (False)."""
        return self._connected.wait(timeout)

    # -- registration (before or after start) ----------------------------------------------
    def subscribe(
        self, topic_filter: str, handler: Handler, *, qos: int = 1, on_busy: Handler | None = None
    ) -> None:
        """Run `handler` on a worker for every message matching `topic_filter`; `on_busy` if the queue is full."""
        sub = _Subscription(topic_filter, handler, on_busy, qos)
        self._subs.append(sub)
        self._attach(self._client, sub)
        if self.connected:
            self._client.subscribe(topic_filter, qos)

    def add_ack_listener(self, listener: Callable[[int, bool], None]) -> None:
        """Call `listener(mid, ok)` on the network thread for every acknowledged publish (keep it tiny)."""
        self._ack_listeners.append(listener)

    def add_connection_listener(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(connected)` on the network thread on every (dis)connect (keep it tiny)."""
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
        properties = self._properties(qos, correlation_data, response_topic)
        if qos > 0:
            with self._ack_lock:
                self._ack_publishing += 1
        info = None
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except ValueError as exc:  # paho's check of topic and payload
            raise UsageError(f"cannot publish to '{topic}': {exc}") from exc
        finally:
            if qos > 0:
                with self._ack_lock:
                    self._ack_publishing -= 1
                    if info is not None:
                        self._ack_wanted.add(info.mid)
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
        """Start the workers and connect in the background (retrying until the broker answers)."""
        for index in range(max(1, self.settings.workers)):
            worker = threading.Thread(target=self._work, name=f"mqtt-worker-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self._connect(self._client)

    def stop(self, timeout: float = 5.0) -> None:
        """Finish queued work, publish `offline` (if presence is set), disconnect, stop the threads."""
        self._accepting = False
        for _ in self._workers:
            self._queue.put(_STOP)
        for worker in self._workers:
            worker.join(timeout)
        client = self._client
        if self.presence is not None and self.connected:
            info = client.publish(
                self.presence.topic, self.presence.offline, qos=self.presence.qos, retain=True
            )
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                info.wait_for_publish(timeout)
        client.disconnect()
        client.loop_stop()
        self._connected.clear()

    # -- paho side ---------------------------------------------------------------------------
    def _make_client(self, protocol: MqttProtocol) -> paho.Client:
        version = MQTTProtocolVersion.MQTTv5 if protocol is MqttProtocol.V5 else MQTTProtocolVersion.MQTTv311
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=version)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = _no_delay
        # paho annotates the delays as int, but its backoff arithmetic works in float seconds.
        client.reconnect_delay_set(self.settings.reconnect_min_s, self.settings.reconnect_max_s)  # type: ignore[arg-type]
        client.max_inflight_messages_set(64)
        if self.settings.username:
            client.username_pw_set(self.settings.username, self.settings.password or None)
        if self.presence is not None:
            client.will_set(self.presence.topic, self.presence.offline, qos=self.presence.qos, retain=True)
        for sub in self._subs:
            self._attach(client, sub)
        return client

    def _connect(self, client: paho.Client) -> None:
        try:
            client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive)
        except (OSError, ValueError) as exc:
            raise TransientError(
                f"cannot connect to {self.settings.host}:{self.settings.port}: {exc}"
            ) from exc
        client.loop_start()

    def _attach(self, client: paho.Client, sub: _Subscription) -> None:
        def enqueue(_client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
            self._dispatch(sub, message)

        client.message_callback_add(sub.filter, enqueue)

    def _dispatch(self, sub: _Subscription, message: paho.MQTTMessage) -> None:
        """On the network thread: wrap the message and queue it; never run the handler here."""
        props = message.properties if self.protocol is MqttProtocol.V5 else None
        incoming = Incoming(
            topic=message.topic,
            payload=bytes(message.payload),  # paho types it bytes | bytearray; bytes(bytes) is no copy
            qos=message.qos,
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
        )
        if not self._accepting:
            return
        try:
            self._queue.put_nowait((sub.handler, incoming))
        except queue.Full:
            self.shed += 1
            if sub.on_busy is not None:
                sub.on_busy(incoming)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            handler, incoming = item
            try:
                handler(incoming)
            except Exception:  # a handler bug must not kill the worker
                log.exception("handler for %s failed", incoming.topic)

    def _on_connect(
        self, client: paho.Client, _u: object, _flags: object, reason: ReasonCode, _p: object
    ) -> None:
        if reason.is_failure:
            if (
                reason.value == _UNSUPPORTED_PROTOCOL
                and self.protocol is MqttProtocol.V5
                and self.settings.fallback
            ):
                log.warning("broker refused MQTT 5; retrying with MQTT 3.1.1")
                threading.Thread(target=self._downgrade, name="mqtt-downgrade", daemon=True).start()
            else:
                log.error("broker refused the connection: %s", reason)
            return
        self._epoch += 1
        self._connected.set()
        log.info("connected to %s:%s (MQTT %s)", self.settings.host, self.settings.port, self.protocol.value)
        if self._subs:
            client.subscribe([(sub.filter, sub.qos) for sub in self._subs])
        if self.presence is not None:
            client.publish(self.presence.topic, self.presence.online, qos=self.presence.qos, retain=True)
        for listener in self._connection_listeners:
            listener(True)

    def _downgrade(self) -> None:
        """Replace the MQTT 5 client with a 3.1.1 one (not on the network thread: it joins it)."""
        old = self._client
        old.loop_stop()
        old.disconnect()
        self.protocol = MqttProtocol.V311
        self._client = self._make_client(self.protocol)
        self._connect(self._client)

    def _on_disconnect(
        self, _c: paho.Client, _u: object, _flags: object, reason: ReasonCode, _p: object
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected:
            if self._accepting:
                log.warning("disconnected from broker (%s); reconnecting", reason)
            for listener in self._connection_listeners:
                listener(False)

    def _on_publish(self, _c: paho.Client, _u: object, mid: int, reason: ReasonCode, _p: object) -> None:
        with self._ack_lock:  # paho reports QoS 0 publishes as sent too: those wake no listener
            if mid in self._ack_wanted:
                self._ack_wanted.discard(mid)
            elif not self._ack_publishing:  # (an ack racing its own publish call is passed on)
                return
        ok = not reason.is_failure
        for listener in self._ack_listeners:
            listener(mid, ok)
