"""DataPlane: one validation for every transport (names, lossless casts only, shapes), metrics."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.core.errors import NotFoundError, PayloadTooLarge, RequestError
from edge_runtime.core.types import InferRequest
from edge_runtime.serving.dataplane import DataPlane
from edge_runtime.serving.registry import ModelRegistry
from edge_runtime.state.store import ModelStore
from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, make_weights, reference_forward


@pytest.fixture
def dataplane(tmp_path, signing_keys, device_profile, mlp_bundle_factory) -> DataPlane:
    store = ModelStore(tmp_path / "store", signing_keys.public_key, device_profile)
    store.install(mlp_bundle_factory("mlp", "1"))
    store.activate("mlp", "1")
    registry = ModelRegistry(device_profile)
    registry.load_all(store)
    return DataPlane(registry, max_request_bytes=64 * 4 * 8)


def test_infer_answers_with_version_and_id(dataplane):
    x = np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32)
    response = dataplane.infer(InferRequest("mlp", {INPUT_NAME: x}, id="abc"))
    assert (response.model, response.version, response.id) == ("mlp", "1", "abc")
    np.testing.assert_allclose(response.outputs[OUTPUT_NAME], reference_forward(make_weights(), x), atol=1e-5)


def test_lossless_casts_only(dataplane):
    small_ints = np.ones((1, 64), np.int8)
    out = dataplane.infer(InferRequest("mlp", {INPUT_NAME: small_ints})).outputs[OUTPUT_NAME]
    np.testing.assert_allclose(
        out, reference_forward(make_weights(), small_ints.astype(np.float32)), atol=1e-5
    )
    for dtype in (np.int64, np.float64):
        with pytest.raises(RequestError, match=f"dtype {np.dtype(dtype)}"):
            dataplane.infer(InferRequest("mlp", {INPUT_NAME: np.ones((1, 64), dtype)}))


@pytest.mark.parametrize(
    ("request_", "error", "message"),
    [
        (
            InferRequest("mlp", {"pixels": np.ones((1, 64), np.float32)}),
            RequestError,
            "unknown input 'pixels'",
        ),
        (InferRequest("mlp", {}), RequestError, "missing input 'input'"),
        (InferRequest("mlp", {INPUT_NAME: np.ones((1, 65), np.float32)}), RequestError, r"\[1, 65\]"),
        (InferRequest("mlp", {INPUT_NAME: np.ones((64,), np.float32)}), RequestError, "shape"),
        (InferRequest("mlp", {INPUT_NAME: np.ones((9, 64), np.float32)}), PayloadTooLarge, "limit"),
        (
            InferRequest("mlp", {INPUT_NAME: np.ones((1, 64), np.float32)}, outputs=("nope",)),
            RequestError,
            "nope",
        ),
        (InferRequest("ghost", {}), NotFoundError, "ghost"),
        (InferRequest("mlp", {}, version="2"), NotFoundError, "version '2'"),
    ],
)
def test_bad_requests(dataplane, request_, error, message):
    with pytest.raises(error, match=message):
        dataplane.infer(request_)


def test_metrics_snapshot_and_prometheus(dataplane):
    x = np.ones((1, 64), np.float32)
    for _ in range(5):
        dataplane.infer(InferRequest("mlp", {INPUT_NAME: x}))
    with pytest.raises(RequestError):
        dataplane.infer(InferRequest("mlp", {"bad": x}))
    with pytest.raises(NotFoundError):
        dataplane.infer(InferRequest("ghost", {INPUT_NAME: x}))
    snapshot = dataplane.metrics.snapshot()
    mlp = snapshot["models"]["mlp"]
    assert (mlp["version"], mlp["requests"], mlp["errors"], snapshot["rejected"]) == ("1", 6, 1, 1)
    assert 0 < mlp["latency_ms"]["p50"] <= mlp["latency_ms"]["p95"] <= mlp["latency_ms"]["p99"]
    text = dataplane.metrics.prometheus_text()
    assert 'edge_request_latency_seconds_bucket{model="mlp",version="1",le="+Inf"} 6' in text
    assert "edge_requests_rejected_total 1" in text


def test_metadata_and_readiness(dataplane):
    assert dataplane.live() and dataplane.ready()
    assert dataplane.model_ready("mlp") and dataplane.model_ready("mlp", "1")
    assert not dataplane.model_ready("mlp", "2") and not dataplane.model_ready("ghost")
    assert dataplane.model_metadata("mlp")["inputs"] == [
        {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 64]}
    ]
    assert dataplane.server_metadata()["extensions"] == ["binary_tensor_data"]
