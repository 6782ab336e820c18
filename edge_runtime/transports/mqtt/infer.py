"""MQTT inference: request/response on the device's infer topics, and stream bindings from config.

A thin transport over `DataPlane` (like the HTTP server): decode the payload into an
`InferRequest`, call `infer`, encode the answer. Every request gets an answer: the outputs, or an
error payload with the same correlation (MQTT 5 correlation data, or the request's ``id``).
Handlers run on the link's worker threads, never on paho's network thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from edge_runtime.codecs.payloads import (
    Envelope,
    decode_stream,
    encode_error,
    encode_reply,
    encode_stream_result,
    read_envelope,
)
from edge_runtime.config.settings import StreamBinding
from edge_runtime.core.errors import EdgeError, RequestError, UnavailableError
from edge_runtime.core.topic_names import expand
from edge_runtime.serving.dataplane import DataPlane
from edge_runtime.state.outbox import Outbox
from edge_runtime.transports.mqtt.link import Incoming, MqttLink
from edge_runtime.transports.mqtt.topics import DeviceTopics

__all__ = ["MqttService"]

log = logging.getLogger(__name__)


class MqttService:
    """Answers inference requests and runs stream bindings over one `MqttLink`."""

    def __init__(
        self,
        dataplane: DataPlane,
        link: MqttLink,
        topics: DeviceTopics,
        *,
        streams: tuple[StreamBinding, ...] = (),
        outbox: Outbox | None = None,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self.dataplane = dataplane
        self.link = link
        self.topics = topics
        self.streams = streams
        self.outbox = outbox
        self.on_queued = on_queued
        self.requests = 0
        self.errors = 0
        self._lock = threading.Lock()

    def attach(self) -> None:
        """Subscribe the request topic and every stream binding's topic."""
        self.link.subscribe(self.topics.infer_filter, self.handle_request, qos=1, on_busy=self._busy)
        for binding in self.streams:
            topic = expand(binding.topic, self.topics.device_id, wildcards=True)
            handler = partial(self.handle_stream, binding)
            self.link.subscribe(topic, handler, qos=binding.qos, on_busy=partial(self._stream_busy, binding))

    def stats(self) -> dict[str, Any]:
        """Counters for telemetry."""
        return {
            "connected": self.link.connected,
            "protocol": self.link.protocol.value,
            "requests": self.requests,
            "errors": self.errors,
            "shed": self.link.shed,
        }

    # -- request / response ----------------------------------------------------------------
    def handle_request(self, message: Incoming) -> None:
        """Answer one request on its response topic (MQTT 5), its reply_to, or the model's reply topic."""
        self._count(request=True)
        model = self.topics.model_of(message.topic) or ""
        envelope: Envelope | None = None
        try:
            envelope = read_envelope(message.payload, max_bytes=self.dataplane.max_request_bytes)
            response = self.dataplane.infer(envelope.request(model))
            payload = encode_reply(response)
        except EdgeError as exc:
            payload = self._error(exc, envelope)
        except Exception as exc:  # a backend bug: still answer, and keep serving
            log.exception("inference on %s failed", message.topic)
            payload = self._error(UnavailableError(f"inference failed: {exc}"), envelope)
        self._answer(message, envelope, model, payload)

    def _count(self, *, request: bool = False, error: bool = False) -> None:
        with self._lock:
            self.requests += int(request)
            self.errors += int(error)

    def _error(self, exc: EdgeError, envelope: Envelope | None) -> bytes:
        self._count(error=True)
        return encode_error(str(exc), exc.status, envelope.id if envelope else None)

    def _answer(self, message: Incoming, envelope: Envelope | None, model: str, payload: bytes) -> None:
        if message.response_topic:
            topic = message.response_topic
        elif envelope is not None and envelope.reply_to:
            topic = envelope.reply_to
        else:
            topic = self.topics.reply(model) if model else f"{self.topics.base}/reply"
        self.link.publish(topic, payload, qos=min(message.qos, 1), correlation_data=message.correlation_data)

    def _busy(self, message: Incoming) -> None:
        """On the network thread, when the work queue is full: answer 503 without decoding tensors."""
        self._count(request=True, error=True)
        error = UnavailableError("the device is busy (too many requests waiting); retry later")
        self._answer(
            message, None, self.topics.model_of(message.topic) or "", encode_error(str(error), 503, None)
        )

    # -- stream bindings -------------------------------------------------------------------
    def handle_stream(self, binding: StreamBinding, message: Incoming) -> None:
        """Decode a sensor payload, run the bound model, publish the result (or an error payload)."""
        try:
            request = decode_stream(
                message.payload,
                model=binding.model,
                decoding=binding.decode,
                input_name=binding.input or self._only_input(binding.model),
                dtype=binding.dtype,
                shape=binding.shape,
                max_bytes=self.dataplane.max_request_bytes,
            )
            payload = encode_stream_result(self.dataplane.infer(request), message.topic)
        except EdgeError as exc:
            self._count(error=True)
            payload = encode_error(f"{message.topic}: {exc}", exc.status, None)
        self._publish_result(binding, payload)

    def _only_input(self, model: str) -> str:
        inputs = self.dataplane.registry.get(model).manifest.inputs
        if len(inputs) != 1:
            names = ", ".join(spec.name for spec in inputs)
            raise RequestError(
                f"model '{model}' takes several inputs ({names}); set 'input' in the stream binding"
            )
        return inputs[0].name

    def _publish_result(self, binding: StreamBinding, payload: bytes) -> None:
        topic = expand(binding.output_topic, self.topics.device_id)
        if binding.durable and self.outbox is not None:
            self.outbox.put(topic, payload, qos=max(binding.qos, 1))
            self.on_queued()
        else:
            self.link.publish(topic, payload, qos=binding.qos)

    def _stream_busy(self, binding: StreamBinding, message: Incoming) -> None:
        """On the network thread: say the reading was skipped (never touches the outbox's disk)."""
        self._count(error=True)
        payload = encode_error(f"{message.topic}: the device is busy; reading skipped", 503, None)
        self.link.publish(expand(binding.output_topic, self.topics.device_id), payload, qos=binding.qos)
