"""Near the open-file limit the HTTP server stays calm (issue 10 item 3).

A child process runs a real HttpServer under a low RLIMIT_NOFILE; the test floods it with
connections. Every client gets an answer (200 while descriptors last, then 503) instead of a
timeout, the connection opened first keeps being served, and the log has a few lines, no traceback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from edge_runtime.transports.http.server import ACCEPT_LOG_INTERVAL_S

ROOT = Path(__file__).resolve().parents[1]
HEADROOM = 24
"""Descriptors the child has left once it listens."""
FLOOD = 120
HEALTH = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
CHILD = f"""
import json, logging, os, resource, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from edge_runtime.config.profiles import load_profile
from edge_runtime.config.settings import HttpSettings
from edge_runtime.serving.dataplane import DataPlane
from edge_runtime.serving.registry import ModelRegistry
from edge_runtime.transports.http.server import HttpServer

settings = HttpSettings(port=0, max_connections=4096, header_timeout_s=60, idle_timeout_s=60)
server = HttpServer(DataPlane(ModelRegistry(load_profile("x86-vnni-gateway"))), settings)
server.start()
limit = len(os.listdir("/proc/self/fd")) + {HEADROOM}
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print(server.port, flush=True)
sys.stdin.read()
print(json.dumps(server.stats()), flush=True)
server.stop()
"""


def first_status(sock: socket.socket) -> int | None:
    """The status of the first reply on `sock`, None if the server closed without one."""
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return None
    return int(data.split(b" ", 2)[1]) if data else None


def test_flood_near_the_fd_limit_is_answered_and_logged_calmly():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    sockets: list[socket.socket] = []
    start = time.monotonic()
    try:
        assert child.stdout is not None and child.stdin is not None
        port = int(child.stdout.readline())
        first = socket.create_connection(("127.0.0.1", port), timeout=20)
        sockets.append(first)
        first.sendall(HEALTH)
        assert first_status(first) == 200
        statuses = []
        for _ in range(FLOOD):
            sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            sockets.append(sock)
            sock.sendall(HEALTH)
            statuses.append(first_status(sock))  # a timeout here raises: nobody is left hanging
        first.sendall(HEALTH)
        assert first_status(first) == 200  # the connection opened first is still served
        out, stderr = child.communicate(timeout=30)  # closes stdin: the child reports and stops
        stats = json.loads(out)
    finally:
        for sock in sockets:
            sock.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    log = stderr.decode()
    assert set(statuses) <= {200, 503, None} and statuses.count(200) <= HEADROOM
    assert statuses.count(503) >= FLOOD - HEADROOM - 5  # the rest were told, not left to time out
    assert stats["events"]["shed_no_descriptor"] >= FLOOD - HEADROOM - 5
    assert "Traceback" not in log
    reports_allowed = 2 + int((time.monotonic() - start) / ACCEPT_LOG_INTERVAL_S)  # one per interval
    assert 1 <= log.count("cannot accept HTTP connections") <= reports_allowed
