"""Decisions the compressor takes from measured latency, tested with injected timings (never the machine's
speed): int8 compute is kept only when faster than weight-only, and a slower artifact is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.measure import Fidelity
from compressor.onnx_model import preprocess
from compressor.passes import quantize
from compressor.passes.base import CompressionContext
from compressor.passes.quantize import Candidate, Int8Quantization
from compressor.pipeline import SLOWER_TOLERANCE, _check_budgets
from edge_runtime.config.profiles import load_profile
from tests.test_int8 import _images, small_cnn

PROFILE = load_profile("x86-vnni-gateway")
REQUIRED = quantize.Int8Options().speedup_required


def _int8_with_ratios(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, int8_ratio: float) -> dict:
    """Run the int8 pass where weight-only times at 1.0x and any int8-compute candidate at `int8_ratio`."""

    def injected(self: quantize._Search, candidates: list[Candidate]) -> None:
        for candidate in candidates:  # the same ratio in each of the 5 interleaved timing runs
            candidate.latency_ratio = int8_ratio if candidate.int8_nodes else 1.0
            candidate.per_run = [candidate.latency_ratio] * 5
            self.record(candidate)

    monkeypatch.setattr(quantize._Search, "time", injected)
    prepared, _ = preprocess(small_cnn(opset=13), tmp_path)
    ctx = CompressionContext(PROFILE, _images(16, 3), _images(8, 4), tmp_path, log=lambda line: None)
    return Int8Quantization().run(prepared, ctx).report


@pytest.mark.parametrize("int8_ratio", [0.5, REQUIRED])
def test_int8_compute_is_kept_when_timed_faster_than_weight_only(tmp_path, monkeypatch, int8_ratio) -> None:
    report = _int8_with_ratios(tmp_path, monkeypatch, int8_ratio)
    assert report["chosen"].startswith("int8 compute"), report["decision"]
    assert report["int8_compute_nodes"] and report["latency_ratio"] == int8_ratio
    assert "faster than weight-only in each of 5 timing runs, within budget" in report["decision"]
    assert report["fidelity"]["cosine"] >= 0.99


@pytest.mark.parametrize("int8_ratio", [REQUIRED + 0.01, 1.0, 1.5])
def test_int8_compute_not_fast_enough_falls_back_to_weight_only(tmp_path, monkeypatch, int8_ratio) -> None:
    report = _int8_with_ratios(tmp_path, monkeypatch, int8_ratio)
    assert report["chosen"] == "weight-only int8"
    assert report["int8_compute_nodes"] == [] and report["latency_ratio"] == 1.0
    assert report["decision"].startswith("int8 compute was not clearly faster")
    assert len(report["candidates"]) >= 2, "the int8-compute candidates are still measured and reported"


FAITHFUL = Fidelity(cosine=1.0, max_abs_error=0.0, top1_agreement=1.0, accuracy=None)


def _budgets(artifact_format: str, latency_ms: float, latency_ratio: float) -> dict:
    report = {
        "format": artifact_format,
        "compressed": {
            "bytes": 1000,
            "latency_ms": latency_ms,
            "latency_ratio": latency_ratio,
            "latency_ratio_range": (latency_ratio, latency_ratio),  # slower in every run, or in none
        },
    }
    _check_budgets(report, FAITHFUL, PROFILE)
    return report["budgets"]


@pytest.mark.parametrize(
    ("artifact_format", "latency_ms", "latency_ratio", "failure"),
    [
        ("onnx", 1.0, 1.0, None),
        ("onnx", 1.0, SLOWER_TOLERANCE, None),
        ("onnx", 1.0, SLOWER_TOLERANCE + 0.01, "the original's latency (slower in every timing run"),
        ("tflite", 1.0, 3.0, None),  # another engine than the original: reported, not enforced
        ("onnx", PROFILE.budgets.latency_target_ms + 1, 1.0, "ms target"),
    ],
)
def test_budget_check_on_injected_latency(artifact_format, latency_ms, latency_ratio, failure) -> None:
    budgets = _budgets(artifact_format, latency_ms, latency_ratio)
    if failure is None:
        assert budgets == {"met": True, "failures": []}
    else:
        assert not budgets["met"] and len(budgets["failures"]) == 1
        assert failure in budgets["failures"][0]
