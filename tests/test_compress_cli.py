"""`edgectl compress` on bad input: one readable line, non-zero exit, no traceback, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edge_runtime.cli import cli
from tests.test_int8 import small_cnn

# Latency is measured but must not decide these outcomes: equal fixed timings (see conftest).
pytestmark = pytest.mark.usefixtures("fixed_latency")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A model, matching calibration data and a key in a fresh folder."""
    onnx.save_model(small_cnn(opset=11), str(tmp_path / "cnn.onnx"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", image=rng.normal(size=(12, 3, 16, 16)).astype(np.float32))
    assert CliRunner().invoke(cli, ["keygen", "-o", str(tmp_path)]).exit_code == 0
    return tmp_path


def _compress(
    ws: Path,
    *extra: str,
    model: str = "cnn.onnx",
    calib: str = "calib.npz",
    profile: str = "x86-vnni-gateway",
):
    args = [
        "compress",
        str(ws / model),
        "--profile",
        profile,
        "--calibration",
        str(ws / calib),
        "--key",
        str(ws / "signing.key"),
        "-o",
        str(ws / "out.edgebundle"),
        *extra,
    ]
    return CliRunner().invoke(cli, args)


def _assert_clean_failure(result, ws: Path, message: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert message in lines[0], lines[0]
    assert not (ws / "out.edgebundle").exists()
    assert not [p for p in ws.iterdir() if p.name.startswith(".out.edgebundle")]


def test_good_input_writes_a_bundle(workspace: Path) -> None:
    result = _compress(workspace)
    assert result.exit_code == 0, result.output
    assert (workspace / "out.edgebundle").stat().st_size > 1000
    assert "budgets: met" in result.output


def test_non_onnx_file(workspace: Path) -> None:
    (workspace / "notes.onnx").write_text("this is a text file, not a model\n" * 20)
    _assert_clean_failure(_compress(workspace, model="notes.onnx"), workspace, "not an ONNX model")


def test_truncated_model(workspace: Path) -> None:
    data = (workspace / "cnn.onnx").read_bytes()
    (workspace / "cut.onnx").write_bytes(data[: len(data) // 2])
    _assert_clean_failure(_compress(workspace, model="cut.onnx"), workspace, "cut.onnx")


def test_calibration_names_and_shapes_must_match(workspace: Path) -> None:
    np.savez(workspace / "wrong_name.npz", pixels=np.zeros((4, 3, 16, 16), np.float32))
    _assert_clean_failure(
        _compress(workspace, calib="wrong_name.npz"), workspace, "'pixels' is not an input of the model"
    )
    np.savez(workspace / "wrong_shape.npz", image=np.zeros((4, 3, 8, 16), np.float32))
    _assert_clean_failure(_compress(workspace, calib="wrong_shape.npz"), workspace, "has shape [1, 3, 8, 16]")
    np.savez(workspace / "wrong_dtype.npz", image=np.zeros((4, 3, 16, 16), np.int8))
    _assert_clean_failure(
        _compress(workspace, calib="wrong_dtype.npz"), workspace, "is int8, the model takes float32"
    )
    _assert_clean_failure(_compress(workspace, calib="missing.npz"), workspace, "no such file")


def test_unknown_profile(workspace: Path) -> None:
    _assert_clean_failure(_compress(workspace, profile="pi-9"), workspace, "unknown device profile 'pi-9'")


def test_existing_output_needs_force(workspace: Path) -> None:
    (workspace / "out.edgebundle").write_bytes(b"keep me")
    result = _compress(workspace)
    assert result.exit_code == 2 and "already exists (use --force" in result.output
    assert (workspace / "out.edgebundle").read_bytes() == b"keep me"
    forced = _compress(workspace, "--force")
    assert forced.exit_code == 0, forced.output
    assert (workspace / "out.edgebundle").read_bytes() != b"keep me"


def test_budget_miss_is_refused_with_numbers(workspace: Path) -> None:
    profile = (
        Path(__file__).resolve().parent.parent / "device_profiles" / "x86-vnni-gateway.toml"
    ).read_text()
    (workspace / "tiny.toml").write_text(
        profile.replace("max_model_bytes = 64_000_000", "max_model_bytes = 1_000")
    )
    result = _compress(workspace, profile=str(workspace / "tiny.toml"))
    assert result.exit_code == 3
    _assert_clean_failure(result, workspace, "over the 1000-byte budget")
