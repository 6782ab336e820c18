"""HTTP/1.1 framing for the v2 server: one asyncio protocol per connection, every limit enforced.

Each limit comes from `HttpSettings` and holds however the bytes arrive (one write or one byte at
a time); what a client gets when it hits one::

    head over max_header_bytes (terminator found or not)      431, close
    head incomplete header_timeout_s after its first byte     408, close
    no valid bearer token (http.token_file set)               401 before the body is read, close
    Content-Length over the body limit                        413 before the body is read, close
    body slower than body_timeout_s + n / body_min_bytes_per_s 408, close
    bodies held over all connections > max_pending_body_bytes 503, close
    no request for idle_timeout_s on a keep-alive connection  close
    replies not read (write buffer over the high-water mark)  reading stops; after write_timeout_s, abort

Requests on one connection are answered in order, one at a time: while one runs on a worker, or
while the client leaves its replies unread, the connection stops reading, so what a pipelining
client sends waits in its own socket buffers, not in ours. A connection answers at most
``REQUESTS_PER_TURN`` requests on the loop before the other connections get a turn.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_runtime.codecs import v2
from edge_runtime.config.settings import HttpSettings
from edge_runtime.core.errors import RequestError
from edge_runtime.serving.dataplane import Failure, failure_of
from edge_runtime.transports.http.auth import BearerAuth

__all__ = [
    "DRAIN_SECONDS",
    "Connection",
    "ConnectionHost",
    "Head",
    "Response",
    "error_response",
    "parse_head",
]

DRAIN_SECONDS = 2.0
"""How long a refused upload is read and discarded before its connection is closed."""
JSON_TYPE = "application/json"
_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
REQUESTS_PER_TURN = 16
"""Requests one connection may have answered on the loop before the others get a turn."""
_VERSIONS = ("HTTP/1.1", "HTTP/1.0")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""A header field name (RFC 9110 5.1): no spaces, so no name means two things to two parsers."""


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


def error_response(failure: Failure) -> Response:
    """The v2 error body ``{"error": ...}`` with the failure's status."""
    return Response(failure.status, v2.encode_error(failure.message))


@dataclass(frozen=True)
class Head:
    """A parsed request line and headers."""

    method: str
    path: str
    headers: dict[str, str]
    keep_alive: bool
    length: int
    expect_continue: bool = False


def _malformed(why: str) -> RequestError:
    return RequestError(f"malformed HTTP request head: {why}")


def _headers(lines: list[str]) -> dict[str, str]:
    """Header lines as a lower-case name -> value dict (strict: no folding, no space before ':')."""
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise _malformed(f"bad header line {line[:40]!r}")
        key, value = name.lower(), value.strip()
        if key == "content-length" and headers.get(key, value) != value:
            raise _malformed("conflicting Content-Length headers")
        headers[key] = value
    return headers


def parse_head(raw: bytes) -> Head:
    """Request line and headers; RequestError for anything malformed."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in _VERSIONS or not parts[1]:
        raise _malformed(f"bad request line {lines[0][:60]!r}")
    method, target, version = parts
    headers = _headers(lines[1:])
    raw_length = headers.get("content-length", "0")
    if not (raw_length.isascii() and raw_length.isdigit() and len(raw_length) <= 18):
        raise _malformed(f"Content-Length must be a non-negative integer, got {raw_length[:20]!r}")
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    expect = headers.get("expect", "").lower() == "100-continue"
    return Head(method, target.split("?", 1)[0], headers, keep_alive, int(raw_length), expect)


Job = Callable[[], Response]


class ConnectionHost(Protocol):
    """What a connection needs from its server."""

    settings: HttpSettings
    max_body_bytes: int
    auth: BearerAuth | None
    """Checks each request's bearer token (None: no token needed)."""

    def route(self, head: Head, body: bytes) -> Response | Job:
        """The response to a request, or a job that computes it on a worker."""

    def submit(self, job: Job, done: Callable[[Response], None]) -> None:
        """Run `job` on a worker; call `done` with its response on the event loop."""

    def reserve_body(self, size: int) -> bool:
        """Account for a body of `size` bytes about to be buffered; False when over budget."""

    def release_body(self, size: int) -> None:
        """Give back a reservation."""

    def count(self, event: str) -> None:
        """Count a limit being hit (for stats and tests)."""

    def closed(self, connection: Connection) -> None:
        """The connection is gone."""


class Connection(asyncio.Protocol):
    """One client connection: parse requests in order, answer each, keep every limit."""

    def __init__(self, host: ConnectionHost, *, refuse: Failure | None = None) -> None:
        self.host = host
        self.settings = host.settings
        self.refuse = refuse
        """Set for a connection over the cap: it is answered this failure and closed."""
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False
        self.write_paused = False
        self.closing = False
        self.peer_done = False
        self.yielding = False
        """Answered its share of requests this turn; resumes on the loop's next pass."""
        self._reading_paused = False
        self._scan_from = 0
        self._head: Head | None = None
        self._head_end = 0
        self._reserved = 0
        self._timer: asyncio.TimerHandle | None = None
        self._phase = ""

    # --- asyncio callbacks -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        high = self.settings.write_high_water_bytes
        transport.set_write_buffer_limits(high=high, low=high // 4)
        if self.refuse is not None:
            self._reject(self.refuse)
            return
        self._arm("head", self.settings.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._release()
        self.buffer = bytearray()
        self.transport = None
        self.host.closed(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # draining a refused upload
        self.buffer += data
        self._process()

    def eof_received(self) -> bool:
        self.peer_done = True  # answer what was sent whole, then close
        if self.closing:
            self._close()
        self._process()
        # Keep the write side open to answer (plain TCP); TLS has no half-close, asyncio closes it.
        return self.transport is None or self.transport.get_extra_info("sslcontext") is None

    def pause_writing(self) -> None:
        self.write_paused = True
        if not self.closing:
            self._update_reading()
            self._arm("write", self.settings.write_timeout_s)

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.closing:
            self._cancel_timer()
            self._update_reading()
            self._process()

    # --- state -----------------------------------------------------------------------------
    def buffered_bytes(self) -> int:
        """Bytes this connection holds: unparsed input plus replies not yet taken by the kernel."""
        queued = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return len(self.buffer) + queued

    def _update_reading(self) -> None:
        """Read only while no request is in flight and the client takes its replies."""
        if self.transport is None or self.closing:
            return
        paused = self.busy or self.write_paused or self.yielding
        if paused != self._reading_paused:
            self._reading_paused = paused
            (self.transport.pause_reading if paused else self.transport.resume_reading)()

    def _arm(self, phase: str, seconds: float) -> None:
        self._cancel_timer()
        self._phase = phase
        self._timer = asyncio.get_running_loop().call_later(seconds, self._timed_out, phase)

    def _close(self) -> None:
        """Close once the replies are flushed; abort if the client leaves them unread too long."""
        transport = self.transport
        self.closing = True
        if transport is None or transport.is_closing():
            return
        self._cancel_timer()
        transport.close()
        asyncio.get_running_loop().call_later(self.settings.write_timeout_s, transport.abort)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, ""

    def _timed_out(self, phase: str) -> None:
        self._timer = None
        if self.transport is None:
            return
        self.host.count(f"timeout_{phase}")
        if phase == "idle":
            self._close()
        elif phase == "write":
            self.closing = True
            self.transport.abort()  # its replies would never drain: close() would wait forever
        else:
            seconds = self.settings.header_timeout_s if phase == "head" else self._body_deadline()
            self._reject(Failure(408, f"request {phase} not received within {seconds:g} s"))

    def _body_deadline(self) -> float:
        length = self._head.length if self._head is not None else 0
        return self.settings.body_timeout_s + length / self.settings.body_min_bytes_per_s

    def _release(self) -> None:
        if self._reserved:
            self.host.release_body(self._reserved)
            self._reserved = 0

    # --- parsing ---------------------------------------------------------------------------
    def _process(self) -> None:
        """Answer the complete requests in the buffer (a turn's worth) while the connection may go on."""
        answered = 0
        while self.transport is not None and not (self.busy or self.write_paused or self.closing):
            if self.yielding:
                return
            if answered == REQUESTS_PER_TURN:  # a pipelining client does not starve the others
                self.yielding = True
                self._update_reading()
                asyncio.get_running_loop().call_soon(self._next_turn)
                return
            if self._head is None and not self._take_head():
                break
            if not self._take_body():
                break
            answered += 1
        self._wait()

    def _next_turn(self) -> None:
        self.yielding = False
        self._update_reading()
        self._process()

    def _wait(self) -> None:
        """Arm the timer for what the connection now waits for (or close a half-closed one)."""
        if self.transport is None or self.closing or self.busy or self.write_paused or self.yielding:
            return
        if self.peer_done:
            self._close()
        elif self._head is not None:
            if self._phase != "body":
                self._arm("body", self._body_deadline())
        elif self.buffer:
            if self._phase != "head":
                self._arm("head", self.settings.header_timeout_s)
        elif self._phase not in ("idle", "head"):
            self._arm("idle", self.settings.idle_timeout_s)

    def _take_head(self) -> bool:
        """Parse the next request head if it is complete and within every limit."""
        while self.buffer[:2] == b"\r\n":  # tolerated between requests (RFC 9112 2.2)
            del self.buffer[:2]
        limit = self.settings.max_header_bytes
        end = self.buffer.find(b"\r\n\r\n", self._scan_from)
        if end < 0 and len(self.buffer) <= limit:
            self._scan_from = max(len(self.buffer) - 3, 0)
            return False
        if end < 0 or end + 4 > limit:  # the limit holds however the head arrived
            self.host.count("header_too_large")
            self._reject(Failure(431, f"request head is over the {limit}-byte limit"))
            return False
        self._scan_from = 0
        try:
            head = parse_head(bytes(self.buffer[:end]))
        except RequestError as exc:
            self._reject(failure_of(exc))
            return False
        failure = self._refusal(head)
        if failure is not None:
            self._reject(failure)
            return False
        self._head, self._head_end, self._reserved = head, end + 4, head.length
        if head.expect_continue and len(self.buffer) < end + 4 + head.length and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _refusal(self, head: Head) -> Failure | None:
        """Why a well-formed head is refused before its body is read, if it is."""
        auth = self.host.auth
        if auth is not None and not auth.allows(head.path, head.headers.get("authorization")):
            self.host.count("unauthorized")
            return Failure(401, "missing or wrong bearer token (send Authorization: Bearer <token>)")
        if head.headers.get("transfer-encoding", "identity").lower() != "identity":
            return Failure(411, "chunked request bodies are not supported; send Content-Length")
        limit = self.host.max_body_bytes
        if head.length > limit:
            return Failure(413, f"request body of {head.length} bytes is over the {limit}-byte limit")
        if head.length and not self.host.reserve_body(head.length):
            self.host.count("bodies_over_budget")
            budget = self.settings.max_pending_body_bytes
            return Failure(503, f"busy: request bodies in progress fill the {budget}-byte budget; retry")
        return None

    def _take_body(self) -> bool:
        """Hand the request on once its whole body is buffered."""
        head = self._head
        assert head is not None
        total = self._head_end + head.length
        if len(self.buffer) < total:
            return False
        view = memoryview(self.buffer)
        body = view[self._head_end : total].tobytes()
        view.release()
        self.buffer = self.buffer[total:]
        self._head = None
        self._dispatch(head, body)
        return True

    # --- answering -------------------------------------------------------------------------
    def _dispatch(self, head: Head, body: bytes) -> None:
        """Answer one request now, or hand it to a worker and resume when it is done."""
        self._cancel_timer()
        try:
            job = self.host.route(head, body)
        except Exception as exc:  # the router answers errors itself; this is the last net
            job = error_response(failure_of(exc))
        if isinstance(job, Response):
            self._release()
            self._send(job, head.keep_alive)
            return
        self.busy = True
        self._update_reading()
        self.host.submit(job, lambda response: self._finish(response, head.keep_alive))

    def _finish(self, response: Response, keep_alive: bool) -> None:
        self.busy = False
        self._release()
        if self.transport is None or self.closing:
            return
        self._send(response, keep_alive)
        self._update_reading()
        self._process()

    def _send(self, response: Response, keep_alive: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(response.to_bytes(keep_alive))  # may call pause_writing at once
        if not keep_alive:
            self._close()

    def _reject(self, failure: Failure) -> None:
        """Answer a request that cannot be read on, then close.

        Closing at once with unread data would reset the connection, and the client could lose
        the answer; so what it still sends is read and discarded for a short while first.
        """
        transport = self.transport
        if transport is None:
            return
        self._cancel_timer()
        self._release()
        response = error_response(failure)
        if failure.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="edge-runtime"'
        transport.write(response.to_bytes(keep_alive=False))
        self.closing = True
        self.buffer = bytearray()
        if self._reading_paused:
            transport.resume_reading()
        self._timer = asyncio.get_running_loop().call_later(DRAIN_SECONDS, self._close)

    def __repr__(self) -> str:
        peer: Any = self.transport.get_extra_info("peername") if self.transport else None
        return f"<Connection {peer} busy={self.busy} buffered={len(self.buffer)}>"
