"""Knowledge distillation from an ONNX teacher (the digits CNN trained in-repo) into torch students."""

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
from compressor.passes.distill import DistillOptions, DistillPass
from edge_runtime.config.profiles import load_profile
from edge_runtime.core.errors import CompressionError, DataError

PROFILE = load_profile("x86-vnni-gateway")

for _module in ("torch", "torch_pruning", "onnx2torch"):
    if importlib.util.find_spec(_module) is None:
        _message = f"{_module} is not installed (distill extra)"
        if os.environ.get("EDGE_REQUIRE_EXTRAS") == "1":
            pytest.fail(_message + "; EDGE_REQUIRE_EXTRAS=1 makes this a failure", pytrace=False)
        pytest.skip(_message, allow_module_level=True)

from compressor.teachers import as_samples, build_digits_cnn, digits_data, digits_teacher  # noqa: E402


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, Any]:
    """The digits CNN teacher (cached for the session) and its data."""
    cache = tmp_path_factory.getbasetemp() / "digits_cnn_seed0_e12.onnx"
    return digits_teacher(cache, epochs=12), digits_data()


def make_context(
    tmp_path: Path, data: Any, lines: list[str] | None = None, transfer: int = 600
) -> CompressionContext:
    """Transfer set: the first `transfer` training images; validation: the held-out test split."""
    log = lines.append if lines is not None else (lambda line: None)
    return CompressionContext(
        PROFILE,
        as_samples(data.x_train[:transfer]),
        as_samples(data.x_test),
        tmp_path,
        labels=data.y_test,
        seed=3,
        log=log,
    )


def agreement(teacher: onnx.ModelProto, student: onnx.ModelProto, data: Any) -> float:
    """Top-1 agreement of two ONNX models on the held-out digits."""
    feeds = as_samples(data.x_test)
    a = stack_outputs(run_onnx(teacher, feeds, PROFILE))[0]
    b = stack_outputs(run_onnx(student, feeds, PROFILE))[0]
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def test_short_distillation_improves_a_user_student(tmp_path: Path, digits: tuple) -> None:
    import torch

    from compressor.torch_bridge import export_onnx

    teacher, data = digits
    torch.manual_seed(0)
    student = build_digits_cnn(width=0.25)
    untrained = export_onnx(student, [torch.from_numpy(data.x_test[:1])], ["image"], ["logits"])
    snapshot = {k: v.clone() for k, v in student.state_dict().items()}
    lines: list[str] = []
    options = DistillOptions(student=student, epochs=15, patience=15, transfer_labels=data.y_train[:600])
    result = DistillPass(options).run(teacher, make_context(tmp_path, data, lines))
    report = result.report
    assert report["holdout_fidelity"] > report["holdout_fidelity_start"] + 0.4
    before, after = agreement(teacher, untrained, data), agreement(teacher, result.model, data)
    assert after > 0.9 and after > before + 0.4
    assert report["fidelity"]["top1_agreement"] == pytest.approx(after)
    assert report["params_after"] < report["params_before"] / 10
    assert sum(1 for line in lines if line.startswith("distill epoch")) == report["epochs_run"]
    assert [i.name for i in result.model.graph.input] == ["image"]
    assert all(torch.equal(v, snapshot[k]) for k, v in student.state_dict().items()), (
        "student trained in place"
    )


def test_derived_student_is_reproducible_with_a_seed(tmp_path: Path, digits: tuple) -> None:
    teacher, data = digits
    original = teacher.SerializeToString()
    options = DistillOptions(width=0.5, epochs=2, patience=2)
    first = DistillPass(options).run(teacher, make_context(tmp_path, data, transfer=300))
    second = DistillPass(options).run(teacher, make_context(tmp_path, data, transfer=300))
    assert teacher.SerializeToString() == original, "the teacher was mutated"
    weights = [{i.name: numpy_helper.to_array(i) for i in r.model.graph.initializer} for r in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert first.report["student"].startswith("derived from teacher (width 0.5")
    assert first.report["params_after"] < 0.35 * first.report["params_before"]
    assert first.report["fidelity"]["top1_agreement"] > 0.85


def lstm_teacher() -> onnx.ModelProto:
    """A tiny sequence model whose LSTM onnx2torch cannot convert."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (1, 16, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(0, 0.3, (1, 16, 4)).astype(np.float32), "R"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 2)).astype(np.float32), "head"),
    ]
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R"], ["", "h"], hidden_size=4),
        helper.make_node("Squeeze", ["h", "axes"], ["hs"]),
        helper.make_node("MatMul", ["hs", "head"], ["y"]),
    ]
    inits.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "axes"))
    graph = helper.make_graph(
        nodes,
        "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_teacher_with_unconvertible_op_names_it(tmp_path: Path) -> None:
    teacher = lstm_teacher()
    feeds = [{"x": np.random.default_rng(i).random((5, 1, 3), dtype=np.float32)} for i in range(8)]
    ctx = CompressionContext(PROFILE, feeds, feeds[:2], tmp_path, log=lambda line: None)
    assert not DistillPass().supports(teacher)
    with pytest.raises(CompressionError, match=r"op\(s\) LSTM .*user-supplied student"):
        DistillPass().run(teacher, ctx)


def test_mismatched_transfer_labels_are_refused(tmp_path: Path, digits: tuple) -> None:
    teacher, data = digits
    options = DistillOptions(epochs=1, transfer_labels=data.y_train[:10])
    with pytest.raises(DataError, match="10 transfer labels for 300 transfer samples"):
        DistillPass(options).run(teacher, make_context(tmp_path, data, transfer=300))
