"""Real exported graphs to static ones (issue 13, item 7): input shapes fixed from the data and shape
arithmetic folded by onnxslim, so a `Shape`-based flatten no longer blocks the TFLite target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressor.measure import make_session
from compressor.passes import create_pass
from compressor.passes.base import CompressionContext
from compressor.pipeline import default_recipe
from compressor.tflite_export import unsupported_tflite_ops
from edge_runtime.config.profiles import load_profile


def shape_flatten_cnn() -> onnx.ModelProto:
    """Conv -> Relu -> flatten through Shape/Gather/Concat/Reshape (as exporters write it) -> Gemm."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8 * 8 * 8, 4)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "axes"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Shape", ["r"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["r", "flat_shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "shape_flatten",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def test_simplify_fixes_shapes_from_the_data_and_folds_the_shape_flatten(tmp_path: Path) -> None:
    model = shape_flatten_cnn()
    assert "Shape" in unsupported_tflite_ops(model)
    rng = np.random.default_rng(1)
    feeds = [{"image": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    profile = load_profile("raspberry-pi-zero-2w")
    ctx = CompressionContext(profile=profile, calibration=feeds, validation=feeds, workdir=tmp_path)
    before = model.SerializeToString()
    result = create_pass("simplify").run(model, ctx)
    assert model.SerializeToString() == before  # the input is never mutated
    assert unsupported_tflite_ops(result.model) == []
    assert result.report["input_shapes"] == ["image:1,3,8,8"]
    assert "Shape" in result.report["ops_before"] and "Shape" not in result.report["ops_after"]
    for feed in feeds:
        np.testing.assert_allclose(
            make_session(result.model.SerializeToString(), profile).run(None, feed)[0],
            make_session(before, profile).run(None, feed)[0],
            rtol=1e-5,
            atol=1e-5,
        )


def test_tflite_profiles_simplify_before_converting() -> None:
    assert default_recipe(load_profile("raspberry-pi-zero-2w"))[-2:] == ("simplify", "tflite")
    assert default_recipe(load_profile("x86-vnni-gateway")) == ("prepare", "int8")
