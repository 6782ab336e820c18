"""Full-integer int8 TFLite artifacts: converted from ONNX, run by the LiteRT interpreter, compared with ORT."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.passes._metrics import run_onnx, stack_outputs
from compressor.passes.base import CompressionContext
from compressor.tflite_export import (
    TFLiteExportPass,
    TFLiteIO,
    TFLiteOptions,
    convert_to_tflite,
    run_tflite,
    unsupported_tflite_ops,
)
from edge_runtime.config.profiles import load_profile
from edge_runtime.core.errors import CompressionError
from tests.conftest import require_module

PROFILE = load_profile("raspberry-pi-zero-2w")

for _module in ("tensorflow", "ai_edge_litert"):
    if importlib.util.find_spec(_module) is None:
        _message = f"{_module} is not installed (tflite extra)"
        if os.environ.get("EDGE_REQUIRE_EXTRAS") == "1":
            pytest.fail(_message + "; EDGE_REQUIRE_EXTRAS=1 makes this a failure", pytrace=False)
        pytest.skip(_message, allow_module_level=True)


def residual_cnn() -> onnx.ModelProto:
    """Conv -> BatchNorm -> HardSwish -> depthwise Conv + residual Add -> MaxPool -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)
    arrays = {
        "w1": rng.normal(0, 0.4, (8, 1, 3, 3)),
        "b1": rng.normal(0, 0.1, 8),
        "scale": rng.uniform(0.5, 1.5, 8),
        "shift": rng.normal(0, 0.1, 8),
        "mean": rng.normal(0, 0.1, 8),
        "var": rng.uniform(0.5, 1.5, 8),
        "dw": rng.normal(0, 0.4, (8, 1, 3, 3)),
        "fc": rng.normal(0, 0.5, (10, 8)),
        "fcb": rng.normal(0, 0.1, 10),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "scale", "shift", "mean", "var"], ["bn"]),
        helper.make_node("HardSwish", ["bn"], ["a1"]),
        helper.make_node("Conv", ["a1", "dw"], ["c2"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Add", ["c2", "a1"], ["res"]),
        helper.make_node("Relu", ["res"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "residual_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def digits() -> Any:
    """scikit-learn's digits split (no torch needed)."""
    from compressor.teachers import digits_data

    return digits_data()


@pytest.fixture(scope="module")
def digits_cnn(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    """The digits CNN teacher when torch is there to train it; else the residual CNN stands in."""
    require_module("torch", "distill extra: training the digits CNN needs torch")
    from compressor.teachers import digits_teacher

    return digits_teacher(tmp_path_factory.getbasetemp() / "digits_cnn_seed0_e12.onnx", epochs=12)


def test_digits_cnn_int8_tflite_agrees_with_onnx(tmp_path: Path, digits_cnn: onnx.ModelProto) -> None:
    from compressor.teachers import as_samples

    data = digits()
    lines: list[str] = []
    ctx = CompressionContext(
        PROFILE,
        as_samples(data.x_train[:300]),
        as_samples(data.x_test),
        tmp_path,
        labels=data.y_test,
        log=lines.append,
    )
    result = TFLiteExportPass().run(digits_cnn, ctx)
    report = result.report
    artifact = Path(report["artifact"])
    assert artifact.read_bytes()[4:8] == b"TFL3"
    assert report["bytes_after"] == artifact.stat().st_size < report["bytes_before"] / 3
    assert report["fidelity"]["top1_agreement"] >= 0.98
    onnx_accuracy = float(
        np.mean(stack_outputs(run_onnx(digits_cnn, ctx.validation, PROFILE))[0].argmax(1) == data.y_test)
    )
    assert report["fidelity"]["accuracy"] >= onnx_accuracy - 0.01
    assert result.model.SerializeToString() == digits_cnn.SerializeToString()


def test_int8_io_artifact_is_integer_only() -> None:
    from ai_edge_litert.interpreter import Interpreter

    model = residual_cnn()
    feeds = [{"x": np.random.default_rng(i).random((1, 1, 8, 8), dtype=np.float32)} for i in range(64)]
    data = convert_to_tflite(model, feeds, TFLiteOptions(io=TFLiteIO.INT8))
    interpreter = Interpreter(model_content=data)
    kinds = {d["dtype"] for d in interpreter.get_tensor_details()}
    assert kinds <= {np.int8, np.int32}, kinds
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD"} <= ops
    reference = stack_outputs(run_onnx(model, feeds, PROFILE))[0]
    candidate = stack_outputs(run_tflite(data, feeds, model, PROFILE))[0]
    cosine = np.sum(reference * candidate, 1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    )
    assert float(np.mean(cosine)) > 0.98
    assert float(np.mean(reference.argmax(1) == candidate.argmax(1))) > 0.8


def test_unsupported_op_is_named() -> None:
    model = residual_cnn()
    model.graph.node[2].op_type = "Erf"
    assert unsupported_tflite_ops(model) == ["Erf"]
    assert not TFLiteExportPass().supports(model)
    feeds = [{"x": np.zeros((1, 1, 8, 8), np.float32)}]
    with pytest.raises(CompressionError, match="does not support op\\(s\\) Erf; distill"):
        convert_to_tflite(model, feeds)
