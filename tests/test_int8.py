"""The int8 path on small models built in code: preparation, weight storage, per-node search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.int8_weights import store_small_floats_fp16, store_weights_int8
from compressor.onnx_model import constants_to_initializers, load_model, preprocess, shrink_names
from compressor.passes.base import CompressionContext
from compressor.passes.quantize import Int8Quantization
from compressor.pipeline import compress
from edge_runtime.config.profiles import load_profile
from edge_runtime.core.errors import ModelError

# Latency is measured but must not decide these outcomes: equal fixed timings (see conftest).
pytestmark = pytest.mark.usefixtures("fixed_latency")


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value.astype(np.float32)))


def small_cnn(opset: int = 11, seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-Relu-Conv-Relu-GAP-Gemm with every weight in a Constant node (as Paddle/TF exporters write)."""
    rng = np.random.default_rng(seed)
    nodes = [
        _constant("w1", rng.normal(0, 0.3, (16, 3, 3, 3))),
        _constant("b1", rng.normal(0, 0.1, (16,))),
        _constant("bn_scale", rng.uniform(0.5, 1.5, (16,))),
        _constant("bn_bias", rng.normal(0, 0.1, (16,))),
        _constant("bn_mean", rng.normal(0, 0.1, (16,))),
        _constant("bn_var", rng.uniform(0.5, 1.5, (16,))),
        _constant("w2", rng.normal(0, 0.1, (32, 16, 3, 3))),
        _constant("w3", rng.normal(0, 0.2, (32, 10))),
        _constant("b3", rng.normal(0, 0.1, (10,))),
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, feed
    )[0]


def _images(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(1, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


def test_preprocess_moves_constants_upgrades_opset_and_folds_batchnorm(tmp_path: Path) -> None:
    model = small_cnn(opset=11)
    prepared, notes = preprocess(model, tmp_path)
    ops = [node.op_type for node in prepared.graph.node]
    assert "Constant" not in ops and "BatchNormalization" not in ops
    assert next(o.version for o in prepared.opset_import if o.domain in ("", "ai.onnx")) >= 13
    weights = {init.name: numpy_helper.to_array(init) for init in prepared.graph.initializer}
    compute = [node for node in prepared.graph.node if node.op_type in ("Conv", "Gemm")]
    assert [node.op_type for node in compute] == ["Conv", "Conv", "Gemm"]
    assert all(node.input[1] in weights for node in compute), "every weight must be an initializer"
    assert compute[1].input[1] == "w2" and compute[2].input[1:] == ["w3", "b3"]
    # conv1 carries w1 and b1 folded with the batch norm: y = (conv(x, w1) + b1 - mean) * s + bias
    const = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if not n.input}
    scale = const["bn_scale"] / np.sqrt(const["bn_var"] + 1e-5)
    np.testing.assert_allclose(
        weights[compute[0].input[1]], const["w1"] * scale[:, None, None, None], rtol=1e-5
    )
    folded_bias = (const["b1"] - const["bn_mean"]) * scale + const["bn_bias"]
    np.testing.assert_allclose(weights[compute[0].input[2]], folded_bias, rtol=1e-5, atol=1e-6)
    assert any("Constant" in note for note in notes) and any(
        "opset upgraded from 11" in note for note in notes
    )
    feed = _images(1, 0)[0]
    np.testing.assert_allclose(_run(prepared, feed), _run(model, feed), rtol=1e-4, atol=1e-5)


def test_int8_weight_storage_is_int8_on_disk_and_numerically_close(tmp_path: Path) -> None:
    model = constants_to_initializers(small_cnn(opset=13))
    stored, report = store_weights_int8(model)
    assert set(report.names) == {"w1", "w2", "w3"}
    dtypes = {init.name: init.data_type for init in stored.graph.initializer}
    assert dtypes["w2_i8"] == TensorProto.INT8 and "w2" not in dtypes
    assert report.int8_bytes < report.float_bytes / 3.5 and report.worst_sqnr_db > 35
    slim, saved = store_small_floats_fp16(stored)
    assert saved > 0 and any(init.data_type == TensorProto.FLOAT16 for init in slim.graph.initializer)
    short = shrink_names(slim)
    assert len(short.SerializeToString()) < len(model.SerializeToString()) / 3
    feed = _images(1, 1)[0]
    expected = _run(model, feed)
    np.testing.assert_allclose(_run(short, feed), expected, atol=0.02 * float(np.abs(expected).max()))


def test_shrink_names_keeps_graph_inputs_outputs_and_results() -> None:
    model = constants_to_initializers(small_cnn(opset=13))
    short = shrink_names(model)
    assert [i.name for i in short.graph.input] == ["image"] and [o.name for o in short.graph.output] == [
        "logits"
    ]
    assert all(not node.name for node in short.graph.node)
    feed = _images(1, 2)[0]
    np.testing.assert_array_equal(_run(short, feed), _run(model, feed))


def test_int8_pass_never_mutates_input_and_reports_every_candidate(tmp_path: Path) -> None:
    prepared, _ = preprocess(small_cnn(opset=13), tmp_path)
    before = prepared.SerializeToString()
    ctx = CompressionContext(
        profile=load_profile("x86-vnni-gateway"),
        calibration=_images(16, 3),
        validation=_images(8, 4),
        workdir=tmp_path,
        log=lambda line: None,
    )
    result = Int8Quantization().run(prepared, ctx)
    assert prepared.SerializeToString() == before
    report = result.report
    assert report["candidates"][0]["label"] == "weight-only int8"
    assert len(report["candidates"]) >= 2  # at least one int8-compute candidate was measured
    assert report["bytes_after"] < report["bytes_before"] / 3
    assert report["fidelity"]["cosine"] >= 0.99
    assert set(report["int8_compute_nodes"]) | set(report["float_compute_nodes"]) == {"conv1", "conv2", "fc"}
    int8_inits = [i for i in result.model.graph.initializer if i.data_type == TensorProto.INT8]
    assert int8_inits, "weights must be stored as int8"


def test_compress_end_to_end_meets_budget_and_builds_golden(tmp_path: Path) -> None:
    path = tmp_path / "cnn.onnx"
    onnx.save_model(small_cnn(opset=11), str(path))
    result = compress(
        path,
        load_profile("x86-vnni-gateway"),
        _images(16, 5),
        validation=_images(8, 6),
        log=lambda line: None,
    )
    assert result.report["budgets"]["met"]
    assert result.report["compressed"]["size_ratio"] > 3
    assert [spec.name for spec in result.inputs] == ["image"] and result.inputs[0].shape == ("N", 3, 16, 16)
    assert len(result.golden) == 4
    produced = _run(result.model, result.golden[0].inputs)
    np.testing.assert_array_equal(produced, result.golden[0].outputs["logits"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no graph nodes"),
        (b"\x00\x01garbage that is not protobuf\xff\xff", "not an ONNX model"),
    ],
)
def test_load_model_refuses_non_onnx(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        load_model(path)
