"""Local HTTP/1.1 server speaking the KServe Open Inference Protocol v2, on the standard library.

One event-loop thread accepts connections and parses requests (`protocol.Connection`: keep-alive,
Content-Length bodies, pipelining, every limit of `HttpSettings`); `routes.Router` answers them,
small requests to fast models on the loop, the rest on a worker pool.

The server accepts connections itself rather than through ``loop.create_server``, so that the
edges of the process stay calm: past ``max_connections`` a client is answered 503 and closed; when
the process is out of file descriptors (EMFILE), one spare descriptor is given up to answer the
waiting clients 503 instead of leaving them to time out, and the condition is logged once per
``ACCEPT_LOG_INTERVAL_S`` with a count, not once per attempt; the connections already open go on.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from edge_runtime.config.settings import HttpSettings
from edge_runtime.core.errors import UnavailableError, UsageError
from edge_runtime.serving.dataplane import DataPlane, Failure, failure_of
from edge_runtime.transports.http.auth import BearerAuth, server_tls_context, warn_if_exposed
from edge_runtime.transports.http.protocol import Connection, Head, Job, Response, error_response
from edge_runtime.transports.http.routes import Router

__all__ = ["HttpServer", "Response"]

log = logging.getLogger(__name__)

ACCEPT_BATCH = 64
"""Connections accepted per wake-up of the listening socket."""
ACCEPT_RETRY_S = 0.5
"""Pause before accepting again when not even the spare descriptor helps."""
ACCEPT_LOG_INTERVAL_S = 10.0
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_SHED = error_response(Failure(503, "server out of file descriptors; retry later")).to_bytes(keep_alive=False)


def _spare_descriptor() -> int | None:
    """An open descriptor kept in reserve, closed to answer clients when the process has none left."""
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


class _Listener:
    """Accepts connections on a listening socket, calmly when descriptors run out."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, server: HttpServer) -> None:
        self.loop = loop
        self.sock = sock
        self.server = server
        self.shed = 0
        self._spare = _spare_descriptor()
        self._logged_at = -ACCEPT_LOG_INTERVAL_S
        self._unlogged = 0

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._trouble(exc)
                return
            conn.setblocking(False)
            self.server._adopt(conn)

    def _trouble(self, exc: OSError) -> None:
        """Out of descriptors (or another accept error): answer who waits, log once in a while."""
        shed = self._shed_waiting() if exc.errno in _EXHAUSTED else 0
        self.shed += shed
        self._unlogged += max(shed, 1)
        now = time.monotonic()
        if now - self._logged_at >= ACCEPT_LOG_INTERVAL_S:
            log.warning(
                "cannot accept HTTP connections: %s; %d client(s) refused since the last report "
                "(raise LimitNOFILE or lower http.max_connections)",
                exc.strerror or exc,
                self._unlogged,
            )
            self._logged_at, self._unlogged = now, 0
        if not shed:  # nothing could be done: wait before trying again, instead of spinning
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.sock.fileno())
            self.loop.call_later(ACCEPT_RETRY_S, self._resume)

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _shed_waiting(self) -> int:
        """With the spare descriptor given up, answer every waiting client 503 and close it."""
        if self._spare is None:
            self._spare = _spare_descriptor()
            return 0
        os.close(self._spare)
        self._spare = None
        shed = 0
        try:
            for _ in range(ACCEPT_BATCH):
                conn, _ = self.sock.accept()
                with conn, contextlib.suppress(OSError):
                    conn.setblocking(False)
                    conn.send(_SHED)
                shed += 1
        except OSError:
            pass
        self._spare = _spare_descriptor()
        return shed


class HttpServer:
    """The v2 HTTP API over a DataPlane; `start()` serves on a background thread until `stop()`."""

    def __init__(
        self,
        dataplane: DataPlane,
        settings: HttpSettings | None = None,
        *,
        port: int | None = None,
        max_body_bytes: int | None = None,
    ) -> None:
        self.settings = settings or HttpSettings()
        self.dataplane = dataplane
        self.host = self.settings.host
        self.port = self.settings.port if port is None else port
        self.max_body_bytes = dataplane.max_request_bytes if max_body_bytes is None else max_body_bytes
        self.router = Router(dataplane, self.settings)
        self.auth = BearerAuth.from_file(self.settings.token_file) if self.settings.token_file else None
        self._tls = server_tls_context(self.settings)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.settings.workers, thread_name_prefix="http-infer"
        )
        self._connections: set[Connection] = set()
        self._refused: set[Connection] = set()
        self._pending_body = 0
        self._events: collections.Counter[str] = collections.Counter()
        self._listener: _Listener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: OSError | None = None

    # --- what connections call (on the loop thread) ----------------------------------------
    def route(self, head: Head, body: bytes) -> Response | Job:
        """The router's answer to one request."""
        return self.router.route(head, body)

    def submit(self, job: Job, done: Callable[[Response], None]) -> None:
        """Run `job` on the worker pool; `done` gets its response on the loop."""
        try:
            future = self._executor.submit(job)
        except RuntimeError:  # the pool is shutting down
            done(error_response(failure_of(UnavailableError("the server is stopping"))))
            return
        future.add_done_callback(lambda finished: self._call_in_loop(self._deliver, finished, done))

    @staticmethod
    def _deliver(future: concurrent.futures.Future, done: Callable[[Response], None]) -> None:
        try:
            response = future.result()
        except (Exception, concurrent.futures.CancelledError) as exc:
            response = error_response(failure_of(exc))
        done(response)

    def reserve_body(self, size: int) -> bool:
        """Take `size` bytes of the body budget (a lone body may always use it whole)."""
        budget = self.settings.max_pending_body_bytes
        if self._pending_body and self._pending_body + size > budget:
            return False
        self._pending_body += size
        return True

    def release_body(self, size: int) -> None:
        """Return body budget."""
        self._pending_body -= size

    def count(self, event: str) -> None:
        """Count a limit being hit."""
        self._events[event] += 1

    def closed(self, connection: Connection) -> None:
        """Forget a connection that is gone."""
        self._connections.discard(connection)
        self._refused.discard(connection)

    def _adopt(self, sock: socket.socket) -> None:
        """Serve an accepted socket, or answer it 503 when the connection cap is reached."""
        refuse = None
        if len(self._connections) >= self.settings.max_connections:
            self.count("over_capacity")
            if len(self._refused) >= self.settings.max_connections:
                sock.close()  # a flood: not even an answer
                return
            refuse = Failure(
                503, f"busy: {len(self._connections)} connections are open, the limit; retry later"
            )
        connection = Connection(self, refuse=refuse)
        (self._connections if refuse is None else self._refused).add(connection)
        assert self._loop is not None
        if self._tls is None:
            accepted = self._loop.connect_accepted_socket(lambda: connection, sock)
        else:  # the handshake (and the client certificate check) is bounded like a request head
            accepted = self._loop.connect_accepted_socket(
                lambda: connection, sock, ssl=self._tls, ssl_handshake_timeout=self.settings.header_timeout_s
            )
        task = self._loop.create_task(accepted)
        task.add_done_callback(lambda done: self._adopted(done, connection, sock))

    def _adopted(self, task: asyncio.Task, connection: Connection, sock: socket.socket) -> None:
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled() and isinstance(task.exception(), (ssl.SSLError, OSError)):
                self.count("tls_refused")
            self.closed(connection)
            sock.close()

    # --- observation -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Open connections, bytes buffered for them, body budget in use and limits hit (thread-safe)."""
        loop = self._loop
        if loop is None:
            return {"connections": 0, "buffered_bytes": 0, "pending_body_bytes": 0, "events": {}}
        return asyncio.run_coroutine_threadsafe(self._stats(), loop).result(timeout=10)

    async def _stats(self) -> dict[str, Any]:
        shed = self._listener.shed if self._listener is not None else 0
        return {
            "connections": len(self._connections),
            "buffered_bytes": sum(c.buffered_bytes() for c in self._connections | self._refused),
            "pending_body_bytes": self._pending_body,
            "events": dict(self._events, shed_no_descriptor=shed),
        }

    # --- lifecycle -------------------------------------------------------------------------
    def _call_in_loop(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed since the check (stopping)
                loop.call_soon_threadsafe(callback, *args)

    def _listen(self) -> socket.socket:
        family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((self.host, self.port), family=family, backlog=1024)
        sock.setblocking(False)
        return sock

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            sock = self._listen()
        except OSError as exc:
            self._start_error = exc
            self._started.set()
            loop.close()
            return
        self.port = sock.getsockname()[1]
        self._loop = loop
        self._listener = _Listener(loop, sock, self)
        self._listener.start()
        self._started.set()
        try:
            loop.run_forever()
        finally:
            self._listener.close()
            for connection in list(self._connections | self._refused):
                if connection.transport is not None:
                    connection.transport.abort()
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
        scheme = "http" if self._tls is None else "https"
        who = ", bearer token" if self.auth else ""
        who += ", client certificates" if self.settings.client_ca_file else ""
        log.info("HTTP v2 API on %s://%s:%d%s", scheme, self.host, self.port, who)
        warn_if_exposed(self.settings, self.host, self.port)

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
