"""HTTP bounds (issue 10 item 3), attacked with raw sockets on a real HttpServer on 127.0.0.1.

Each test sets tiny limits in its own HttpSettings and waits for the server's answer or close
with a bounded recv: it asserts that the close happened, never how fast.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading

import numpy as np
import pytest

from edge_runtime.codecs import v2
from edge_runtime.config.settings import HttpSettings
from edge_runtime.serving.dataplane import DataPlane
from edge_runtime.serving.registry import ModelRegistry
from edge_runtime.state.store import ModelStore
from edge_runtime.transports.http.server import HttpServer
from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, make_weights, reference_forward

LIMIT = 256 * 1024
WAIT_S = 20.0
"""Upper bound for any wait on the server (a generous bound, never an assertion on speed)."""
HEALTH = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def registry(tmp_path, signing_keys, device_profile, mlp_bundle_factory):
    store = ModelStore(tmp_path / "store", signing_keys.public_key, device_profile)
    manifest = store.install(mlp_bundle_factory("mlp", "1", seed=1))
    store.activate(manifest.name, manifest.version)
    loaded = ModelRegistry(device_profile)
    assert loaded.load_all(store) == []
    return loaded


@pytest.fixture
def serve(registry):
    """Start an HttpServer with the given settings overrides (port 0); stopped after the test."""
    servers: list[HttpServer] = []

    def start(**overrides) -> HttpServer:
        dataplane = DataPlane(registry, max_request_bytes=LIMIT)
        if overrides:
            server = HttpServer(dataplane, HttpSettings(port=0, **overrides))
        else:  # the defaults (this form also runs on the server before the limits existed)
            server = HttpServer(dataplane, port=0)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def connect(server: HttpServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (socket.timeout if it never does)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def infer_body(n: int = 1) -> bytes:
    x = np.random.default_rng(0).normal(size=(n, 64)).astype(np.float32)
    doc = {"inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [n, 64], "data": x.ravel().tolist()}]}
    return json.dumps(doc).encode()


def post(body: bytes, path: str = "/v2/models/mlp/infer") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def exchange(server: HttpServer, raw: bytes) -> tuple[int, dict]:
    with connect(server) as sock:
        sock.sendall(raw)
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        return reply.status, json.loads(reply.read() or b"{}")


def test_slowloris_head_is_answered_408_and_closed(serve):
    server = serve(header_timeout_s=0.3)
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        sock.settimeout(0.05)
        reply = b""
        for _ in range(int(WAIT_S / 0.05)):  # one header byte every 50 ms, as slowloris does
            try:
                sock.sendall(b"X")
                reply = sock.recv(65536)
                break
            except TimeoutError:
                continue
        sock.settimeout(WAIT_S)
        reply += read_until_closed(sock)
    assert status_of(reply) == 408 and b"request head not received" in reply
    assert server.stats()["events"]["timeout_head"] == 1


def test_a_silent_connection_is_closed_after_the_header_timeout(serve):
    server = serve(header_timeout_s=0.3)
    with connect(server) as sock:
        reply = read_until_closed(sock)
    assert status_of(reply) == 408


def test_half_sent_body_is_answered_408_and_closed(serve):
    server = serve(body_timeout_s=0.3, body_min_bytes_per_s=10**9)
    with connect(server) as sock:
        sock.sendall(post(b"{" + b" " * 100_000)[:-50_000])
        reply = read_until_closed(sock)
    assert status_of(reply) == 408 and b"request body not received" in reply
    assert server.stats()["pending_body_bytes"] == 0


def test_idle_keep_alive_connection_is_closed(serve):
    server = serve(idle_timeout_s=0.3)
    with connect(server) as sock:
        sock.sendall(HEALTH)
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 200 OK") and reply.count(b"HTTP/1.1") == 1
    assert server.stats()["events"]["timeout_idle"] == 1


def test_one_write_head_over_the_limit_gets_431(serve):
    server = serve()
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(head)  # terminator and all in one write
        reply = read_until_closed(sock)
    assert status_of(reply) == 431
    assert exchange(server, HEALTH)[0] == 200


def test_connection_cap_answers_503_and_frees_up(serve):
    server = serve(max_connections=2)
    first, second = connect(server), connect(server)
    try:
        for sock in (first, second):  # both served before the third comes
            sock.sendall(HEALTH)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        with connect(server) as third:
            third.sendall(HEALTH)
            reply = read_until_closed(third)
        assert status_of(reply) == 503 and b"limit" in reply
    finally:
        first.close()
    second.sendall(HEALTH)  # the connections under the cap keep working
    assert second.recv(65536).startswith(b"HTTP/1.1 200")
    second.close()
    for _ in range(int(WAIT_S / 0.05)):  # wait until the server has seen the close
        if server.stats()["connections"] < 2:
            break
        threading.Event().wait(0.05)
    assert exchange(server, HEALTH)[0] == 200
    assert server.stats()["events"]["over_capacity"] == 1


def test_bodies_over_the_shared_budget_get_503(serve):
    server = serve(max_pending_body_bytes=150_000)
    with connect(server) as holder:
        holder.sendall(post(b" " * 100_000)[:-1000])  # 100 kB reserved, never finished
        for _ in range(int(WAIT_S / 0.05)):
            if server.stats()["pending_body_bytes"]:
                break
            threading.Event().wait(0.05)
        status, body = exchange(server, post(infer_body(100)))  # about 130 kB: over what is left
        assert status == 503 and "budget" in body["error"]
        assert exchange(server, post(infer_body(1)))[0] == 200  # small ones still fit


def test_pipelining_client_that_never_reads_keeps_server_buffers_bounded(serve):
    high_water = 64 * 1024
    server = serve(write_high_water_bytes=high_water, write_timeout_s=WAIT_S * 3)
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(request)
    one_reply = len(sock.recv(65536))
    chunk, sent, blocked = request * 2000, 0, False
    sock.settimeout(1.0)
    try:
        while sent < 40_000_000:  # until the server stops reading (or far past any bound)
            sent += sock.send(chunk)
    except TimeoutError:
        blocked = True
    bound = high_water + 2 * one_reply + 512 * 1024  # one read chunk, one reply over the mark
    buffered = server.stats()["buffered_bytes"]
    assert blocked  # the server stopped reading from a client that reads nothing
    assert (sent // len(request)) * one_reply > 4 * bound  # the replies asked for are far over it
    assert buffered < bound
    sock.close()


def test_large_body_is_decoded_on_a_worker_while_health_answers(serve, monkeypatch):
    server = serve()
    for _ in range(5):  # a fast model: small requests run inline on the loop
        assert exchange(server, post(infer_body(1)))[0] == 200
    assert server.router.inline("mlp", 1000)
    big = infer_body(300)  # about 390 kB of JSON, over inline_max_body_bytes
    assert len(big) > server.settings.inline_max_body_bytes
    decoding, release = threading.Event(), threading.Event()
    threads: list[str] = []
    original = v2.decode_request

    def slow_decode(body, *args, **kwargs):
        if len(body) == len(big):
            threads.append(threading.current_thread().name)
            decoding.set()
            release.wait(WAIT_S)
        return original(body, *args, **kwargs)

    monkeypatch.setattr(v2, "decode_request", slow_decode)
    server.max_body_bytes = 1024 * 1024
    server.dataplane.max_request_bytes = 1024 * 1024
    with connect(server) as sock:
        sock.sendall(post(big))
        assert decoding.wait(WAIT_S)
        try:
            status, body = exchange(server, HEALTH)  # answered while the big body is mid-decode
            assert (status, body) == (200, {"live": True}) and not release.is_set()
        finally:
            release.set()
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        outputs = json.loads(reply.read())["outputs"][0]
    assert threads and threads[0] != "http-server"
    x = np.random.default_rng(0).normal(size=(300, 64)).astype(np.float32)
    expected = reference_forward(make_weights(seed=1), x).ravel()
    assert outputs["name"] == OUTPUT_NAME and np.allclose(outputs["data"], expected, atol=1e-5)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nContent-Length: 1_0\r\n\r\n", 400),
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nContent-Length: +5\r\n\r\n", 400),
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
        (b"GET /v2/health/live HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        (b"GET /v2/health/live HTTP/9.9\r\n\r\n", 400),
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 411),
    ],
    ids=["underscore-length", "signed-length", "two-lengths", "space-in-name", "version", "gzip"],
)
def test_ambiguous_heads_are_refused(serve, head, status):
    server = serve()
    with connect(server) as sock:
        sock.sendall(head)
        reply = read_until_closed(sock)
    assert status_of(reply) == status


def test_expect_continue_is_answered_before_the_body_and_refused_when_too_large(serve):
    server = serve()
    body = infer_body(1)
    head = (
        "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n"
    )
    with connect(server) as sock:
        sock.sendall(head.format(LIMIT + 1).encode())  # over the limit: refused, no body sent
        assert status_of(read_until_closed(sock)) == 413
    with connect(server) as sock:
        sock.sendall(head.format(len(body)).encode())
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        assert reply.status == 200 and json.loads(reply.read())["outputs"][0]["name"] == OUTPUT_NAME


def test_http_limits_are_read_from_the_config_and_checked():
    from edge_runtime.config.settings import parse_settings
    from edge_runtime.core.errors import UsageError

    base = 'device_id = "d"\nprofile = "x86-vnni-gateway"\nstore = "s"\npublic_key = "k"\n[http]\n'
    settings = parse_settings(base + "max_connections = 8\nidle_timeout_s = 5.0\n", "edge.toml")
    assert (settings.http.max_connections, settings.http.idle_timeout_s) == (8, 5.0)
    assert settings.http.header_timeout_s == 10.0  # the defaults hold for what is not given
    with pytest.raises(UsageError, match=r"edge\.toml: http\.header_timeout_s must be positive"):
        parse_settings(base + "header_timeout_s = 0\n", "edge.toml")
