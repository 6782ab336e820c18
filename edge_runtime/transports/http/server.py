"""Local HTTP/1.1 server speaking the KServe Open Inference Protocol v2, on the standard library.

An asyncio protocol parses requests (keep-alive, Content-Length bodies, pipelining) on one event
loop thread. Inference for a model whose recent calls took under ``inline_max_ms`` runs right on
the loop (no thread hand-off for fast models); anything slower, or not yet measured, runs on a
worker pool, so a slow model never holds up health checks or other connections for long.

Routes::

    GET  /v2/health/live | /v2/health/ready
    GET  /v2
    GET  /v2/models/{name}[/versions/{v}]          model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer    JSON or binary tensors
    GET  /metrics                                  Prometheus text
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from edge_runtime.codecs import v2
from edge_runtime.core.errors import EdgeError, NotFoundError, PayloadTooLarge, RequestError, UsageError
from edge_runtime.serving.dataplane import DataPlane

__all__ = ["HttpServer", "Response"]

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
DRAIN_SECONDS = 2.0
"""How long a rejected upload is read and discarded before the connection is closed."""
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
JSON_TYPE = "application/json"


@dataclass(frozen=True)
class Response:
    """One HTTP response before serialization."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)

    def to_bytes(self, keep_alive: bool) -> bytes:
        """The status line, headers and body as sent on the wire."""
        lines = [
            f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Error')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
        ]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        if not keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def _json(status: int, data: Any) -> Response:
    return Response(status, v2.json_dumps(data))


def _error(exc: EdgeError) -> Response:
    return Response(exc.status, v2.encode_error(str(exc)))


@dataclass(frozen=True)
class _Head:
    """A parsed request line and headers."""

    method: str
    path: str
    headers: dict[str, str]
    keep_alive: bool
    length: int


def _parse_head(raw: bytes) -> _Head:
    """Request line and headers; RequestError for anything malformed."""
    try:
        lines = raw.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise RequestError("malformed HTTP request head") from None
    if length < 0:
        raise RequestError("negative Content-Length")
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    return _Head(method, target.split("?", 1)[0], headers, keep_alive, length)


class _Connection(asyncio.Protocol):
    """One client connection: parse requests in order, answer each, keep the connection alive."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False
        self.draining = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.draining:
            return
        self.buffer += data
        if not self.busy:
            self._process()

    def _reject(self, exc: EdgeError, status: int | None = None) -> None:
        """Answer an unreadable request, then drop what the client still sends and close.

        Closing at once with unread data would reset the connection, and the client could lose
        the answer; so the rest of its upload is read and discarded for a short while first.
        """
        response = _error(exc)
        if status is not None:
            response = Response(status, response.body)
        if self.transport is None:
            return
        self.transport.write(response.to_bytes(keep_alive=False))
        self.draining = True
        self.buffer.clear()
        transport = self.transport
        asyncio.get_running_loop().call_later(DRAIN_SECONDS, transport.close)

    def _send(self, response: Response, keep_alive: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(response.to_bytes(keep_alive))
        if not keep_alive:
            self.transport.close()

    def _process(self) -> None:
        """Answer every complete request in the buffer, stopping while one runs on the pool."""
        while self.transport is not None and not self.busy and not self.draining:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEADER_BYTES:
                    self._reject(RequestError("request head too large"), 431)
                return
            try:
                head = _parse_head(bytes(self.buffer[:end]))
            except RequestError as exc:
                self._reject(exc)
                return
            if "chunked" in head.headers.get("transfer-encoding", "").lower():
                self._reject(
                    RequestError("chunked request bodies are not supported; send Content-Length"), 411
                )
                return
            limit = self.server.max_body_bytes
            if head.length > limit:
                self._reject(
                    PayloadTooLarge(f"request body of {head.length} bytes is over the {limit}-byte limit")
                )
                return
            total = end + 4 + head.length
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            self._dispatch(head, body)

    def _dispatch(self, head: _Head, body: bytes) -> None:
        """Answer one request now, or hand it to the worker pool and resume when it is done."""
        job = self.server._route(head, body)
        if isinstance(job, Response):
            self._send(job, head.keep_alive)
            return
        self.busy = True
        assert self.transport is not None
        self.transport.pause_reading()
        future = self.server._executor.submit(job)
        future.add_done_callback(lambda done: self.server._call_in_loop(self._finish, done, head.keep_alive))

    def _finish(self, done: concurrent.futures.Future, keep_alive: bool) -> None:
        self.busy = False
        if self.transport is None:
            return
        self._send(done.result(), keep_alive)
        if keep_alive and self.transport is not None:
            self.transport.resume_reading()
            self._process()


_MODEL_ROUTES = {(): "metadata", ("ready",): "ready", ("infer",): "infer"}


class HttpServer:
    """The v2 HTTP API over a DataPlane; `start()` serves on a background thread until `stop()`."""

    def __init__(
        self,
        dataplane: DataPlane,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        workers: int = 4,
        inline_max_ms: float = 1.0,
        max_body_bytes: int | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.host = host
        self.port = port
        self.inline_max_ms = inline_max_ms
        self.max_body_bytes = dataplane.max_request_bytes if max_body_bytes is None else max_body_bytes
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="infer")
        self._connections: set[_Connection] = set()
        self._recent_ms: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: OSError | None = None

    # --- routing ---------------------------------------------------------------------------
    def _route(self, head: _Head, body: bytes) -> Response | Callable[[], Response]:
        """The response to a request, or a job that computes it (inference on a slow model)."""
        try:
            parts = [unquote(part) for part in head.path.strip("/").split("/")]
            if parts[:2] == ["v2", "models"] and len(parts) >= 3:
                return self._model_route(head, parts[2], parts[3:], body)
            if head.method != "GET":
                return self._not_allowed(head, parts)
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
        except EdgeError as exc:
            return _error(exc)
        except Exception as exc:  # answer and keep serving, whatever went wrong
            log.exception("%s %s failed", head.method, head.path)
            return _json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})

    def _not_allowed(self, head: _Head, parts: list[str]) -> Response:
        known = {("v2",), ("v2", "health", "live"), ("v2", "health", "ready"), ("metrics",)}
        if tuple(parts) in known:
            return _json(405, {"error": f"{head.method} is not allowed on {head.path}"})
        return _error(NotFoundError(f"no route {head.method} {head.path}"))

    def _model_route(
        self, head: _Head, name: str, rest: list[str], body: bytes
    ) -> Response | Callable[[], Response]:
        version = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        action = _MODEL_ROUTES.get(tuple(rest))
        if action is None:
            raise NotFoundError(f"no route {head.method} {head.path}")
        wanted_method = "POST" if action == "infer" else "GET"
        if head.method != wanted_method:
            return _json(405, {"error": f"{head.method} is not allowed on {head.path} (use {wanted_method})"})
        if action == "metadata":
            return _json(200, self.dataplane.model_metadata(name, version))
        if action == "ready":
            if self.dataplane.model_ready(name, version):
                return _json(200, {"name": name, "ready": True})
            self.dataplane.model_metadata(name, version)  # raises the precise 404 / 503
            return _json(503, {"error": f"model '{name}' is not ready"})
        job = self._infer_job(name, version, head, body)
        recent = self._recent_ms.get(name)
        return job() if recent is not None and recent < self.inline_max_ms else job

    def _infer_job(self, name: str, version: str | None, head: _Head, body: bytes) -> Callable[[], Response]:
        """A closure that decodes, infers and encodes one request, timing itself for the inline choice."""

        def job() -> Response:
            start = time.perf_counter()
            try:
                response = self._infer(name, version, head, body)
            finally:
                elapsed = (time.perf_counter() - start) * 1000.0
                previous = self._recent_ms.get(name, elapsed)
                self._recent_ms[name] = 0.8 * previous + 0.2 * elapsed
            return response

        return job

    def _infer(self, name: str, version: str | None, head: _Head, body: bytes) -> Response:
        try:
            raw_length = head.headers.get(v2.HEADER_LENGTH.lower())
            try:
                header_length = None if raw_length is None else int(raw_length)
            except ValueError:
                raise RequestError(f"{v2.HEADER_LENGTH} must be an integer, got {raw_length!r}") from None
            decoded = v2.decode_request(body, name, version, header_length=header_length)
            result = self.dataplane.infer(decoded.request)
            payload, extra = v2.encode_infer_response(result, binary_outputs=decoded.binary_outputs)
        except EdgeError as exc:
            return _error(exc)
        except Exception as exc:  # the server answers and keeps serving, whatever went wrong
            log.exception("inference on %s failed", name)
            return _json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
        content_type = "application/octet-stream" if extra else JSON_TYPE
        return Response(200, payload, content_type, extra)

    # --- lifecycle -------------------------------------------------------------------------
    def _call_in_loop(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed since the check (stopping)
                loop.call_soon_threadsafe(callback, *args)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(
                loop.create_server(lambda: _Connection(self), self.host, self.port, backlog=1024)
            )
        except OSError as exc:
            self._start_error = exc
            self._started.set()
            loop.close()
            return
        self.port = server.sockets[0].getsockname()[1]
        self._loop = loop
        self._started.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            for connection in list(self._connections):
                if connection.transport is not None:
                    connection.transport.close()
            loop.run_until_complete(asyncio.sleep(0))
            self._loop = None
            loop.close()

    def start(self) -> None:
        """Bind and serve on a background thread; returns once listening (`port` 0 picks a free port)."""
        if self._thread is not None:
            raise UsageError("the HTTP server is already running")
        self._thread = threading.Thread(target=self._serve, name="http-server", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread = None
            error = self._start_error
            raise UsageError(
                f"cannot listen on {self.host}:{self.port}: {error.strerror or error}"
            ) from error
        log.info("HTTP v2 API on http://%s:%d", self.host, self.port)

    def responsive(self, timeout: float) -> bool:
        """True if the event loop runs a callback within `timeout` seconds (the watchdog's check)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return False
        answered: concurrent.futures.Future[bool] = concurrent.futures.Future()
        try:
            loop.call_soon_threadsafe(answered.set_result, True)
            return answered.result(timeout)
        except (RuntimeError, concurrent.futures.TimeoutError):  # closed loop, or no answer in time
            return False

    def stop(self) -> None:
        """Stop accepting, close every connection and the worker pool."""
        loop, thread = self._loop, self._thread
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._thread = None

    def __enter__(self) -> HttpServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
