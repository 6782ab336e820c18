"""One contract, every backend: ONNX Runtime, TFLite and OpenVINO load the same MLP and behave the same."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import threading

import numpy as np
import pytest

from edge_runtime.artifact.manifest import Manifest
from edge_runtime.core.errors import ModelError, RequestError
from edge_runtime.core.types import TensorSpec
from edge_runtime.engines import Backend, load_backend
from tests.conftest import require_module, require_tflite
from tests.mlp_models import (
    INPUT_NAME,
    OUTPUT_NAME,
    build_onnx_mlp,
    build_tflite_mlp,
    make_weights,
    reference_forward,
)

WEIGHTS = make_weights(64, 32, 10, seed=3)
ENGINES = {
    "onnxruntime": ("model.onnx", lambda: build_onnx_mlp(WEIGHTS)),
    "tflite": ("model.tflite", lambda: build_tflite_mlp(WEIGHTS)),
    "openvino": ("model.onnx", lambda: build_onnx_mlp(WEIGHTS)),
}
OPENVINO_EXTRA = "the openvino extra: pip install openvino==2026.4.1"


def manifest_for(engine: str, **changes) -> Manifest:
    manifest = Manifest(
        name="mlp",
        version="1",
        profile="x86-vnni-gateway",
        engine=engine,
        model_file=ENGINES[engine][0],
        inputs=(TensorSpec(INPUT_NAME, "float32", ("N", 64)),),
        outputs=(TensorSpec(OUTPUT_NAME, "float32", ("N", 10)),),
        files={},
    )
    return dataclasses.replace(manifest, **changes)


@pytest.fixture(params=sorted(ENGINES))
def engine(request) -> str:
    if request.param == "tflite":
        require_tflite()
    if request.param == "openvino":
        require_module("openvino", OPENVINO_EXTRA)
    return request.param


@pytest.fixture
def backend(engine, device_profile) -> Backend:
    loaded = load_backend(manifest_for(engine), ENGINES[engine][1](), device_profile)
    yield loaded
    loaded.close()


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 64)).astype(np.float32)


def test_specs_name_the_tensors_with_a_free_batch_dimension(backend):
    assert isinstance(backend, Backend)
    [spec_in], [spec_out] = backend.inputs, backend.outputs
    assert (spec_in.name, spec_in.dtype, spec_in.shape[1]) == (INPUT_NAME, "float32", 64)
    assert (spec_out.name, spec_out.dtype, spec_out.shape[1]) == (OUTPUT_NAME, "float32", 10)
    assert isinstance(spec_in.shape[0], str)


def test_outputs_match_the_reference_for_several_batch_sizes(backend):
    for n in (1, 3, 1, 5):
        x = batch(n, seed=n)
        out = backend.run({INPUT_NAME: x})
        assert set(out) == {OUTPUT_NAME}
        assert out[OUTPUT_NAME].dtype == np.float32
        np.testing.assert_allclose(out[OUTPUT_NAME], reference_forward(WEIGHTS, x), atol=1e-5)


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({}, "missing input 'input'"),
        ({INPUT_NAME: batch(1), "extra": batch(1)}, "unknown input 'extra'"),
        ({INPUT_NAME: np.zeros((1, 63), np.float32)}, None),
        ({INPUT_NAME: np.zeros((64,), np.float32)}, None),
        ({INPUT_NAME: np.zeros((1, 64), np.int64)}, None),
    ],
    ids=["missing", "unknown", "wrong-width", "wrong-rank", "wrong-dtype"],
)
def test_bad_feeds_raise_request_error_and_the_backend_keeps_working(backend, feeds, message):
    with pytest.raises(RequestError, match=message):
        backend.run(feeds)
    x = batch(2)
    np.testing.assert_allclose(
        backend.run({INPUT_NAME: x})[OUTPUT_NAME], reference_forward(WEIGHTS, x), atol=1e-5
    )


def test_unloadable_model_is_a_model_error(engine, device_profile):
    with pytest.raises(ModelError, match="cannot load"):
        load_backend(manifest_for(engine), b"this is not a model", device_profile)


def test_manifest_that_does_not_describe_the_model_is_refused(engine, device_profile):
    wrong = manifest_for(engine, inputs=(TensorSpec("pixels", "float32", ("N", 64)),))
    with pytest.raises(ModelError, match="do not match"):
        load_backend(wrong, ENGINES[engine][1](), device_profile)


def test_run_after_close_is_a_model_error(backend):
    backend.close()
    with pytest.raises(ModelError, match="unloaded"):
        backend.run({INPUT_NAME: batch(1)})


def test_concurrent_runs_each_get_their_own_answer(backend):
    inputs = [batch(1 + i % 3, seed=i) for i in range(16)]
    results: dict[int, np.ndarray] = {}

    def worker(i: int) -> None:
        for _ in range(5):
            results[i] = backend.run({INPUT_NAME: inputs[i]})[OUTPUT_NAME]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, x in enumerate(inputs):
        np.testing.assert_allclose(results[i], reference_forward(WEIGHTS, x), atol=1e-5)


def test_onnx_providers_are_filtered_and_session_config_applied(device_profile, caplog):
    runtime = dataclasses.replace(
        device_profile.runtime, execution_providers=("NoSuchExecutionProvider", "CPUExecutionProvider")
    )
    profile = dataclasses.replace(device_profile, runtime=runtime)
    manifest = manifest_for("onnxruntime", session_config={"session.disable_quant_qdq": "1"})
    with caplog.at_level(logging.WARNING):
        backend = load_backend(manifest, build_onnx_mlp(WEIGHTS), profile, threads=2)
    assert backend.providers == ("CPUExecutionProvider",)
    assert "NoSuchExecutionProvider" in caplog.text
    x = batch(2)
    np.testing.assert_allclose(
        backend.run({INPUT_NAME: x})[OUTPUT_NAME], reference_forward(WEIGHTS, x), atol=1e-5
    )


def test_tflite_int8_model_is_seen_as_float(device_profile):
    require_tflite()
    calibration = batch(64, seed=11)
    model = build_tflite_mlp(WEIGHTS, int8=True, calibration=calibration)
    backend = load_backend(manifest_for("tflite"), model, device_profile)
    assert backend.inputs[0].dtype == "float32" and backend.outputs[0].dtype == "float32"
    x = batch(8, seed=12)
    out = backend.run({INPUT_NAME: x})[OUTPUT_NAME]
    expected = reference_forward(WEIGHTS, x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=0.03)
    assert (out.argmax(-1) == expected.argmax(-1)).mean() >= 0.75
    with pytest.raises(RequestError, match="must be float"):
        backend.run({INPUT_NAME: np.zeros((1, 64), np.int8)})


def test_runtime_modules_import_without_onnx_or_tflite():
    code = (
        "import sys\n"
        "import edge_runtime.transports.http.server, edge_runtime.state.store, edge_runtime.serving.registry, edge_runtime.codecs.v2\n"
        "import edge_runtime.engines.onnx, edge_runtime.engines.tflite, edge_runtime.engines.openvino\n"
        "heavy = {'onnx', 'tensorflow', 'torch', 'compressor', 'ai_edge_litert', 'tflite_runtime', 'openvino'}\n"
        "heavy &= set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_onnx_runtime_reads_no_external_data_beside_the_process(
    device_profile, tmp_path, monkeypatch
) -> None:
    # From bytes, ONNX Runtime (without graph optimizations) resolves a model's external data against
    # the working directory, "../" included: a bundle could make the daemon read a file there.
    import onnxruntime as ort

    from edge_runtime.engines import onnx as onnx_engine
    from tests.test_openvino_engine import _model_with_external_weights

    plain = onnx_engine._session_options

    def unoptimized(manifest: Manifest, threads: int) -> ort.SessionOptions:
        options = plain(manifest, threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return options

    monkeypatch.setattr(onnx_engine, "_session_options", unoptimized)
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    for folder in (tmp_path, tmp_path / "run"):
        (folder / "secret.bin").write_bytes(b"KEY!")
    manifest = dataclasses.replace(manifest_for("onnxruntime"), inputs=(), outputs=())
    for location in ("secret.bin", "../secret.bin", str(tmp_path / "secret.bin")):
        with pytest.raises(ModelError, match="cannot load the model"):
            load_backend(manifest, _model_with_external_weights(location), device_profile)
    with pytest.raises(ModelError, match="is refused"):
        bad = {"session.model_external_initializers_file_folder_path": str(tmp_path)}
        load_backend(
            dataclasses.replace(manifest, session_config=bad), build_onnx_mlp(WEIGHTS), device_profile
        )
