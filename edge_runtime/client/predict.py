"""One inference request to a device, over HTTP (KServe v2) or MQTT."""

from __future__ import annotations

import json
import uuid

from edge_runtime.client.broker import Broker
from edge_runtime.core.errors import TransientError
from edge_runtime.core.types import InferRequest, InferResponse

__all__ = ["predict_http", "predict_mqtt"]


def predict_http(url: str, request: InferRequest, *, timeout: float) -> InferResponse:
    """POST a v2 infer request to `url` (e.g. http://127.0.0.1:8000) and decode the answer."""
    import urllib.error
    import urllib.request

    from edge_runtime.codecs.payloads import decode_reply
    from edge_runtime.codecs.v2 import encode_infer_request

    body, headers = encode_infer_request(request)
    path = (
        f"/v2/models/{request.model}" + (f"/versions/{request.version}" if request.version else "") + "/infer"
    )
    http_request = urllib.request.Request(
        url.rstrip("/") + path, data=body, headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(http_request, timeout=timeout) as reply:
            raw = reply.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            document = json.loads(raw)
        except ValueError:
            raise TransientError(f"{url} answered HTTP {exc.code} without a v2 error body") from exc
        raw = json.dumps(
            {"error": document.get("error", raw.decode(errors="replace")), "status": exc.code}
        ).encode()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientError(f"cannot reach {url}: {reason}") from exc
    return decode_reply(raw)


def predict_mqtt(
    broker: Broker | str, device_id: str, request: InferRequest, *, timeout: float, protocol: str = "5"
) -> InferResponse:
    """Publish a request to the device's infer topic and wait for the reply (MQTT 5 or 3.1.1)."""
    import threading

    from edge_runtime.codecs.payloads import decode_reply, encode_request
    from edge_runtime.config.settings import MqttProtocol
    from edge_runtime.transports.mqtt.link import Incoming
    from edge_runtime.transports.mqtt.topics import DeviceTopics

    if isinstance(broker, str):
        broker = Broker.of(broker, protocol=MqttProtocol(protocol))
    token = uuid.uuid4().hex[:12]
    topics = DeviceTopics(device_id)
    reply_topic = topics.inbox(token, "reply")  # under the device's tree: a broker ACL admits it
    link = broker.link(token, workers=1, reconnect_min_s=0.5, reconnect_max_s=30.0)
    replies: list[bytes] = []
    arrived = threading.Event()

    def on_reply(message: Incoming) -> None:
        replies.append(message.payload)
        arrived.set()

    link.subscribe(reply_topic, on_reply, qos=1)
    link.start()
    try:
        link.require_connected(timeout)
        v311 = link.protocol is MqttProtocol.V311
        payload = encode_request(request, reply_to=reply_topic if v311 else None)
        topic = topics.infer(request.model)
        link.publish(topic, payload, qos=1, response_topic=reply_topic, correlation_data=token.encode())
        if not arrived.wait(timeout):
            raise TransientError(
                f"no reply on {reply_topic} within {timeout:g} s (is device '{device_id}' online?)"
            )
    finally:
        link.stop(timeout=1.0)
    return decode_reply(replies[0])
