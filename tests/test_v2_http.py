"""The v2 HTTP API against the unmodified tritonclient.http client and raw sockets, on loopback."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from edge_runtime.serving.dataplane import DataPlane
from edge_runtime.serving.registry import ModelRegistry
from edge_runtime.state.store import ModelStore
from edge_runtime.transports.http.server import HttpServer
from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, make_weights, reference_forward

LIMIT = 256 * 1024


@pytest.fixture
def server(tmp_path, signing_keys, device_profile, mlp_bundle_factory):
    store = ModelStore(tmp_path / "store", signing_keys.public_key, device_profile)
    for name, version, seed in (("mlp", "1", 1), ("other", "2", 2)):
        manifest = store.install(mlp_bundle_factory(name, version, seed=seed))
        store.activate(manifest.name, manifest.version)
    registry = ModelRegistry(device_profile)
    assert registry.load_all(store) == []
    http_server = HttpServer(DataPlane(registry, max_request_bytes=LIMIT), port=0)
    http_server.start()
    yield http_server
    http_server.stop()


@pytest.fixture
def client(server):
    triton_client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield triton_client
    triton_client.close()


def x_batch(n=2, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 64)).astype(np.float32)


def triton_infer(client, x, *, binary, model="mlp", version=""):
    tensor = triton.InferInput(INPUT_NAME, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = [triton.InferRequestedOutput(OUTPUT_NAME, binary_data=binary)]
    return client.infer(model, [tensor], model_version=version, outputs=wanted, request_id="r-42")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infer(client, binary):
    x = x_batch(3)
    result = triton_infer(client, x, binary=binary)
    np.testing.assert_allclose(
        result.as_numpy(OUTPUT_NAME), reference_forward(make_weights(seed=1), x), atol=1e-5
    )
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("mlp", "1", "r-42")
    versioned = triton_infer(client, x, binary=binary, model="other", version="2")
    np.testing.assert_allclose(
        versioned.as_numpy(OUTPUT_NAME), reference_forward(make_weights(seed=2), x), atol=1e-5
    )


def test_tritonclient_default_outputs_come_back_binary(client):
    x = x_batch(1)
    tensor = triton.InferInput(INPUT_NAME, [1, 64], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("mlp", [tensor])
    np.testing.assert_allclose(
        result.as_numpy(OUTPUT_NAME), reference_forward(make_weights(seed=1), x), atol=1e-5
    )


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "edge-runtime"
    assert client.is_model_ready("mlp") and client.is_model_ready("other", "2")
    assert not client.is_model_ready("other", "9") and not client.is_model_ready("ghost")
    metadata = client.get_model_metadata("mlp")
    assert metadata == {
        "name": "mlp",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert client.get_model_metadata("other", "2")["versions"] == ["2"]
    with pytest.raises(InferenceServerException, match="not loaded"):
        client.get_model_metadata("ghost")


def test_metrics_text_counts_requests_and_errors(server, client):
    for _ in range(3):
        triton_infer(client, x_batch(1), binary=False)
    with pytest.raises(InferenceServerException):
        triton_infer(client, np.zeros((1, 63), np.float32), binary=False)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    text = response.read().decode()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/plain")
    assert 'edge_requests_total{model="mlp",version="1"} 4' in text
    assert 'edge_request_errors_total{model="mlp",version="1"} 1' in text
    assert 'edge_request_latency_seconds_count{model="mlp",version="1"} 4' in text
    snapshot = server.dataplane.metrics.snapshot()["models"]["mlp"]
    assert (snapshot["requests"], snapshot["errors"], snapshot["version"]) == (4, 1, "1")
    assert snapshot["latency_ms"]["p50"] > 0


def _infer_body(x, name=INPUT_NAME, datatype="FP32", shape=None):
    data = {"name": name, "datatype": datatype, "shape": list(shape or x.shape), "data": x.ravel().tolist()}
    return json.dumps({"inputs": [data]}).encode()


def raw_exchange(port, raw: bytes) -> tuple[int, dict]:
    """Send raw bytes on a fresh connection, read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        return reply.status, json.loads(reply.read() or b"{}")


def post(port, path, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


BINARY_HEAD = json.dumps(
    {
        "inputs": [
            {
                "name": INPUT_NAME,
                "datatype": "FP32",
                "shape": [1, 64],
                "parameters": {"binary_data_size": 256},
            }
        ]
    }
).encode()
BINARY_LENGTH = f"Inference-Header-Content-Length: {len(BINARY_HEAD)}\r\n"
BAD_REQUESTS = [
    ("malformed-json", post(0, "/v2/models/mlp/infer", b'{"inputs": [}'), 400, "not valid JSON"),
    ("wrong-name", post(0, "/v2/models/mlp/infer", _infer_body(x_batch(1), name="pixels")), 400, "unknown input 'pixels'"),
    ("wrong-shape", post(0, "/v2/models/mlp/infer", _infer_body(np.zeros((1, 63), np.float32))), 400, "shape"),
    ("wrong-dtype", post(0, "/v2/models/mlp/infer", _infer_body(np.ones((1, 64), np.int64), datatype="INT64")), 400, "dtype int64"),
    ("short-data", post(0, "/v2/models/mlp/infer", _infer_body(np.ones((1, 60), np.float32), shape=[1, 64])), 400, "do not fill"),
    ("string-data", post(0, "/v2/models/mlp/infer", _infer_body(np.array(["a"] * 64), shape=[1, 64])), 400, "FP32"),
    ("bytes-type", post(0, "/v2/models/mlp/infer", _infer_body(np.ones((1, 64)), datatype="BYTES")), 400, "BYTES"),
    ("no-inputs", post(0, "/v2/models/mlp/infer", b"{}"), 400, "inputs"),
    ("unknown-model", post(0, "/v2/models/ghost/infer", _infer_body(x_batch(1))), 404, "not loaded"),
    ("unknown-version", post(0, "/v2/models/mlp/versions/9/infer", _infer_body(x_batch(1))), 404, "version '9'"),
    ("unknown-route", b"GET /v3/nothing HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no route"),
    ("wrong-method", b"GET /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n\r\n", 405, "POST"),
    ("oversized", b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n", 413, "limit"),
    ("short-binary", post(0, "/v2/models/mlp/infer", BINARY_HEAD + b"\0" * 8, BINARY_LENGTH), 400, "binary data ends"),
    ("garbage-head", b"NONSENSE\r\n\r\n", 400, "malformed"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "raw", "status", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_json_error(server, case, raw, status, message):
    got_status, body = raw_exchange(server.port, raw)
    assert got_status == status
    assert message in body["error"]


def test_burst_of_bad_requests_then_a_good_one(server, client):
    threads = [
        threading.Thread(target=raw_exchange, args=(server.port, raw)) for _, raw, _, _ in BAD_REQUESTS * 3
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    x = x_batch(2, seed=9)
    result = triton_infer(client, x, binary=True)
    np.testing.assert_allclose(
        result.as_numpy(OUTPUT_NAME), reference_forward(make_weights(seed=1), x), atol=1e-5
    )


def test_keep_alive_connection_survives_request_errors(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    x = x_batch(1)
    for body, status in ((_infer_body(x, name="bad"), 400), (b"[1,2", 400), (_infer_body(x), 200)):
        conn.request("POST", "/v2/models/mlp/infer", body=body)
        response = conn.getresponse()
        payload = json.loads(response.read())
        assert response.status == status
    assert np.allclose(
        payload["outputs"][0]["data"], reference_forward(make_weights(seed=1), x).ravel(), atol=1e-5
    )


def read_response(stream) -> tuple[int, bytes]:
    """One response from a buffered stream that may already hold the next one."""
    status = int(stream.readline().split()[1])
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, stream.read(length)


def test_pipelined_requests_are_answered_in_order(server):
    bodies = [_infer_body(x_batch(1, seed=i)) for i in range(4)]
    raw = b"".join(post(0, "/v2/models/mlp/infer", body) for body in bodies)
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
        sock.makefile("rb") as stream,
    ):
        sock.sendall(raw)
        for i in range(4):
            status, body = read_response(stream)
            assert status == 200
            data = json.loads(body)["outputs"][0]["data"]
            expected = reference_forward(make_weights(seed=1), x_batch(1, seed=i)).ravel()
            assert np.allclose(data, expected, atol=1e-5)


def test_a_slow_model_does_not_block_health_checks(server, monkeypatch):
    model = server.dataplane.registry.get("mlp")
    release = threading.Event()
    original = model.backend.run

    def slow_run(feeds):
        release.wait(10)
        return original(feeds)

    monkeypatch.setattr(model.backend, "run", slow_run)
    body = _infer_body(x_batch(1))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(post(0, "/v2/models/mlp/infer", body))
    time.sleep(0.05)  # let the slow request reach the model (ordering only; nothing is timed)
    try:
        status, body_json = raw_exchange(server.port, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, body_json["ready"]) == (200, True)
        assert not release.is_set()
    finally:
        release.set()
    reply = http.client.HTTPResponse(sock)
    reply.begin()
    assert reply.status == 200
    sock.close()


def test_port_in_use_is_a_readable_error(server, device_profile):
    from edge_runtime.core.errors import UsageError

    other = HttpServer(server.dataplane, port=server.port)
    with pytest.raises(UsageError, match="cannot listen"):
        other.start()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_oversized_upload_from_tritonclient_gets_413_and_serving_goes_on(client, binary):
    big = np.ones((2000, 64), np.float32)  # 512 KB of tensor data, over the 256 KiB limit
    with pytest.raises(InferenceServerException, match="limit") as info:
        triton_infer(client, big, binary=binary)
    assert info.value.status() == "413"
    x = x_batch(1)
    result = triton_infer(client, x, binary=binary)
    np.testing.assert_allclose(
        result.as_numpy(OUTPUT_NAME), reference_forward(make_weights(seed=1), x), atol=1e-5
    )
