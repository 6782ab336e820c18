"""Calibration data as users have it (issue 13, item 6): one batched feed split along the model's
named batch dimension wherever it sits, an input given once shared by every sample, and a stateful
model calibrated with the states it produces itself."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from compressor.data import batch_axes, carry_states, load_dataset
from compressor.measure import make_session
from compressor.onnx_model import tensor_specs
from edge_runtime.cli import cli
from edge_runtime.config.profiles import load_profile
from edge_runtime.core.errors import DataError
from edge_runtime.core.types import TensorSpec

VAD_INPUTS = (
    TensorSpec("input", "float32", ("batch", 576)),
    TensorSpec("state", "float32", (2, "batch", 128)),
    TensorSpec("sr", "int64", ()),
)


def test_batch_axis_is_where_the_shared_dimension_sits() -> None:
    assert batch_axes(VAD_INPUTS) == {"input": 0, "state": 1, "sr": None}
    two = (
        TensorSpec("ids", "int64", ("batch", "sequence")),
        TensorSpec("mask", "int64", ("batch", "sequence")),
    )
    assert batch_axes(two) == {"ids": 0, "mask": 0}  # a tie goes to the name that says batch
    assert batch_axes((TensorSpec("x", "float32", (1, 64)),)) == {"x": 0}


def test_one_batched_feed_with_a_mid_axis_state_and_a_scalar_given_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    audio = rng.normal(size=(8, 576)).astype(np.float32)
    state = rng.normal(size=(2, 8, 128)).astype(np.float32)
    np.savez(tmp_path / "vad.npz", input=audio, state=state, sr=np.array(16000))
    data = load_dataset(tmp_path / "vad.npz", VAD_INPUTS)
    assert len(data.samples) == 8
    sample = data.samples[5]
    assert (
        sample["input"].shape == (1, 576)
        and sample["state"].shape == (2, 1, 128)
        and sample["sr"].shape == ()
    )
    np.testing.assert_array_equal(sample["state"][:, 0], state[:, 5])
    np.testing.assert_array_equal(sample["input"][0], audio[5])
    assert all(int(s["sr"]) == 16000 for s in data.samples)
    assert "'sr' given once: shared by all 8 samples" in data.notes


def test_inputs_that_disagree_on_the_sample_count_are_named(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "bad.npz",
        input=np.zeros((8, 576), np.float32),
        state=np.zeros((2, 5, 128), np.float32),
        sr=np.array(16000),
    )
    with pytest.raises(
        DataError, match=re.escape("'input' 8, 'state' 5, 'sr' 8; split along 'input' axis 0, 'state' axis 1")
    ):
        load_dataset(tmp_path / "bad.npz", VAD_INPUTS)


def stateful_model(width: int = 16) -> onnx.ModelProto:
    """x [batch, 64], state [2, batch, width], sr scalar -> speech [batch, 1], stateN [2, batch, width]."""
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (64, width)).astype(np.float32), "w_in"),
        numpy_helper.from_array(rng.normal(0, 0.3, (width, width)).astype(np.float32), "w_state"),
        numpy_helper.from_array(rng.normal(0, 0.3, (width, 1)).astype(np.float32), "w_out"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array(1e-9, np.float32), "tiny"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w_in"], ["h"], name="in"),
        helper.make_node("ReduceMean", ["state"], ["s"], axes=[0], keepdims=0),
        helper.make_node("MatMul", ["s", "w_state"], ["hs"], name="recur"),
        helper.make_node("Add", ["h", "hs"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["new"]),
        helper.make_node("Unsqueeze", ["new", "axis0"], ["new1"]),
        helper.make_node("Concat", ["new1", "new1"], ["stateN"], axis=0),
        helper.make_node("MatMul", ["new", "w_out"], ["logit"], name="out"),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["srf", "tiny"], ["bias"]),
        helper.make_node("Add", ["logit", "bias"], ["logit2"]),
        helper.make_node("Sigmoid", ["logit2"], ["speech"]),
    ]
    graph = helper.make_graph(
        nodes,
        "stateful",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", width]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("speech", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", width]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def _stream(path: Path, count: int) -> None:
    rng = np.random.default_rng(4)
    np.savez(
        path,
        input=rng.normal(size=(count, 64)).astype(np.float32),
        state=np.zeros((2, count, 16), np.float32),
        sr=np.array(16000),
    )


def test_states_are_carried_from_the_models_own_outputs(tmp_path: Path) -> None:
    model = stateful_model()
    _stream(tmp_path / "stream.npz", 6)
    inputs = tensor_specs(list(model.graph.input))
    data = load_dataset(tmp_path / "stream.npz", inputs)
    session = make_session(model.SerializeToString(), load_profile("x86-vnni-gateway"))
    run = lambda feed: dict(zip(["speech", "stateN"], session.run(None, feed), strict=True))  # noqa: E731
    carried = carry_states(data.samples, run, {"state": "stateN"})
    assert not np.any(carried[0]["state"])  # the first sample keeps the state it was given
    for before, after in itertools.pairwise(carried):
        np.testing.assert_array_equal(after["state"], run(before)["stateN"])
    assert np.any(carried[3]["state"]) and not np.any(data.samples[3]["state"])  # input left alone


def test_cli_calibrates_a_stateful_model_with_its_own_states(tmp_path: Path) -> None:
    onnx.save_model(stateful_model(), str(tmp_path / "vad.onnx"))
    _stream(tmp_path / "stream.npz", 48)
    assert CliRunner().invoke(cli, ["keygen", "-o", str(tmp_path)]).exit_code == 0
    args = [
        "compress",
        str(tmp_path / "vad.onnx"),
        "--profile",
        "x86-vnni-gateway",
        "--calibration",
        str(tmp_path / "stream.npz"),
        "--key",
        str(tmp_path / "signing.key"),
        "-o",
        str(tmp_path / "vad.edgebundle"),
    ]
    result = CliRunner().invoke(cli, [*args, "--state-from", "state=stateN"])
    assert result.exit_code == 0, result.output
    assert "note: 'sr' given once: shared by all 48 samples" in result.output
    assert "note: states state carried from the model's own outputs over 48 samples" in result.output
    assert "speech  decision (guessed)" in result.output
    wrong = CliRunner().invoke(cli, [*args, "--force", "--state-from", "state=hidden"])
    assert wrong.exit_code == 2 and "--state-from state=hidden: the model has inputs" in wrong.output
