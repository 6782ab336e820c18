"""The OpenVINO engine beyond the shared contract: its precision hint, its options, what it refuses to
read, and a device without the `openvino` package (the bundle is refused with what to install)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.core.errors import ModelError, RequestError
from edge_runtime.core.types import TensorSpec
from edge_runtime.engines import load_backend
from edge_runtime.engines.openvino import compile_config
from tests.conftest import require_module, require_tflite
from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, build_onnx_mlp, build_tflite_mlp, reference_forward
from tests.test_backends_contract import OPENVINO_EXTRA, WEIGHTS, batch, manifest_for

ROOT = Path(__file__).resolve().parent.parent


def openvino_manifest(**options: str):
    return dataclasses.replace(manifest_for("openvino"), engine_options=dict(options))


@pytest.fixture
def openvino():
    return require_module("openvino", OPENVINO_EXTRA)


def test_bf16_is_asked_for_only_where_the_cpu_has_it() -> None:
    config, reason = compile_config("bf16", 2, ("FP32", "BF16", "INT8"))
    assert config["INFERENCE_PRECISION_HINT"] == "bf16" and config["INFERENCE_NUM_THREADS"] == 2
    assert reason == ""
    config, reason = compile_config("bf16", 0, ("FP32", "INT8"))
    assert config["INFERENCE_PRECISION_HINT"] == "f32" and "INFERENCE_NUM_THREADS" not in config
    assert "no BF16 support" in reason and "running f32" in reason
    config, reason = compile_config("f32", 1, ("FP32", "BF16"))
    assert config["INFERENCE_PRECISION_HINT"] == "f32" and reason == ""


def test_bf16_bundle_runs_at_the_precision_this_cpu_has(openvino, device_profile, caplog) -> None:
    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    backend = load_backend(
        openvino_manifest(inference_precision="bf16"), build_onnx_mlp(WEIGHTS), device_profile
    )
    x = batch(4, seed=5)
    out = backend.run({INPUT_NAME: x})[OUTPUT_NAME]
    if "BF16" in capabilities:
        assert backend.precision == "bf16" and backend.fallback_reason == ""
        np.testing.assert_allclose(out, reference_forward(WEIGHTS, x), atol=0.03)
    else:
        assert backend.precision == "f32" and "no BF16 support" in backend.fallback_reason
        assert "no BF16 support" in caplog.text
        np.testing.assert_allclose(out, reference_forward(WEIGHTS, x), atol=1e-5)
    backend.close()


@pytest.mark.parametrize(
    ("engine", "options", "message"),
    [
        ("openvino", {"inference_precision": "fp64"}, "inference_precision 'fp64' is not one of f32, bf16"),
        ("openvino", {"num_streams": "4"}, "engine option 'num_streams' is not known to the openvino engine"),
        ("onnxruntime", {"inference_precision": "f32"}, "not known to the onnxruntime engine"),
    ],
    ids=["bad-precision", "unknown-option", "option-for-another-engine"],
)
def test_engine_options_are_checked(engine, options, message, device_profile) -> None:
    if engine == "openvino":
        require_module("openvino", OPENVINO_EXTRA)
    manifest = dataclasses.replace(manifest_for(engine), engine_options=options)
    with pytest.raises(ModelError, match=message):
        load_backend(manifest, build_onnx_mlp(WEIGHTS), device_profile)


def _model_with_external_weights(location: str) -> bytes:
    """An ONNX model whose one initializer says its bytes live in the file `location`."""
    from onnx import TensorProto, helper

    weights = TensorProto(name="W", data_type=TensorProto.UINT8, dims=[4])
    weights.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        weights.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [4])], [weights],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def test_a_model_cannot_read_files_beside_the_process(
    openvino, device_profile, tmp_path, monkeypatch
) -> None:
    # From bytes, OpenVINO resolves external data against the working directory: a bundle could
    # make the daemon read (and serve back) a file there. The engine reads from an empty folder.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.bin").write_bytes(b"KEY!")
    manifest = dataclasses.replace(openvino_manifest(), inputs=(), outputs=())
    for location in ("secret.bin", str(tmp_path / "secret.bin"), "../secret.bin"):
        with pytest.raises(ModelError, match="OpenVINO cannot load the model"):
            load_backend(manifest, _model_with_external_weights(location), device_profile)


def test_a_tflite_model_in_an_openvino_bundle_is_refused(openvino, device_profile) -> None:
    require_tflite()
    with pytest.raises(ModelError, match="not an ONNX model"):
        load_backend(openvino_manifest(), build_tflite_mlp(WEIGHTS), device_profile)


def test_without_the_package_the_bundle_is_refused_with_what_to_install(tmp_path) -> None:
    # A device without the extra: `import openvino` fails; ONNX Runtime bundles still load.
    blocked = tmp_path / "blocked" / "openvino"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('no openvino on this device')\n")
    code = textwrap.dedent(
        """
        import numpy as np
        from edge_runtime.config.profiles import load_profile
        from edge_runtime.core.errors import ModelError
        from edge_runtime.engines import load_backend
        from tests.mlp_models import build_onnx_mlp
        from tests.test_backends_contract import WEIGHTS, manifest_for
        profile = load_profile("x86-vnni-gateway")
        try:
            load_backend(manifest_for("openvino"), build_onnx_mlp(WEIGHTS), profile)
        except ModelError as exc:
            print("refused:", exc)
        backend = load_backend(manifest_for("onnxruntime"), build_onnx_mlp(WEIGHTS), profile)
        print("onnxruntime:", backend.run({"input": np.zeros((1, 64), np.float32)})["probabilities"].shape)
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'blocked'}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("refused: the openvino engine needs the OpenVINO runtime")
    assert "pip install 'edge-runtime[openvino]'" in lines[0]
    assert lines[1] == "onnxruntime: (1, 10)"


def test_engine_options_round_trip_and_old_manifests_still_read() -> None:
    from edge_runtime.artifact.manifest import FileEntry, Manifest

    plain = manifest_for("onnxruntime", files={"model.onnx": FileEntry("0" * 64, 1)})
    raw = plain.to_json()
    assert b"engine_options" not in raw  # a runtime that predates the field reads this bundle
    assert Manifest.from_json(raw) == plain
    tuned = dataclasses.replace(plain, engine="openvino", engine_options={"inference_precision": "bf16"})
    assert Manifest.from_json(tuned.to_json()).engine_options == {"inference_precision": "bf16"}


def test_a_scalar_input_stays_a_scalar(openvino, device_profile) -> None:
    # A scalar sample rate beside a batch, as streaming audio models take it (np.ascontiguousarray
    # would turn the 0-d feed into shape [1], which OpenVINO refuses).
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["sr"], ["f"], to=TensorProto.FLOAT), helper.make_node("Mul", ["x", "f"], ["y"])],
        "scaled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
                   helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    manifest = dataclasses.replace(
        openvino_manifest(),
        inputs=(TensorSpec("x", "float32", ("N", 2)), TensorSpec("sr", "int64", ())),
        outputs=(TensorSpec("y", "float32", ("N", 2)),),
    )
    backend = load_backend(manifest, model.SerializeToString(), device_profile)
    assert backend.inputs[1].shape == ()
    x = np.ones((3, 2), np.float32)
    out = backend.run({"x": x, "sr": np.array(16000, np.int64)})["y"]
    np.testing.assert_array_equal(out, np.full((3, 2), 16000.0, np.float32))
    with pytest.raises(RequestError, match=r"input 'sr' has shape \[1\], the model takes \[\]"):
        backend.run({"x": x, "sr": np.array([16000], np.int64)})


def test_static_shape_compiles_for_it_and_another_shape_still_gets_the_right_answer(
    openvino, device_profile
) -> None:
    backend = load_backend(
        openvino_manifest(static_shape="input=2,64"), build_onnx_mlp(WEIGHTS), device_profile
    )
    assert backend.static_inputs == (TensorSpec(INPUT_NAME, "float32", (2, 64)),)
    assert backend.inputs[0].shape == ("?", 64)  # what the daemon advertises: the model's own shape
    x = batch(2, seed=7)
    np.testing.assert_allclose(
        backend.run({INPUT_NAME: x})[OUTPUT_NAME], reference_forward(WEIGHTS, x), atol=1e-5
    )
    assert backend.compiled_models == 1
    other = batch(5, seed=8)  # not the compiled shape: compiled once more for every shape, then answered
    np.testing.assert_allclose(
        backend.run({INPUT_NAME: other})[OUTPUT_NAME], reference_forward(WEIGHTS, other), atol=1e-5
    )
    assert backend.compiled_models == 2
    with pytest.raises(RequestError, match=r"input 'input' has shape \[2, 63\]"):
        backend.run({INPUT_NAME: np.zeros((2, 63), np.float32)})
    backend.close()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("input=2,x", "static_shape 'input=2,x' is not NAME=D1,D2"),
        ("input", "static_shape 'input' is not NAME=D1,D2"),
        ("input=2,-1", "non-negative integer dimensions"),
        ("pixels=1,64", "static_shape names pixels, not an input of the model"),
        ("input=2,65", r"static_shape input=\[2, 65\] does not fit the model's input shape"),
        ("input=2,64,1", r"static_shape input=\[2, 64, 1\] does not fit"),
    ],
    ids=["not-a-number", "no-shape", "negative", "unknown-input", "fixed-dim", "rank"],
)
def test_a_bad_static_shape_is_refused_at_load(openvino, device_profile, value, message) -> None:
    with pytest.raises(ModelError, match=message):
        load_backend(openvino_manifest(static_shape=value), build_onnx_mlp(WEIGHTS), device_profile)
