"""The v2 routes over a DataPlane: each request becomes a response now, or a job for a worker.

Routes::

    GET  /v2/health/live | /v2/health/ready
    GET  /v2
    GET  /v2/models/{name}[/versions/{v}]          model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer    JSON or binary tensors
    GET  /metrics                                  Prometheus text

Inference runs right on the event loop only when both its body is small (under
``inline_max_body_bytes``) and the model's recent calls were fast (under ``inline_max_ms``): the
decode of a large JSON body costs more than any fast model, so it goes to a worker like a slow
model does, and health checks on the loop are never held up behind it. Every failure is answered
through the dataplane's `failure_of`, the same status and message MQTT gives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import unquote

from edge_runtime.codecs import v2
from edge_runtime.config.settings import HttpSettings
from edge_runtime.core.errors import NotFoundError, RequestError
from edge_runtime.serving.dataplane import DataPlane, failure_of
from edge_runtime.transports.http.protocol import JSON_TYPE, Head, Response, error_response

__all__ = ["Router"]

_MODEL_ROUTES = {(): "metadata", ("ready",): "ready", ("infer",): "infer"}
_SERVER_ROUTES = {("v2",), ("v2", "health", "live"), ("v2", "health", "ready"), ("metrics",)}


def _json(status: int, data: object) -> Response:
    return Response(status, v2.json_dumps(data))


def _not_allowed(head: Head, hint: str = "") -> Response:
    return _json(405, {"error": f"{head.method} is not allowed on {head.path}{hint}"})


class Router:
    """Maps a request to its response (or to a job computing it) over one DataPlane."""

    def __init__(self, dataplane: DataPlane, settings: HttpSettings) -> None:
        self.dataplane = dataplane
        self.inline_max_ms = settings.inline_max_ms
        self.inline_max_body_bytes = settings.inline_max_body_bytes
        self._recent_ms: dict[str, float] = {}

    def route(self, head: Head, body: bytes) -> Response | Callable[[], Response]:
        """The response to a request, or a job that computes it (inference off the loop)."""
        try:
            parts = [unquote(part) for part in head.path.strip("/").split("/")]
            if parts[:2] == ["v2", "models"] and len(parts) >= 3:
                return self._model_route(head, parts[2], parts[3:], body)
            if head.method != "GET":
                if tuple(parts) in _SERVER_ROUTES:
                    return _not_allowed(head)
                raise NotFoundError(f"no route {head.method} {head.path}")
            return self._server_route(head, parts)
        except Exception as exc:  # answered, and the server keeps serving
            return error_response(failure_of(exc, f"{head.method} {head.path}"))

    def _server_route(self, head: Head, parts: list[str]) -> Response:
        if parts == ["v2"]:
            return _json(200, self.dataplane.server_metadata())
        if parts == ["v2", "health", "live"]:
            return _json(200 if self.dataplane.live() else 503, {"live": self.dataplane.live()})
        if parts == ["v2", "health", "ready"]:
            readiness = self.dataplane.readiness()
            return _json(200 if readiness.ready else 503, readiness.to_dict())
        if parts == ["metrics"]:
            text = self.dataplane.metrics.prometheus_text().encode("utf-8")
            return Response(200, text, "text/plain; version=0.0.4; charset=utf-8")
        raise NotFoundError(f"no route {head.method} {head.path}")

    def _model_route(
        self, head: Head, name: str, rest: list[str], body: bytes
    ) -> Response | Callable[[], Response]:
        version = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        action = _MODEL_ROUTES.get(tuple(rest))
        if action is None:
            raise NotFoundError(f"no route {head.method} {head.path}")
        wanted_method = "POST" if action == "infer" else "GET"
        if head.method != wanted_method:
            return _not_allowed(head, f" (use {wanted_method})")
        if action == "metadata":
            return _json(200, self.dataplane.model_metadata(name, version))
        if action == "ready":
            if self.dataplane.model_ready(name, version):
                return _json(200, {"name": name, "ready": True})
            self.dataplane.model_metadata(name, version)  # raises the precise 404 / 503
            return _json(503, {"error": f"model '{name}' is not ready"})
        job = self._infer_job(name, version, head, body)
        return job() if self.inline(name, len(body)) else job

    def inline(self, model: str, body_bytes: int) -> bool:
        """True when a request is cheap enough to answer on the event loop itself."""
        recent = self._recent_ms.get(model)
        return body_bytes < self.inline_max_body_bytes and recent is not None and recent < self.inline_max_ms

    def _infer_job(self, name: str, version: str | None, head: Head, body: bytes) -> Callable[[], Response]:
        """A closure that decodes, infers and encodes one request, timing itself for the inline choice."""

        def job() -> Response:
            start = time.perf_counter()
            try:
                return self._infer(name, version, head, body)
            finally:
                elapsed = (time.perf_counter() - start) * 1000.0
                if len(body) < self.inline_max_body_bytes:  # big bodies go to workers anyway
                    previous = self._recent_ms.get(name, elapsed)
                    self._recent_ms[name] = 0.8 * previous + 0.2 * elapsed

        return job

    def _infer(self, name: str, version: str | None, head: Head, body: bytes) -> Response:
        try:
            raw_length = head.headers.get(v2.HEADER_LENGTH.lower())
            if raw_length is not None and not (raw_length.isascii() and raw_length.isdigit()):
                raise RequestError(f"{v2.HEADER_LENGTH} must be an integer, got {raw_length[:20]!r}")
            header_length = None if raw_length is None else int(raw_length)
            decoded = v2.decode_request(body, name, version, header_length=header_length)
            result = self.dataplane.infer(decoded.request)
            payload, extra = v2.encode_infer_response(result, binary_outputs=decoded.binary_outputs)
        except Exception as exc:  # answered, and the server keeps serving
            return error_response(failure_of(exc, f"inference on '{name}'"))
        content_type = "application/octet-stream" if extra else JSON_TYPE
        return Response(200, payload, content_type, extra)
