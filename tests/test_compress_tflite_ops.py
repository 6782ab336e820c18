"""The TFLite rebuild of a DB-style upsampling neck (ConvTranspose, nearest Resize by 2), which the
PP-OCR text detector needs to convert to full-integer .tflite (issue 13, item 7)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.passes._metrics import run_onnx, stack_outputs
from compressor.tflite_export import convert_to_tflite, run_tflite, unsupported_tflite_ops
from edge_runtime.config.profiles import load_profile
from edge_runtime.core.errors import CompressionError

PROFILE = load_profile("raspberry-pi-zero-2w")

for _module in ("tensorflow", "ai_edge_litert"):
    if importlib.util.find_spec(_module) is None:
        _message = f"{_module} is not installed (tflite extra)"
        if os.environ.get("EDGE_REQUIRE_EXTRAS") == "1":
            pytest.fail(_message + "; EDGE_REQUIRE_EXTRAS=1 makes this a failure", pytrace=False)
        pytest.skip(_message, allow_module_level=True)


def neck(resize_inputs: int = 3, factor: float = 2.0) -> onnx.ModelProto:
    """[1, 4, 8, 8] -> Conv -> Relu -> ConvTranspose k2 s2 (+bias) -> Resize x2 nearest -> Sigmoid."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.4, (8, 4, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.4, (8, 6, 2, 2)).astype(np.float32), "up"),
        numpy_helper.from_array(rng.normal(0, 0.1, 6).astype(np.float32), "upb"),
        numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
        numpy_helper.from_array(np.array([1, 1, factor, factor], np.float32), "scales"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("ConvTranspose", ["r", "up", "upb"], ["t"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node(
            "Resize",
            ["t", "roi", "scales"][:resize_inputs],
            ["z"],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        ),
        helper.make_node("Sigmoid", ["z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "neck",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 32, 32])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def test_conv_transpose_and_nearest_resize_convert_and_agree_with_onnx() -> None:
    from ai_edge_litert.interpreter import Interpreter

    model = neck()
    assert unsupported_tflite_ops(model) == []
    feeds = [{"x": np.random.default_rng(i).normal(size=(1, 4, 8, 8)).astype(np.float32)} for i in range(32)]
    data = convert_to_tflite(model, feeds)
    ops = {op["op_name"] for op in Interpreter(model_content=data)._get_ops_details()}
    assert {"TRANSPOSE_CONV", "RESIZE_NEAREST_NEIGHBOR"} <= ops
    reference = stack_outputs(run_onnx(model, feeds, PROFILE))[0]
    candidate = stack_outputs(run_tflite(data, feeds, model, PROFILE))[0]
    assert candidate.shape == reference.shape == (32, 6, 32, 32)
    assert float(np.max(np.abs(candidate - reference))) < 0.05


def test_resize_by_a_fraction_is_refused_with_its_sizes() -> None:
    feeds = [{"x": np.ones((1, 4, 8, 8), np.float32)}]
    with pytest.raises(CompressionError, match="non-integer factor"):
        convert_to_tflite(neck(factor=1.5), feeds)
