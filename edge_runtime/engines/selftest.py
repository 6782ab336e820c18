"""On-device self-test: run a bundle's golden inputs and compare with the expected outputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from edge_runtime.artifact.golden import GoldenCase
from edge_runtime.artifact.manifest import GoldenSpec

__all__ = ["SelfTestResult", "is_class_scores", "run_selftest"]

Predict = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class SelfTestResult:
    """Outcome of a self-test: passed, and if not, the first reason."""

    passed: bool
    cases: int
    reason: str = ""


def is_class_scores(output: np.ndarray) -> bool:
    """Rank-2/3 float outputs whose last axis holds class scores (judged by arg-max agreement)."""
    return output.dtype.kind == "f" and output.ndim in (2, 3) and output.shape[-1] > 1


def run_selftest(predict: Predict, cases: list[GoldenCase], spec: GoldenSpec) -> SelfTestResult:
    """Run every golden case through `predict` and compare with tolerances from `spec`."""
    agree = total = 0
    for index, case in enumerate(cases):
        try:
            produced = predict(case.inputs)
        except Exception as exc:  # the self-test reports any failure to run as a failed test
            return SelfTestResult(False, len(cases), f"case {index}: inference failed: {exc}")
        for name, expected in case.outputs.items():
            if name not in produced:
                return SelfTestResult(False, len(cases), f"case {index}: output '{name}' missing")
            actual = np.asarray(produced[name])
            if actual.shape != expected.shape:
                return SelfTestResult(
                    False,
                    len(cases),
                    f"case {index}: output '{name}' has shape {actual.shape}, expected {expected.shape}",
                )
            if is_class_scores(expected):
                agree += int(np.sum(actual.argmax(-1) == expected.argmax(-1)))
                total += int(np.prod(expected.shape[:-1]))
            if not np.allclose(actual, expected, rtol=spec.rtol, atol=spec.atol, equal_nan=True):
                worst = float(np.max(np.abs(actual.astype(np.float64) - expected)))
                return SelfTestResult(
                    False,
                    len(cases),
                    f"case {index}: output '{name}' differs by up to {worst:.4g} "
                    f"(tolerance atol={spec.atol:.4g}, rtol={spec.rtol:.4g})",
                )
    if total and agree / total < spec.min_top1_agreement:
        return SelfTestResult(
            False, len(cases), f"top-1 agreement {agree / total:.3f} below {spec.min_top1_agreement:.3f}"
        )
    return SelfTestResult(True, len(cases))
