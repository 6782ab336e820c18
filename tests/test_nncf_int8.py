"""NNCF's post-training int8 as OpenVINO candidates (compressor/nncf_int8.py): built in each setting,
our sensitive nodes left float (no QuantizeLinear feeds them), loaded and judged through our OpenVINO
engine, and measured beside the other candidates in the engine choice's report rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor import outlier_channels
from compressor.engine_choice import _sensitive_nodes
from compressor.measure import fidelity, make_session, run_all
from compressor.nncf_int8 import OTHER_SETTINGS, nncf_int8
from compressor.openvino_target import OpenvinoSession
from compressor.passes.base import CompressionContext
from compressor.pipeline import compress
from compressor.tasks import TaskConfig, TaskKind, TaskSpec
from edge_runtime.config.profiles import load_profile
from tests.conftest import require_module
from tests.test_backends_contract import OPENVINO_EXTRA

NNCF_EXTRA = "the openvino-export extra: pip install nncf==3.4.0"
PROFILE = "x86-vnni-gateway"


def _mlp() -> onnx.ModelProto:
    """x[N, 64] -> MatMul W1 ("first") -> Relu -> MatMul W2 ("second") -> Add b -> y[N, 10]."""
    rng = np.random.default_rng(5)
    w1 = rng.normal(scale=0.2, size=(64, 48)).astype(np.float32)
    w2 = rng.normal(scale=0.2, size=(48, 10)).astype(np.float32)
    bias = rng.normal(size=(10,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="first"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "W2"], ["m"], name="second"), helper.make_node("Add", ["m", "b"], ["y"], name="add")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(bias, "b")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _data(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, 64)).astype(np.float32)} for _ in range(count)]


def _quantized_inputs(model: onnx.ModelProto, node_name: str) -> list[str]:
    """The inputs of `node_name` that come out of a DequantizeLinear fed by a QuantizeLinear or an
    int8 tensor: what NNCF writes for a node it quantizes."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    node = next(n for n in graph.node if n.name == node_name)
    quantized = []
    for name in node.input:
        source = producer.get(name)
        while source is not None and source.op_type in ("Cast", "Identity"):
            source = producer.get(source.input[0])
        if source is not None and source.op_type == "DequantizeLinear":
            quantized.append(name)
    return quantized


def test_nncf_int8_leaves_our_sensitive_node_float_and_runs_in_openvino(tmp_path: Path) -> None:
    require_module("openvino", OPENVINO_EXTRA)
    require_module("nncf", NNCF_EXTRA)
    model = _mlp()
    profile = load_profile(PROFILE)
    tasks = TaskConfig(specs={"y": TaskSpec(TaskKind.REGRESSION)})
    validation = _data(16, 2)
    ctx = CompressionContext(profile, _data(32, 1), validation, tmp_path, log=lambda _line: None, tasks=tasks)
    # the weight our int8 search kept float names the node that reads it: NNCF's ignored scope
    ignored = _sensitive_nodes(model, [{"weights_kept_float": ["W1"]}])
    assert ignored == ["first"]
    reference = run_all(make_session(model.SerializeToString(), profile), validation)
    options = {"inference_precision": "f32"}
    built = nncf_int8(model, ctx, ignored, reference, ["y"], options)
    expected = [f"NNCF int8 ({s.label}; 1 of 1 nodes int8, 1 float)" for s in OTHER_SETTINGS]
    assert [b.label for b in built] == expected
    for candidate in built:
        assert candidate.ignored == ("first",)
        graph = onnx.load_from_string(candidate.model_bytes)
        assert _quantized_inputs(graph, "first") == []  # honoured: x and W1 reach it in float
        assert len(_quantized_inputs(graph, "second")) == 2  # the other MatMul is int8 (both inputs)
        outputs = run_all(
            OpenvinoSession(candidate.model_bytes, {"inference_precision": "f32"}, profile), validation
        )
        assert fidelity(reference, outputs, names=["y"], tasks=tasks).cosine >= 0.99
    # without an ignored scope, NNCF quantizes the first MatMul too
    everything = nncf_int8(model, ctx, [], reference, ["y"], options)[0]
    assert everything.label == f"NNCF int8 ({OTHER_SETTINGS[0].label}; 2 of 2 nodes int8, 0 float)"
    assert len(_quantized_inputs(onnx.load_from_string(everything.model_bytes), "first")) == 2


def test_nncf_candidates_are_measured_and_reported_beside_the_others(tmp_path: Path) -> None:
    require_module("openvino", OPENVINO_EXTRA)
    require_module("nncf", NNCF_EXTRA)
    path = tmp_path / "mlp.onnx"
    onnx.save_model(_mlp(), str(path))
    result = compress(path, load_profile(PROFILE), _data(32, 1), validation=_data(32, 2),
                      report_samples=_data(16, 3), log=lambda _line: None, show_progress=False,
                      workdir=tmp_path)  # fmt: skip
    rows = result.report["engine_choice"]["candidates"]
    nncf_rows = [row for row in rows if row["label"].startswith("NNCF int8 (")]
    ov = require_module("openvino", OPENVINO_EXTRA)
    bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    hints = ["f32", "bf16"] if bf16 else ["f32"]
    # NNCF's ignored scope is the nodes reading the weights our int8 search kept float
    kept = _sensitive_nodes(_mlp(), result.report["passes"])
    assert [row["label"].rsplit(", ", 1)[1] for row in nncf_rows] == hints * len(OTHER_SETTINGS)
    for row, setting in zip(nncf_rows[:: len(hints)], OTHER_SETTINGS, strict=True):
        assert row["label"].startswith(f"NNCF int8 ({setting.label}; ")
        assert int(row["label"].split(" float)")[0].rsplit(" ", 1)[1]) >= len(kept)
    for row in nncf_rows:  # each loaded, judged by the task metric and timed like the others
        assert row["engine"] == "openvino" and row["engine_options"]["inference_precision"] in hints
        assert row["engine_options"]["static_shape"] == "x=1,64"
        assert row["latency_ratio"] > 0 and np.isfinite(row["latency_ratio"])
        assert isinstance(row["budgets_met"], bool) and row["budgets_met"] == (not row["failures"])
        assert row["bytes"] < path.stat().st_size  # int8 weights


def test_nncf_failure_is_a_logged_outcome(tmp_path: Path) -> None:
    """A graph NNCF cannot read gives no candidate and one log line, not an exception."""
    require_module("nncf", NNCF_EXTRA)
    model = _mlp()
    model.graph.node[0].input[1] = "missing"  # a weight that is not there
    lines: list[str] = []
    ctx = CompressionContext(load_profile(PROFILE), _data(4, 1), _data(4, 2), tmp_path, log=lines.append)
    assert nncf_int8(model, ctx, [], [], ["y"], {"inference_precision": "f32"}) == []
    assert lines and all(line.startswith("engine choice: NNCF (") for line in lines)  # the split, then NNCF


def test_nncf_node_openvino_shows_damaged_goes_back_to_float(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Feature 0 of x is ~500: with outlier channels left in int8, NNCF's one int8 scale for x rounds
    every other feature to 0, so the first MatMul's int8 is measured (through OpenVINO) to break the
    output and is left float."""
    require_module("openvino", OPENVINO_EXTRA)
    require_module("nncf", NNCF_EXTRA)
    from tests.test_engine_choice import _outlier_model

    monkeypatch.setattr(outlier_channels, "FACTOR", float("inf"))  # no channel is an outlier

    model_bytes, calibration, validation = _outlier_model()
    model = onnx.load_from_string(model_bytes)
    profile = load_profile(PROFILE)
    tasks = TaskConfig(specs={"y": TaskSpec(TaskKind.REGRESSION)})
    ctx = CompressionContext(profile, calibration, validation, tmp_path, log=lambda _line: None, tasks=tasks)
    reference = run_all(make_session(model_bytes, profile), validation)
    options = {"inference_precision": "f32"}
    built = nncf_int8(model, ctx, [], reference, ["y"], options)
    assert built and built[0].label == f"NNCF int8 ({OTHER_SETTINGS[0].label}; 1 of 2 nodes int8, 1 float)"
    assert built[0].ignored == ("first",)
    graph = onnx.load_from_string(built[0].model_bytes)
    assert _quantized_inputs(graph, "first") == [] and len(_quantized_inputs(graph, "second")) == 2
    outputs = run_all(OpenvinoSession(built[0].model_bytes, options, profile), validation)
    assert fidelity(reference, outputs, names=["y"], tasks=tasks).cosine >= 0.99


def test_nncf_with_the_outlier_channel_split_off_keeps_every_node_int8(tmp_path: Path) -> None:
    """The same model: feature 0 multiplied in float, NNCF's int8 range fits the other features, and
    both MatMuls run int8 through OpenVINO within the budgets."""
    require_module("openvino", OPENVINO_EXTRA)
    require_module("nncf", NNCF_EXTRA)
    from tests.test_engine_choice import _outlier_model

    model_bytes, calibration, validation = _outlier_model()
    profile = load_profile(PROFILE)
    tasks = TaskConfig(specs={"y": TaskSpec(TaskKind.REGRESSION)})
    lines: list[str] = []
    ctx = CompressionContext(profile, calibration, validation, tmp_path, log=lines.append, tasks=tasks)
    reference = run_all(make_session(model_bytes, profile), validation)
    options = {"inference_precision": "f32"}
    built = nncf_int8(onnx.load_from_string(model_bytes), ctx, [], reference, ["y"], options)
    label = f"NNCF int8 ({OTHER_SETTINGS[0].label}, outlier channels float in 1 MatMul; 3 of 3 nodes int8, 0 float)"
    assert built and built[0].label == label and built[0].ignored == ()
    assert "  NNCF int8: outlier channels float in 1 MatMul, channels in all: 1" in lines
    graph = onnx.load_from_string(built[0].model_bytes)
    assert len(_quantized_inputs(graph, "first")) == 2 and len(_quantized_inputs(graph, "second")) == 2
    outputs = run_all(OpenvinoSession(built[0].model_bytes, options, profile), validation)
    assert fidelity(reference, outputs, names=["y"], tasks=tasks).cosine >= 0.99
