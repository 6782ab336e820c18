"""`edgectl compress` fails early and readably, keeps library logs off the terminal, cleans up on
SIGTERM, and says why a search dropped each candidate (issue 10, item 10)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from compressor.progress import Progress
from edge_runtime.cli import cli
from tests.test_int8 import small_cnn

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "edge_runtime" / "config" / "device_profiles" / "x86-vnni-gateway.toml"


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A model, calibration data and a signing key in a fresh folder."""
    onnx.save_model(small_cnn(opset=11), str(tmp_path / "cnn.onnx"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", image=rng.normal(size=(12, 3, 16, 16)).astype(np.float32))
    assert CliRunner().invoke(cli, ["keygen", "-o", str(tmp_path)]).exit_code == 0
    return tmp_path


def _args(ws: Path, *extra: str, output: Path | None = None, calib: str = "calib.npz") -> list[str]:
    return [
        "compress",
        str(ws / "cnn.onnx"),
        "--profile",
        "x86-vnni-gateway",
        "--calibration",
        str(ws / calib),
        "--key",
        str(ws / "signing.key"),
        "-o",
        str(output or ws / "out.edgebundle"),
        *extra,
    ]


def _one_error_line(output: str, message: str) -> str:
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert message in errors[0], errors[0]
    return errors[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _temp_leftovers(tmp: Path) -> list[str]:
    """Folders or sizeable files left in TMPDIR (a library writes a 51-byte session id file there
    when imported; that is not ours to clean)."""
    return sorted(p.name for p in tmp.iterdir() if p.is_dir() or p.stat().st_size > 4096)


def test_output_that_is_a_folder_is_refused_before_any_work(ws: Path) -> None:
    (ws / "bundles").mkdir()
    result = CliRunner().invoke(cli, _args(ws, output=ws / "bundles"))
    assert result.exit_code == 2
    _one_error_line(result.output, "is a folder")
    assert "pass prepare" not in result.output  # nothing was compressed
    assert _leftovers(ws / "bundles") == []


def test_unwritable_output_folder_is_refused_before_any_work(ws: Path) -> None:
    # /proc refuses new files even to root, where a chmod'ed folder would not.
    result = CliRunner().invoke(cli, _args(ws, output=Path("/proc/out.edgebundle")))
    assert result.exit_code == 2
    _one_error_line(result.output, "cannot write to /proc")
    assert "pass prepare" not in result.output


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_calibration_data_is_refused_with_the_input_name(ws: Path, bad: float) -> None:
    images = np.random.default_rng(1).normal(size=(8, 3, 16, 16)).astype(np.float32)
    images[5, 1, 2, 3] = bad
    np.savez(ws / "bad.npz", image=images)
    result = CliRunner().invoke(cli, _args(ws, calib="bad.npz"))
    assert result.exit_code == 1
    _one_error_line(result.output, "sample 5 input 'image' holds 1 NaN or infinite value(s)")
    assert "pass prepare" not in result.output
    assert not (ws / "out.edgebundle").exists()


def test_distill_without_torch_names_the_missing_extra(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a host without the [distill] extra
    result = CliRunner().invoke(cli, _args(ws, "--recipe", "prepare,distill,int8"))
    assert result.exit_code == 2
    line = _one_error_line(result.output, "pass 'distill' needs torch, which is not installed")
    assert "edge-runtime[distill]" in line
    assert "nothing to do" not in result.output
    unknown = CliRunner().invoke(cli, _args(ws, "--recipe", "prepare,quantise"))
    assert unknown.exit_code == 2
    _one_error_line(unknown.output, "unknown compression pass 'quantise'")


def test_search_says_why_each_candidate_was_dropped(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    text = PROFILE.read_text().replace("max_model_bytes = 64_000_000", "max_model_bytes = 1_000")
    (ws / "tiny.toml").write_text(text + "\n[compression]\nsearch = true\nsparsities = [0.5]\n")
    args = _args(ws)
    args[args.index("x86-vnni-gateway")] = str(ws / "tiny.toml")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 3
    dropped = [line for line in result.output.splitlines() if line.strip().startswith("dropped ")]
    assert [line.split(":")[0].strip() for line in dropped] == ["dropped int8", "dropped prune 50% + int8"]
    assert all("over the 1000-byte budget" in line for line in dropped)
    assert "no distilled candidates: they need torch_pruning" in result.output
    assert "[2/2] recipe: prune 50% + int8" in result.output


def _subprocess_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp))
    env.pop("CI", None)
    return env


def test_library_logs_go_to_a_debug_log_not_the_terminal(ws: Path) -> None:
    model = onnx.load(str(ws / "cnn.onnx"))  # an unused initializer makes ORT warn in colour
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "unused_weight"))
    onnx.save_model(model, str(ws / "cnn.onnx"))
    tmp = ws / "tmp"
    tmp.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", *_args(ws)],
        env=_subprocess_env(tmp),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "onnxruntime" not in done.stderr and "\x1b[" not in done.stderr, done.stderr
    assert "Removing initializer 'unused_weight'" in (ws / "out.edgebundle.log").read_text()
    assert f"library messages (ONNX Runtime, TensorFlow) are in {ws / 'out.edgebundle.log'}" in done.stderr
    assert "[2/2] pass int8 (elapsed" in done.stderr
    assert "budgets: met" in done.stdout
    assert _temp_leftovers(tmp) == []


def test_sigterm_removes_the_temporary_folder(ws: Path) -> None:
    tmp = ws / "tmp"
    tmp.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", *_args(ws, "--search")],
        env=_subprocess_env(tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(p.is_dir() and any(p.iterdir()) for p in tmp.iterdir()):
            assert process.poll() is None and time.monotonic() < deadline, "compression never started"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    _one_error_line(stderr, "stopped by SIGTERM; temporary files removed")
    assert _temp_leftovers(tmp) == []
    assert not (ws / "out.edgebundle").exists()


def test_progress_estimates_the_time_left_from_the_steps_done() -> None:
    lines: list[str] = []
    now = iter([0.0, 0.0, 30.0, 90.0])
    progress = Progress(4, lines.append, clock=lambda: next(now))
    for label in ("a", "b", "c"):
        progress.step(label)
    assert lines == [
        "[1/4] a (elapsed 0:00)",
        "[2/4] b (elapsed 0:30, about 1:30 left)",
        "[3/4] c (elapsed 1:30, about 1:30 left)",
    ]
