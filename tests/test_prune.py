"""Pruning: unstructured magnitude pruning on ONNX graphs built in code, structured pruning of a real CNN."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.passes._metrics import run_onnx, stack_outputs
from compressor.passes.base import CompressionContext
from compressor.passes.distill import DistillOptions
from compressor.passes.prune import (
    MagnitudePruneOptions,
    MagnitudePrunePass,
    PruneScope,
    StructuredPruneOptions,
    StructuredPrunePass,
    magnitude_prune,
    prunable_weights,
)
from edge_runtime.config.profiles import load_profile
from edge_runtime.core.errors import UsageError

PROFILE = load_profile("x86-vnni-gateway")


def require(module: str) -> None:
    """Skip when an optional extra is missing, or fail when EDGE_REQUIRE_EXTRAS=1 (CI)."""
    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed (distill extra)"
        if os.environ.get("EDGE_REQUIRE_EXTRAS") == "1":
            pytest.fail(message + "; EDGE_REQUIRE_EXTRAS=1 makes this a failure")
        pytest.skip(message)


def conv_mlp(constant_weights: bool = False) -> onnx.ModelProto:
    """Conv(1->8) -> Relu -> Flatten -> Gemm(512->32) -> Relu -> MatMul(32->10), seeded weights."""
    rng = np.random.default_rng(0)
    weights = {
        "conv_w": rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32),
        "conv_b": rng.normal(0, 0.1, 8).astype(np.float32),
        "fc_w": rng.normal(0, 0.05, (32, 512)).astype(np.float32),
        "fc_b": rng.normal(0, 0.1, 32).astype(np.float32),
        "out_w": rng.normal(0, 0.2, (32, 10)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("MatMul", ["hr", "out_w"], ["y"]),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in weights.items()]
    if constant_weights:
        nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in inits] + nodes
        inits = []
    graph = helper.make_graph(
        nodes,
        "conv_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def samples(count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Random 1x1x8x8 feeds."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.random((1, 1, 8, 8), dtype=np.float32)} for _ in range(count)]


def context(
    tmp_path: Path, calibration: list, validation: list, labels: np.ndarray | None = None
) -> CompressionContext:
    """A context on the x86 profile that collects log lines."""
    return CompressionContext(
        PROFILE, calibration, validation, tmp_path, labels=labels, log=lambda line: None
    )


def zeros(model: onnx.ModelProto) -> dict[str, float]:
    """Fraction of exact zeros per prunable weight, counted straight from the tensors."""
    return {n: float(np.mean(numpy_helper.to_array(t) == 0)) for n, t in prunable_weights(model).items()}


def test_zero_sparsity_keeps_model_bit_identical(tmp_path: Path) -> None:
    model = conv_mlp()
    result = MagnitudePrunePass(MagnitudePruneOptions(sparsity=0.0)).run(
        model, context(tmp_path, [], samples(8))
    )
    assert result.model.SerializeToString() == model.SerializeToString()
    before = stack_outputs(run_onnx(model, samples(8), PROFILE))
    after = stack_outputs(run_onnx(result.model, samples(8), PROFILE))
    assert np.array_equal(before[0], after[0])
    assert result.report["sparsity"] == 0.0
    assert result.report["fidelity"]["max_abs_error"] == 0.0


@pytest.mark.parametrize("constant_weights", [False, True])
def test_global_pruning_reaches_requested_sparsity(tmp_path: Path, constant_weights: bool) -> None:
    model = conv_mlp(constant_weights)
    original = model.SerializeToString()
    result = MagnitudePrunePass(MagnitudePruneOptions(sparsity=0.7, min_size=0)).run(
        model, context(tmp_path, [], samples(16))
    )
    assert model.SerializeToString() == original, "the input model was mutated"
    arrays = [numpy_helper.to_array(t) for t in prunable_weights(result.model).values()]
    assert len(arrays) == 3
    total = sum(a.size for a in arrays)
    assert sum(int(np.sum(a == 0)) for a in arrays) == round(0.7 * total)
    assert result.report["sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert result.report["deflated_bytes_after"] < 0.6 * result.report["deflated_bytes_before"]
    assert result.report["bytes_after"] == pytest.approx(result.report["bytes_before"], rel=0.01)
    outputs = stack_outputs(run_onnx(result.model, samples(4), PROFILE))[0]
    assert outputs.shape == (4, 10) and np.all(np.isfinite(outputs))


def test_per_layer_pruning_and_overrides() -> None:
    options = MagnitudePruneOptions(
        sparsity=0.5, scope=PruneScope.PER_LAYER, layer_sparsity={"out_w": 0.25}, min_size=0
    )
    measured = zeros(magnitude_prune(conv_mlp(), options))
    assert measured["conv_w"] == pytest.approx(0.5, abs=1 / 72)
    assert measured["fc_w"] == pytest.approx(0.5, abs=1e-4)
    assert measured["out_w"] == pytest.approx(0.25, abs=1e-3)


def test_pruning_zeroes_the_smallest_weights() -> None:
    model = conv_mlp()
    pruned = magnitude_prune(model, MagnitudePruneOptions(sparsity=0.5, scope=PruneScope.PER_LAYER))
    before = numpy_helper.to_array(prunable_weights(model)["fc_w"])
    after = numpy_helper.to_array(prunable_weights(pruned)["fc_w"])
    assert np.abs(before[after == 0]).max() <= np.abs(before[after != 0]).min()
    assert np.array_equal(after[after != 0], before[after != 0])


def test_bad_pruning_options_are_refused() -> None:
    with pytest.raises(UsageError, match="sparsity must be in"):
        magnitude_prune(conv_mlp(), MagnitudePruneOptions(sparsity=1.0))
    with pytest.raises(UsageError, match="not prunable weights: nope"):
        magnitude_prune(conv_mlp(), MagnitudePruneOptions(layer_sparsity={"nope": 0.5}))


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, object]:
    """The digits CNN teacher (cached for the session) and its data."""
    require("torch")
    require("torch_pruning")
    require("onnx2torch")
    from compressor.teachers import digits_data, digits_teacher

    cache = tmp_path_factory.getbasetemp() / "digits_cnn_seed0_e12.onnx"
    return digits_teacher(cache, epochs=12), digits_data()


def test_structured_pruning_removes_channels_and_still_runs(tmp_path: Path, digits: tuple) -> None:
    from compressor.teachers import as_samples

    teacher, data = digits
    options = StructuredPruneOptions(ratio=0.5, finetune=DistillOptions(epochs=4, patience=4))
    lines: list[str] = []
    ctx = CompressionContext(
        PROFILE,
        as_samples(data.x_train[:600]),
        as_samples(data.x_test),
        tmp_path,
        labels=data.y_test,
        log=lines.append,
    )
    result = StructuredPrunePass(options).run(teacher, ctx)
    report = result.report
    assert report["params_after"] < 0.4 * report["params_before"]
    assert report["macs_after"] < 0.4 * report["macs_before"]
    assert report["bytes_after"] < 0.4 * report["bytes_before"]
    conv_weights = [numpy_helper.to_array(t) for t in prunable_weights(result.model).values()]
    assert sorted(w.shape[0] for w in conv_weights if w.ndim == 4) == [16, 32]
    outputs = stack_outputs(run_onnx(result.model, as_samples(data.x_test), PROFILE))[0]
    assert outputs.shape == (len(data.x_test), 10) and np.all(np.isfinite(outputs))
    assert report["fidelity"]["top1_agreement"] > 0.9
    assert any("distill epoch 1/4" in line for line in lines)
