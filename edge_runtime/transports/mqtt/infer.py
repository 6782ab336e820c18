"""MQTT inference: request/response on the device's infer topics, and stream bindings from config.

A thin transport over `DataPlane` (like the HTTP server): decode the payload into an
`InferRequest`, call `infer`, encode the answer. Every request gets an answer: the outputs, or an
error payload with the same correlation (MQTT 5 correlation data, or the request's ``id``).
Handlers run on the link's worker threads, never on paho's network thread.
"""

from __future__ import annotations

import logging
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
from edge_runtime.core.errors import PayloadTooLarge, RequestError, UnavailableError
from edge_runtime.core.topic_names import expand
from edge_runtime.serving.dataplane import DataPlane, failure_of
from edge_runtime.state.outbox import Outbox
from edge_runtime.transports.mqtt.link import Incoming, MqttLink, Refusal, Refused
from edge_runtime.transports.mqtt.topics import DeviceTopics

__all__ = ["MqttService"]

log = logging.getLogger(__name__)

_BUSY = "the device is busy (too many requests waiting); retry later"


class MqttService:
    """Answers inference requests and runs stream bindings over one `MqttLink`.

    Request and error counts live in the dataplane's metrics (shed requests included), so HTTP
    and MQTT are counted, and report failures, the same way; `stats` gives only link facts.
    """

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

    def attach(self) -> None:
        """Subscribe the request topic and every stream binding's topic."""
        limit = self.dataplane.max_request_bytes
        self.link.subscribe(
            self.topics.infer_filter, self.handle_request, qos=1, on_refused=self._refused, max_bytes=limit
        )
        for binding in self.streams:
            topic = expand(binding.topic, self.topics.device_id, wildcards=True)
            handler = partial(self.handle_stream, binding)
            refused = partial(self._stream_refused, binding)
            self.link.subscribe(topic, handler, qos=binding.qos, on_refused=refused, max_bytes=limit)

    def stats(self) -> dict[str, Any]:
        """Link facts for telemetry: connected, protocol, reconnects, queue depth and bytes, shed."""
        return self.link.stats()

    # -- request / response ----------------------------------------------------------------
    def handle_request(self, message: Incoming) -> None:
        """Answer one request on its Response Topic (MQTT 5) or reply_to, if allowed, else the default topic.

        A reply topic that is refused (see `DeviceTopics.check_reply_topic`) is answered 400 on the
        model's default reply topic, with the request's ``id`` and correlation data.
        """
        model = self.topics.model_of(message.topic)
        topic = self.topics.default_reply(model)
        problem: RequestError | None = None
        if message.response_topic is not None:
            topic, problem = self._vet(message.response_topic, topic)
        envelope: Envelope | None = None
        try:
            envelope = read_envelope(message.payload, max_bytes=self.dataplane.max_request_bytes)
            if message.response_topic is None and problem is None:
                topic, problem = self._reply_to(envelope, topic)
            if problem is not None:
                raise problem
            payload = encode_reply(self.dataplane.infer(envelope.request(model or "")))
        except Exception as exc:
            failure = failure_of(problem or exc, f"MQTT request on {message.topic}")
            payload = encode_error(failure.message, failure.status, envelope.id if envelope else None)
        self._reply(message, topic, payload)

    def _vet(self, requested: str, default: str) -> tuple[str, RequestError | None]:
        """The reply topic to use: `requested` if allowed, else `default` and why not."""
        try:
            return self.topics.check_reply_topic(requested), None
        except RequestError as exc:
            return default, exc

    def _reply_to(self, envelope: Envelope, default: str) -> tuple[str, RequestError | None]:
        if envelope.reply_to_error is not None:
            return default, RequestError(envelope.reply_to_error)
        if envelope.reply_to is None:
            return default, None
        return self._vet(envelope.reply_to, default)

    def _reply(self, message: Incoming, topic: str, payload: bytes) -> None:
        self.link.publish(topic, payload, qos=min(message.qos, 1), correlation_data=message.correlation_data)

    def _refused(self, refused: Refused) -> None:
        """On the link's replier thread: answer a request that was not queued (busy 503, too large 413)."""
        message = refused.message
        if message is None:  # dropped unanswered: count them, nothing to answer
            for _ in range(refused.count):
                self.dataplane.shed(None)
            return
        model = self.topics.model_of(message.topic)
        error: RequestError | UnavailableError
        if refused.reason is Refusal.BUSY:
            self.dataplane.shed(model)
            error = UnavailableError(_BUSY)
        else:
            limit = self.dataplane.max_request_bytes
            error = PayloadTooLarge(f"payload is {refused.size} bytes, the limit is {limit}")
        topic = self.topics.default_reply(model)
        if message.response_topic is not None:
            topic, problem = self._vet(message.response_topic, topic)
            error = problem or error
        self._reply(message, topic, encode_error(str(error), error.status, None))

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
        except Exception as exc:
            failure = failure_of(exc, f"stream reading on {message.topic}")
            payload = encode_error(f"{message.topic}: {failure.message}", failure.status, None)
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

    def _stream_refused(self, binding: StreamBinding, refused: Refused) -> None:
        """On the link's replier thread: say the reading was skipped (never touches the outbox's disk)."""
        if refused.reason is Refusal.BUSY:
            for _ in range(refused.count):
                self.dataplane.shed(binding.model)
        if refused.message is None:
            return
        topic = refused.message.topic
        if refused.reason is Refusal.BUSY:
            payload = encode_error(f"{topic}: the device is busy; reading skipped", 503, None)
        else:
            limit = self.dataplane.max_request_bytes
            text = f"{topic}: payload is {refused.size} bytes, the limit is {limit}; reading skipped"
            payload = encode_error(text, PayloadTooLarge.status, None)
        self.link.publish(expand(binding.output_topic, self.topics.device_id), payload, qos=binding.qos)
