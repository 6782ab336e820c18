"""Client errors are 4xx and both JSON paths agree (issue 10 item 4), on a real HttpServer.

Every test runs twice: with orjson and with the standard library json (a device's plain install).
"""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest
import tritonclient.http as triton

from edge_runtime.codecs import v2
from edge_runtime.serving.dataplane import DataPlane
from edge_runtime.serving.registry import ModelRegistry
from edge_runtime.state.store import ModelStore
from edge_runtime.transports.http.server import HttpServer
from tests.mlp_models import INPUT_NAME, OUTPUT_NAME

LIMIT = 4 * 1024 * 1024


@pytest.fixture(params=["orjson", "stdlib"])
def server(request, monkeypatch, tmp_path, signing_keys, device_profile, mlp_bundle_factory):
    if request.param == "stdlib":
        monkeypatch.setattr(v2, "orjson", None)
    elif v2.orjson is None:
        pytest.fail("orjson is not installed: the orjson half of these tests cannot run")
    store = ModelStore(tmp_path / "store", signing_keys.public_key, device_profile)
    manifest = store.install(mlp_bundle_factory("mlp", "1", seed=1))
    store.activate(manifest.name, manifest.version)
    registry = ModelRegistry(device_profile)
    assert registry.load_all(store) == []
    http_server = HttpServer(DataPlane(registry, max_request_bytes=LIMIT), port=0)
    http_server.start()
    yield http_server
    http_server.stop()


def post(server: HttpServer, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", "/v2/models/mlp/infer", body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def strict_json(raw: bytes):
    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    return json.loads(raw, parse_constant=refuse)


def doc(data="[0.5]", **extra) -> bytes:
    tensor = f'{{"name": "{INPUT_NAME}", "datatype": "FP32", "shape": [1, 64], "data": {data}}}'
    rest = "".join(f", {json.dumps(key)}: {value}" for key, value in extra.items())
    return f'{{"inputs": [{tensor}]{rest}}}'.encode()


ROW = "[" + ", ".join(["0.5"] * 64) + "]"
CASES = [
    ("deep", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "request body is not valid JSON: nested too deeply"),
    ("nan", doc(ROW.replace("0.5", "NaN", 1)), "request body is not valid JSON: NaN and Infinity"),
    ("infinity", doc(ROW.replace("0.5", "Infinity", 1)), "NaN and Infinity are not valid JSON numbers"),
    ("outputs-parameters", doc(ROW, outputs=f'[{{"name": "{OUTPUT_NAME}", "parameters": [1]}}]'),
     f"output '{OUTPUT_NAME}': 'parameters' must be an object, got list"),
    ("binary-data-flag", doc(ROW, outputs=f'[{{"name": "{OUTPUT_NAME}", "parameters": {{"binary_data": 1}}}}]'),
     "parameter 'binary_data' must be true or false"),
    ("parameters", doc(ROW, parameters='"x"'), "request: 'parameters' must be an object, got str"),
    ("id", doc(ROW, id="[1]"), "'id' must be a string, got list"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "message"), CASES, ids=[c[0] for c in CASES])
def test_hostile_json_is_the_same_400_on_both_paths(server, case, body, message):
    status, raw = post(server, body)
    assert status == 400
    assert message in strict_json(raw)["error"]
    assert post(server, doc(ROW))[0] == 200  # and the server goes on


def test_non_finite_outputs_come_back_as_valid_json(server):
    x = np.zeros((2, 64), np.float32)
    x[0, 0] = np.nan  # binary tensors may carry NaN: only JSON text cannot
    tensor = triton.InferInput(INPUT_NAME, [2, 64], "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        wanted = [triton.InferRequestedOutput(OUTPUT_NAME, binary_data=False)]
        result = client.infer("mlp", [tensor], outputs=wanted)
    finally:
        client.close()
    data = result.get_response()["outputs"][0]["data"]
    assert data[:10] == [None] * 10 and None not in data[10:]
    values = result.as_numpy(OUTPUT_NAME)
    assert np.isnan(values[0]).all() and np.isfinite(values[1]).all()
    binary_head = json.dumps(
        {"inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [2, 64],
                     "parameters": {"binary_data_size": x.nbytes}}]}
    ).encode()  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST",
        "/v2/models/mlp/infer",
        body=binary_head + x.tobytes(),
        headers={v2.HEADER_LENGTH: str(len(binary_head))},
    )
    response = conn.getresponse()
    body = strict_json(response.read())  # raw JSON output: strict JSON, null for NaN
    conn.close()
    assert response.status == 200 and body["outputs"][0]["data"][:10] == [None] * 10
