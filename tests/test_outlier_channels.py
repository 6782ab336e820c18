"""Activation outlier channels split off MatMuls before int8 (compressor/outlier_channels.py): found
on the calibration data, exact in float, the MatMul + bias pattern kept, and after NNCF's int8 and
`unmask` a quantizer whose range fits the other channels, so int8 follows float much more closely."""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressor.measure import make_session
from compressor.outlier_channels import FACTOR, MOST_CHANNELS, split_outliers, unmask
from edge_runtime.config.profiles import load_profile
from tests.conftest import require_module

PROFILE = load_profile("x86-vnni-gateway")
WIDTH = 64
OUTLIERS = (5, 40)


def _layer() -> onnx.ModelProto:
    """x[N, 8, 64] -> MatMul W ("dense") -> Add b -> Relu -> y[N, 8, 32]."""
    rng = np.random.default_rng(3)
    weight = rng.normal(scale=0.2, size=(WIDTH, 32)).astype(np.float32)
    bias = rng.normal(scale=0.1, size=(32,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"], name="dense"), helper.make_node("Add", ["m", "b"], ["h"], name="bias"),
         helper.make_node("Relu", ["h"], ["y"], name="relu")],
        "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 32])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _data(count: int, seed: int, scale: float = 40.0) -> list[dict[str, np.ndarray]]:
    """Feeds whose OUTLIERS channels are `scale` times larger than the others."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        x = rng.normal(size=(1, 8, WIDTH)).astype(np.float32)
        x[..., list(OUTLIERS)] *= scale
        feeds.append({"x": x})
    return feeds


def _outputs(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = make_session(model.SerializeToString(), PROFILE)
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def test_outlier_channels_are_found_and_the_float_graph_is_exact() -> None:
    model = _layer()
    split = split_outliers(model, _data(16, seed=1), PROFILE)
    assert split is not None
    assert split.channels == {"x": OUTLIERS} and split.split_nodes == ("dense",)
    assert len(split.float_nodes) == len(OUTLIERS)
    onnx.checker.check_model(split.model)
    held_out = _data(8, seed=2)
    np.testing.assert_allclose(
        _outputs(split.model, held_out), _outputs(model, held_out), rtol=1e-5, atol=1e-4
    )
    graph = split.model.graph
    dense = next(node for node in graph.node if node.name == "dense")
    bias = next(node for node in graph.node if node.name == "bias")
    assert dense.input[0] == "x_outliers_masked" and bias.input[0] == dense.output[0]  # MatMul + bias kept
    weight = numpy_helper.to_array(next(i for i in graph.initializer if i.name == dense.input[1]))
    assert not weight[list(OUTLIERS)].any() and weight.sum() != 0
    assert "W" not in {init.name for init in graph.initializer}  # the unsplit weight is gone


def test_no_outliers_no_split_and_at_most_the_largest_channels() -> None:
    assert split_outliers(_layer(), _data(16, seed=1, scale=1.0), PROFILE) is None
    # a broad tail is not a few outliers: only the largest MOST_CHANNELS of them are taken
    rng = np.random.default_rng(4)
    feeds = []
    for _ in range(8):
        x = rng.normal(size=(1, 8, WIDTH)).astype(np.float32)
        x[..., : MOST_CHANNELS + 6] *= 2 * FACTOR * 1.5 ** np.arange(MOST_CHANNELS + 6, dtype=np.float32)
        feeds.append({"x": x})
    split = split_outliers(_layer(), feeds, PROFILE)
    assert split is not None
    assert split.channels["x"] == tuple(range(6, MOST_CHANNELS + 6))


def test_nncf_int8_of_the_split_graph_fits_the_other_channels() -> None:
    require_module("nncf", "the openvino-export extra: pip install nncf==3.4.0")
    import nncf

    model, calibration, held_out = _layer(), _data(32, seed=1), _data(16, seed=2)
    split = split_outliers(model, calibration, PROFILE)
    assert split is not None
    nncf.set_log_level(logging.ERROR)

    def quantize(graph: onnx.ModelProto, ignored: list[str]) -> onnx.ModelProto:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return nncf.quantize(graph, nncf.Dataset(calibration), subset_size=len(calibration),
                                 ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))  # fmt: skip

    plain = quantize(model, [])
    unmasked = unmask(quantize(split.model, list(split.float_nodes)), split)
    graph = unmasked.graph
    assert not [node for node in graph.node if node.output[0] in split.masked]  # the mask Mul is gone
    quantizer = next(node for node in graph.node if node.op_type == "QuantizeLinear" and node.input[0] == "x")
    scale = numpy_helper.to_array(next(i for i in graph.initializer if i.name == quantizer.input[1]))
    plain_quantizer = next(
        node for node in plain.graph.node if node.op_type == "QuantizeLinear" and node.input[0] == "x"
    )
    plain_scale = numpy_helper.to_array(
        next(i for i in plain.graph.initializer if i.name == plain_quantizer.input[1])
    )
    assert float(scale) < float(plain_scale) / 10  # the range fits the ordinary channels
    reference = _outputs(model, held_out)
    error = np.abs(_outputs(unmasked, held_out) - reference).mean()
    plain_error = np.abs(_outputs(plain, held_out) - reference).mean()
    assert error < plain_error / 2  # weights are int8 in both, so not all the error is the range's
