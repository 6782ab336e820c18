"""Recipe search and the TFLite artifact path, on a CNN teacher trained in-repo on scikit-learn's digits."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edge_runtime.cli import cli
from edge_runtime.config.profiles import load_profile, parse_profile

# Latency is measured but must not decide these outcomes: equal fixed timings (see conftest).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fixed_latency")]
PROFILES = Path(__file__).resolve().parent.parent / "device_profiles"


def _require(*modules: str) -> None:
    missing = [m for m in modules if __import__("importlib").util.find_spec(m) is None]
    if missing:
        message = f"needs {', '.join(missing)} (pip install -e '.[distill,tflite-export]')"
        if os.environ.get("EDGE_REQUIRE_EXTRAS") == "1":
            pytest.fail(message + "; EDGE_REQUIRE_EXTRAS=1 makes this a failure")
        pytest.skip(message)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the fp32 CNN teacher, its transfer set and labelled held-out data, and keys."""
    _require("torch", "torch_pruning", "onnx2torch")
    from compressor.teachers import digits_data, digits_teacher

    folder = tmp_path_factory.mktemp("digits")
    digits_teacher(folder / "teacher.onnx", epochs=20)
    data = digits_data()
    np.savez(folder / "train.npz", image=data.x_train.astype(np.float32))
    np.savez(folder / "test.npz", image=data.x_test.astype(np.float32), labels=data.y_test)
    assert CliRunner().invoke(cli, ["keygen", "-o", str(folder)]).exit_code == 0
    return folder


def _compress(folder: Path, *extra: str, profile: str = "x86-vnni-gateway", out: str = "out.edgebundle"):
    args = [
        "compress",
        str(folder / "teacher.onnx"),
        "--profile",
        profile,
        "--calibration",
        str(folder / "train.npz"),
        "--validation",
        str(folder / "test.npz"),
        "--key",
        str(folder / "signing.key"),
        "-o",
        str(folder / out),
        "--force",
        *extra,
    ]
    return CliRunner().invoke(cli, args)


def _search_profile(folder: Path, **budget: str) -> Path:
    """The x86 profile with a short, fixed search grid (and optionally other budgets)."""
    text = (PROFILES / "x86-vnni-gateway.toml").read_text()
    for key, value in budget.items():
        text = "\n".join(
            f"{key} = {value}" if line.startswith(f"{key} =") else line for line in text.splitlines()
        )
    text += "\n[compression]\nsearch = true\ndistill_widths = [0.5]\nprune_ratios = [0.5]\nsparsities = []\ndistill_epochs = 12\n"
    path = folder / f"search-{len(budget)}.toml"
    path.write_text(text)
    parse_profile(text, str(path))
    return path


def test_search_distills_prunes_and_quantizes_within_budget(digits: Path) -> None:
    result = _compress(digits, "--chart", str(digits / "search.png"), profile=str(_search_profile(digits)))
    assert result.exit_code == 0, result.output
    assert "recipe search" in result.output and "* distill w0.5" in result.output
    from edge_runtime.artifact.bundle import read_bundle

    report = read_bundle(digits / "out.edgebundle", None).manifest.report
    rows = report["search"]["candidates"]
    assert [row["recipe"] for row in rows] == [
        "int8",
        "distill w0.5 + int8",
        "distill w0.5 + prune 50% channels + int8",
    ]
    chosen = next(row for row in rows if row["chosen"])
    assert chosen["budgets_met"] and chosen["recipe"].startswith("distill")
    assert report["compressed"]["size_ratio"] >= 8
    assert (report["original"]["accuracy"] - report["compressed"]["fidelity"]["accuracy"]) * 100 <= 1.0
    teacher = onnx.load(str(digits / "teacher.onnx"))
    teacher_params = sum(int(np.prod(init.dims)) for init in teacher.graph.initializer)
    with zipfile.ZipFile(digits / "out.edgebundle") as archive:
        student = onnx.load_from_string(archive.read("model.onnx"))
    student_params = sum(int(np.prod(init.dims)) for init in student.graph.initializer)
    assert student_params < teacher_params / 3
    png = (digits / "search.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_search_that_no_candidate_meets_is_refused_with_numbers(digits: Path) -> None:
    (digits / "out.edgebundle").unlink(missing_ok=True)
    result = _compress(digits, profile=str(_search_profile(digits, max_model_bytes="2_000")))
    assert result.exit_code == 3
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: no candidate recipe meets profile")
    assert "over the 2000-byte budget" in line and "int8:" in line
    assert "Traceback" not in result.output
    assert not (digits / "out.edgebundle").exists()


def test_tflite_profile_gets_a_full_integer_tflite_bundle_that_the_runtime_self_tests(digits: Path) -> None:
    _require("tensorflow", "ai_edge_litert")
    result = _compress(digits, "--no-search", profile="raspberry-pi-zero-2w", out="pi.edgebundle")
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(digits / "pi.edgebundle") as archive:
        names = set(archive.namelist())
        tflite = archive.read("model.tflite")
    assert "model.tflite" in names and "model.onnx" not in names
    assert tflite[4:8] == b"TFL3"
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite)
    kinds = {detail["dtype"] for detail in interpreter.get_tensor_details()}
    assert np.int8 in kinds
    verified = CliRunner().invoke(
        cli, ["verify", str(digits / "pi.edgebundle"), "--key", str(digits / "signing.pub")]
    )
    assert verified.exit_code == 0, verified.output
    assert "self-test passed" in verified.output


def test_candidate_recipes_follow_the_profile() -> None:
    from compressor.recipe import candidate_recipes

    names = [r.name for r in candidate_recipes(load_profile("raspberry-pi-zero-2w"), distill=True)]
    assert names[0] == "tflite" and "distill w0.25 + prune 50% channels + tflite" in names
    plain = [r.passes for r in candidate_recipes(load_profile("x86-vnni-gateway"), distill=False)]
    assert plain == [("prepare", "int8"), ("prepare", "prune", "int8")]
