"""A TCP proxy in front of Mosquitto, for tests that need a broker to misbehave in one precise way."""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards every connection to 127.0.0.1:`upstream_port`; subclasses change one step of it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        first = self.first_bytes(client)
        if first is None:
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        upstream.sendall(first)
        threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
        threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def first_bytes(self, client: socket.socket) -> bytes | None:
        """The client's first bytes to forward, or None after answering (and closing) it here."""
        return client.recv(65536)

    def upstream_closed(self, client: socket.socket) -> None:
        """Called when the broker ended a client's connection, before the client's side is closed."""

    def _pipe(self, source: socket.socket, target: socket.socket, from_broker: bool) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
            if from_broker:
                self.upstream_closed(target)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop accepting (open connections end when either side closes)."""
        self.server.close()
