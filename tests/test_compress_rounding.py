"""Error-compensating rounding (GPTQ) of int8 and 4-bit weights (issue 13, item 5), on a small CNN
built in code: a grouped and a plain Conv, a Gemm with transB and a MatMul."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.int4_weights import store_weights_int4
from compressor.int8_weights import store_weights_int8
from compressor.measure import make_session, run_all
from compressor.passes.base import CompressionContext
from compressor.passes.quantize import Int8Options, Int8Quantization
from compressor.rounding import Rounding, gptq_levels, nearest_levels
from edge_runtime.config.profiles import load_profile
from edge_runtime.core.errors import UsageError

PROFILE = load_profile("x86-avx2-gateway")
WEIGHTS = ("conv", "depthwise", "gemm", "matmul")


def cnn() -> onnx.ModelProto:
    """[N, 8, 12, 12] -> Conv 3x3 -> Relu -> depthwise Conv 3x3 -> pool -> Gemm(transB) -> MatMul."""
    rng = np.random.default_rng(0)
    weights = {
        "conv": rng.normal(0, 0.2, (16, 8, 3, 3)),
        "depthwise": rng.normal(0, 0.3, (16, 1, 3, 3)),
        "gemm": rng.normal(0, 0.3, (24, 16)),
        "matmul": rng.normal(0, 0.3, (24, 12)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv"], ["c1"], pads=[1, 1, 1, 1], name="c1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "depthwise"], ["c2"], pads=[1, 1, 1, 1], group=16, name="c2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "gemm"], ["g"], transB=1, name="g"),
        helper.make_node("MatMul", ["g", "matmul"], ["y"], name="m"),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def images(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Inputs whose channels are correlated (a mix of 3 sources), as real feature maps are."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(8, 3))
    feeds = []
    for _ in range(count):
        sources = rng.normal(size=(3, 12, 12))
        x = np.einsum("cs,shw->chw", mixing, sources) + 0.05 * rng.normal(size=(8, 12, 12))
        feeds.append({"x": x[None].astype(np.float32)})
    return feeds


def _error(model: onnx.ModelProto, candidate: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> float:
    reference = run_all(make_session(model.SerializeToString(), PROFILE), feeds)
    produced = run_all(make_session(candidate.SerializeToString(), PROFILE), feeds)
    return float(np.mean([np.mean((r[0] - p[0]) ** 2) for r, p in zip(reference, produced, strict=True)]))


def test_hessians_cover_every_conv_group_gemm_and_matmul() -> None:
    rounding = Rounding.measured(cnn(), images(4, 1), PROFILE)
    shapes = {name: [h.shape for h in rounding.hessians[name]] for name in WEIGHTS}
    assert shapes == {
        "conv": [(72, 72)],
        "depthwise": [(9, 9)] * 16,
        "gemm": [(16, 16)],
        "matmul": [(24, 24)],
    }


@pytest.mark.parametrize("bits", [8, 4])
def test_gptq_moves_the_output_less_than_rounding_to_nearest(bits: int) -> None:
    model = cnn()
    rounding = Rounding.measured(model, images(8, 1), PROFILE)
    held_out = images(16, 2)
    if bits == 8:
        nearest, _ = store_weights_int8(model)
        compensated, report = store_weights_int8(model, rounding=rounding)
    else:
        nearest, _ = store_weights_int4(model, frozenset(WEIGHTS))
        compensated, report = store_weights_int4(model, frozenset(WEIGHTS), rounding=rounding)
    assert set(report.names) == set(WEIGHTS)
    assert _error(model, compensated, held_out) < 0.7 * _error(model, nearest, held_out)


def test_gptq_levels_stay_in_range_and_equal_nearest_when_inputs_are_independent() -> None:
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(6, 10))
    scale = np.abs(rows).max(axis=1, keepdims=True) / 7
    levels = gptq_levels(rows, np.eye(10), scale, 7)
    assert levels.min() >= -7 and levels.max() <= 7
    # With H = I no column predicts another: nothing to compensate, so GPTQ is round-to-nearest.
    np.testing.assert_array_equal(levels, nearest_levels(rows, scale, 7))


def test_rounding_option_is_checked(tmp_path) -> None:
    ctx = CompressionContext(PROFILE, images(2, 1), images(2, 2), tmp_path)
    with pytest.raises(UsageError, match="rounding='bogus'"):
        Int8Quantization(Int8Options(rounding="bogus")).run(cnn(), ctx)


def test_weight_damage_is_probed_on_the_samples_int8_hurts_most(tmp_path) -> None:
    """The det regression: damage was measured on the first 4 selection samples, which may be easy
    pages; the probe is now the 4 on which the all-int8 candidate scores worst."""
    from compressor.passes.quantize import _Search

    feeds = images(10, 2)
    ctx = CompressionContext(PROFILE, images(4, 1), feeds, tmp_path, log=lambda line: None)
    search = _Search(cnn(), ctx, Int8Options(rounding="nearest"))
    candidate = search.evaluate("weight-only int8", ())
    hurt = [2, 5, 7, 9]
    for index in hurt:  # as if int8 moved these samples' outputs most
        candidate.outputs[index] = [-output for output in search.reference[index]]
    assert search.hardest_samples(candidate) == hurt
