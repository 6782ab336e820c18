"""Engine choice by measurement (issue 14): a profile listing ONNX Runtime and OpenVINO gets each
candidate measured through each installed engine; the preferred engine stays unless another is
faster in every timing run; the bundle records the chosen engine and its options, and is served."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from compressor.bundling import write_result_bundle
from compressor.engine_choice import MARGIN, EngineCandidate, _pick, installed_engines
from compressor.measure import Timing
from compressor.pipeline import compress
from edge_runtime.artifact.bundle import read_bundle
from edge_runtime.config.profiles import Engine, load_profile
from edge_runtime.engines import load_backend
from edge_runtime.engines.selftest import run_selftest
from tests.broker import broker_fixture, free_port, write_daemon_config  # noqa: F401 (fixture)
from tests.conftest import require_module
from tests.mlp_models import INPUT_NAME, OUTPUT_NAME, build_onnx_mlp, make_weights, reference_forward
from tests.test_backends_contract import OPENVINO_EXTRA
from tests.test_openvino_daemon import DEVICE, infer_http, infer_mqtt, install, serving

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = make_weights(64, 32, 10, seed=9)


def timing(per_run: list[list[float]]) -> Timing:
    return Timing(
        baseline_ms=1.0,
        median_ms=[float(np.median(r)) for r in per_run],
        ratios=[float(np.median(r)) for r in per_run],
        ranges=[(min(r), max(r)) for r in per_run],
        per_run=per_run,
    )


def test_preferred_engine_stays_unless_another_is_faster_in_every_run() -> None:
    candidates = [
        EngineCandidate(Engine.ONNXRUNTIME, "ours", b""),
        EngineCandidate(Engine.OPENVINO, "f32", b""),
    ]
    preferred = [1.0, 1.0, 1.0, 1.0, 1.0]
    noisy = [0.5, 0.5, 0.5, 0.5, 0.95]  # a faster median, but one run within the margin: noise
    assert _pick(candidates, timing([preferred, noisy]), [True, True]) == 0
    faster = [MARGIN - 0.05] * 5
    assert _pick(candidates, timing([preferred, faster]), [True, True]) == 1
    assert _pick(candidates, timing([preferred, faster]), [True, False]) == 0  # misses a budget
    three = [*candidates, EngineCandidate(Engine.OPENVINO, "nncf", b"")]
    assert _pick(three, timing([preferred, faster, [0.3] * 5]), [True, True, True]) == 2


def test_another_engine_may_not_pay_for_its_speed_with_more_bytes() -> None:
    """Twice the bytes needs at least twice the speed: size x latency no worse than the preferred's."""
    small = EngineCandidate(Engine.ONNXRUNTIME, "int8 weights", b"x" * 1000)
    large = EngineCandidate(Engine.OPENVINO, "fp16 weights", b"x" * 2000)
    preferred = [1.0] * 5
    assert _pick([small, large], timing([preferred, [0.8] * 5]), [True, True]) == 0  # 1.25x faster
    assert _pick([small, large], timing([preferred, [0.4] * 5]), [True, True]) == 1  # 2.5x faster


def test_only_installed_engines_that_load_the_format_are_candidates() -> None:
    profile = load_profile("x86-vnni-gateway")
    onnx_engines = installed_engines(profile, "onnx")
    assert onnx_engines[0] is Engine.ONNXRUNTIME
    assert installed_engines(profile, "tflite") == []  # neither listed engine loads a .tflite


def _data(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{INPUT_NAME: rng.normal(size=(1, 64)).astype(np.float32)} for _ in range(count)]


def _compress(tmp_path: Path) -> object:
    path = tmp_path / "mlp.onnx"
    path.write_bytes(build_onnx_mlp(WEIGHTS))
    return compress(path, load_profile("x86-vnni-gateway"), _data(32, 1), validation=_data(32, 2),
                    log=lambda _line: None, show_progress=False)  # fmt: skip


@pytest.mark.usefixtures("fixed_latency")
def test_equal_timings_keep_onnx_runtime_and_report_every_candidate(tmp_path: Path) -> None:
    require_module("openvino", OPENVINO_EXTRA)
    result = _compress(tmp_path)
    assert result.engine == "onnxruntime" and result.engine_options == {}
    choice = result.report["engine_choice"]
    rows = choice["candidates"]
    assert choice["engine"] == "onnxruntime" and [r.get("chosen", False) for r in rows] == [True] + [
        False
    ] * (len(rows) - 1)
    assert [(r["engine"], r["label"]) for r in rows][:2] == [
        ("onnxruntime", "our artifact"),
        ("openvino", "our artifact, f32"),
    ]
    assert all(r["latency_ratio"] == 1.0 for r in rows) and all(r["budgets_met"] for r in rows[:2])
    labels = [r["label"] for r in rows[2:] if "NNCF" not in r["label"]]  # NNCF's int8 when installed
    bf16 = "BF16" in require_module("openvino", OPENVINO_EXTRA).Core().get_property(
        "CPU", "OPTIMIZATION_CAPABILITIES"
    )
    assert labels[: int(bf16)] == ["our artifact, bf16"][: int(bf16)]
    # our own int8 for OpenVINO, its nodes chosen through OpenVINO, within the budgets
    int8 = [label for label in labels[int(bf16) :] if not label.startswith("our float graph for OpenVINO")]
    assert all(label.startswith("our int8 for OpenVINO, ") for label in int8)
    precisions = [label.rsplit(", ", 1)[1] for label in int8]
    assert precisions[-1:] == ["f32"] and set(precisions) <= {
        "bf16",
        "f32",
    }  # (bf16 int8 may miss the budgets)
    # the data had one shape: every OpenVINO candidate is compiled for it
    assert all(r["engine_options"]["static_shape"] == f"{INPUT_NAME}=1,64" for r in rows[1:])


def test_openvino_chosen_when_faster_in_every_run_then_served(
    tmp_path: Path, monkeypatch, broker, signing_keys
) -> None:
    require_module("openvino", OPENVINO_EXTRA)

    def openvino_faster(baseline, candidates, feed, **_):
        for candidate in candidates:  # each still runs: one that cannot run must fail
            candidate.run(None, dict(feed))
        per_run = [[1.0] * 5] + [[0.5] * 5 if i == 1 else [1.0] * 5 for i in range(1, len(candidates))]
        return timing(per_run)

    monkeypatch.setattr("compressor.measure.compare_latency", lambda s, f, **_: dict.fromkeys(s, 1.0))
    monkeypatch.setattr("compressor.engine_choice.timed_ratios", openvino_faster)
    result = _compress(tmp_path)
    options = {"inference_precision": "f32", "static_shape": f"{INPUT_NAME}=1,64"}
    assert result.engine == "openvino" and result.engine_options == options
    assert result.report["compressed"]["engine"] == "openvino" and result.report["budgets"]["met"]
    bundle_path = tmp_path / "mlp-ov.edgebundle"
    write_result_bundle(result, bundle_path, name="mlp-ov", version="1", profile=load_profile("x86-vnni-gateway"),
                        private_key=signing_keys.private_key)  # fmt: skip
    bundle = read_bundle(bundle_path, signing_keys.public_key)
    assert bundle.manifest.engine == "openvino"
    assert bundle.manifest.engine_options == options
    assert json.loads(bundle.manifest.to_json())["engine_options"] == options
    backend = load_backend(bundle.manifest, bundle.model_bytes, load_profile("x86-vnni-gateway"))
    assert run_selftest(backend.run, result.golden, result.golden_spec).passed
    assert [spec.shape for spec in backend.static_inputs] == [(1, 64)]  # compiled as the compressor measured

    store, port = tmp_path / "store", free_port()
    install(store, signing_keys.public_path, [bundle_path])
    config = write_daemon_config(tmp_path / "edge.toml", device_id=DEVICE, store=store,
                                 public_key=signing_keys.public_path, mqtt_port=broker.port, http_port=port)  # fmt: skip
    # a batch of 2 where the data had 1: the device compiles once more for it, and answers right
    x = np.random.default_rng(3).normal(size=(2, 64)).astype(np.float32)
    expected = reference_forward(WEIGHTS, x)
    with serving(config, tmp_path, str(ROOT)):
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.get_model_metadata("mlp-ov")["platform"] == "openvino"
        over_http = infer_http(port, "mlp-ov", x)
        over_mqtt = infer_mqtt(broker, "mlp-ov", x)
    for got in (over_http, over_mqtt):
        assert (got.argmax(-1) == expected.argmax(-1)).all()
        np.testing.assert_allclose(got, expected, atol=0.05)
    assert OUTPUT_NAME in result.report["compressed"]["fidelity"]["tasks"][0]["output"]


def _outlier_model() -> tuple[bytes, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """x -> MatMul W1 -> Relu -> MatMul W2, where feature 0 of x is ~500 but carries no weight: int8
    activations on the first MatMul (one scale for the whole tensor) round every other feature to 0,
    while the second MatMul's input quantizes well. Returns the model and two data splits."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    # weights of -1, 0 and 1: int8 storage holds them exactly, so only int8 compute can do damage
    w1 = rng.choice([-1.0, 0.0, 1.0], size=(64, 32)).astype(np.float32)
    w1[0] = 0.0
    w2 = rng.choice([-1.0, 0.0, 1.0], size=(32, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="first"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"], name="second")],
        "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9

    def split(count: int, seed: int) -> list[dict[str, np.ndarray]]:
        generator = np.random.default_rng(seed)
        feeds = []
        for _ in range(count):
            x = generator.normal(size=(1, 64)).astype(np.float32)
            x[0, 0] = 500.0
            feeds.append({"x": x})
        return feeds

    return model.SerializeToString(), split(16, 1), split(16, 2)


def test_openvino_int8_leaves_float_the_node_openvino_shows_to_be_damaged(tmp_path: Path) -> None:
    require_module("openvino", OPENVINO_EXTRA)
    import onnx

    from compressor.measure import fidelity, make_session, run_all
    from compressor.openvino_target import OpenvinoSession, openvino_int8
    from compressor.passes.base import CompressionContext

    model_bytes, calibration, validation = _outlier_model()
    profile = load_profile("x86-vnni-gateway")
    from compressor.tasks import TaskConfig, TaskKind, TaskSpec

    tasks = TaskConfig(specs={"y": TaskSpec(TaskKind.REGRESSION)})  # judged by cosine, budget 0.99
    ctx = CompressionContext(profile, calibration, validation, tmp_path, log=lambda _line: None, tasks=tasks)
    reference = run_all(make_session(model_bytes, profile), validation)
    options = {"inference_precision": "f32"}
    chosen = openvino_int8(onnx.load_from_string(model_bytes), ctx, reference, ["y"], [options])
    assert len(chosen) == 1
    int8_bytes, label, chosen_options = chosen[0]
    assert chosen_options == options
    assert label == "our int8 for OpenVINO, 1 of 2 nodes"
    graph = onnx.load_from_string(int8_bytes).graph
    dequantized = [node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"]
    # Int8 compute stayed on the second MatMul only: the first reads x itself, not a dequantized x
    matmul_inputs = [list(node.input) for node in graph.node if node.op_type == "MatMul"]
    assert "x" in matmul_inputs[0] and all(name in dequantized for name in matmul_inputs[1])
    outputs = run_all(OpenvinoSession(int8_bytes, options, profile), validation)
    assert fidelity(reference, outputs).cosine >= profile.budgets.min_output_cosine


def test_openvino_int8_stops_when_even_one_node_in_int8_misses(tmp_path: Path) -> None:
    """Three MatMuls all read the outlier feature, so int8 on any one of them misses the budget: the
    search tries all three, then the least damaging alone, and stops (no counts in between)."""
    require_module("openvino", OPENVINO_EXTRA)
    from onnx import TensorProto, helper, numpy_helper

    from compressor.measure import make_session, run_all
    from compressor.openvino_target import openvino_int8
    from compressor.passes.base import CompressionContext
    from compressor.tasks import TaskConfig, TaskKind, TaskSpec

    rng = np.random.default_rng(5)
    weights = []
    for index in range(3):
        w = rng.choice([-1.0, 0.0, 1.0], size=(64, 10)).astype(np.float32)
        w[0] = 0.0  # the ~500 feature carries no weight: it only stretches the int8 range
        weights.append(numpy_helper.from_array(w, f"W{index}"))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", f"W{i}"], [f"m{i}"], name=f"matmul{i}") for i in range(3)]
        + [helper.make_node("Sum", ["m0", "m1", "m2"], ["y"])],
        "three", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    _, calibration, validation = _outlier_model()  # x with feature 0 at 500
    profile = load_profile("x86-vnni-gateway")
    lines: list[str] = []
    tasks = TaskConfig(specs={"y": TaskSpec(TaskKind.REGRESSION)})
    ctx = CompressionContext(profile, calibration, validation, tmp_path, log=lines.append, tasks=tasks)
    reference = run_all(make_session(model.SerializeToString(), profile), validation)
    chosen = openvino_int8(model, ctx, reference, ["y"], [{"inference_precision": "f32"}])
    assert chosen == []
    trials = [line.split(" on ")[1].split(" nodes")[0] for line in lines if " nodes: cosine" in line]
    assert trials == ["3", "1"], lines
    assert all("misses the budget" in line for line in lines if " nodes: cosine" in line)
    assert lines[-1] == "engine choice: no OpenVINO int8 node set meets the budgets"


def test_one_data_shape_gives_a_static_shape_option_and_mixed_shapes_none() -> None:
    import onnx

    from compressor.openvino_target import fixed_input_shape

    model = onnx.load_from_string(build_onnx_mlp(WEIGHTS))
    assert fixed_input_shape(model, (_data(3, 1), _data(2, 2))) == f"{INPUT_NAME}=1,64"
    mixed = [*_data(2, 1), {INPUT_NAME: np.zeros((2, 64), np.float32)}]
    assert fixed_input_shape(model, (mixed,)) == ""
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # already static: nothing to fix
    assert fixed_input_shape(model, (_data(3, 1),)) == ""
