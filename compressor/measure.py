"""Measuring candidates: outputs, fidelity against the original model, and interleaved latency."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort

from edge_runtime.config.profiles import Budgets, DeviceProfile
from edge_runtime.core.errors import DataError, ModelError
from edge_runtime.engines.selftest import is_class_scores

__all__ = ["Fidelity", "compare_latency", "fidelity", "make_session", "meets_budgets", "run_all"]

Samples = Sequence[Mapping[str, np.ndarray]]


def make_session(
    model_bytes: bytes, profile: DeviceProfile, session_config: Mapping[str, str] | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session configured as the profile's device would load the model."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = profile.runtime.intra_op_threads or 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several unrelated exception types for unloadable graphs
        raise ModelError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from exc


def run_all(session: ort.InferenceSession, samples: Samples) -> list[list[np.ndarray]]:
    """Every output for every sample."""
    results = []
    for index, feed in enumerate(samples):
        try:
            results.append(session.run(None, dict(feed)))
        except Exception as exc:
            raise DataError(
                f"sample {index} does not run through the model: {str(exc).splitlines()[0]}"
            ) from exc
    return results


@dataclass(frozen=True)
class Fidelity:
    """How closely a candidate's outputs follow the reference model's."""

    cosine: float
    """Smallest (over outputs) mean per-sample cosine similarity."""
    max_abs_error: float
    top1_agreement: float | None
    """Share of arg-max decisions equal to the reference's (classifier-like outputs only)."""
    accuracy: float | None
    """Task accuracy of the candidate against labels (first classifier output), when labels are given."""
    regression_cosine: float | None = None
    """Smallest mean cosine over the outputs that are not class scores (maps, embeddings, boxes)."""

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready form."""
        return asdict(self)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denominator = np.linalg.norm(a64) * np.linalg.norm(b64)
    if denominator == 0:
        return 1.0 if np.array_equal(a64, b64) else 0.0
    return float(np.dot(a64, b64) / denominator)


def fidelity(
    reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]], labels: np.ndarray | None = None
) -> Fidelity:
    """Compare candidate outputs with reference outputs sample by sample."""
    cosines: list[float] = []
    regression: list[float] = []
    max_abs = 0.0
    agree = total = correct = 0
    for output_index in range(len(reference[0])):
        per_sample = []
        for ref_outputs, cand_outputs in zip(reference, candidate, strict=True):
            ref, cand = ref_outputs[output_index], cand_outputs[output_index]
            if ref.dtype.kind != "f":
                per_sample.append(1.0 if np.array_equal(ref, cand) else 0.0)
                continue
            per_sample.append(_cosine(ref, cand))
            max_abs = max(max_abs, float(np.max(np.abs(ref.astype(np.float64) - cand))) if ref.size else 0.0)
            if is_class_scores(ref):
                agree += int(np.sum(ref.argmax(-1) == cand.argmax(-1)))
                total += int(np.prod(ref.shape[:-1]))
        cosines.append(float(np.mean(per_sample)))
        if not is_class_scores(reference[0][output_index]):
            regression.append(cosines[-1])
    accuracy = None
    if labels is not None:
        predictions = np.concatenate([_first_classifier(outputs).argmax(-1).ravel() for outputs in candidate])
        correct = int(np.sum(predictions[: len(labels)] == np.asarray(labels).ravel()[: len(predictions)]))
        accuracy = correct / max(len(labels), 1)
    return Fidelity(
        cosine=min(cosines) if cosines else 1.0,
        max_abs_error=max_abs,
        top1_agreement=agree / total if total else None,
        accuracy=accuracy,
        regression_cosine=min(regression) if regression else None,
    )


def _first_classifier(outputs: list[np.ndarray]) -> np.ndarray:
    for output in outputs:
        if is_class_scores(output):
            return output
    raise DataError("labels were given but the model has no classifier-like output ([N, classes])")


def compare_latency(
    sessions: Mapping[str, ort.InferenceSession],
    feed: Mapping[str, np.ndarray],
    *,
    rounds: int = 30,
    min_seconds: float = 0.5,
) -> dict[str, float]:
    """Median latency in ms of each session, timed interleaved (round-robin) so they share the noise."""
    timings: dict[str, list[float]] = {name: [] for name in sessions}
    feed = dict(feed)
    for session in sessions.values():  # warm-up
        session.run(None, feed)
    started = time.perf_counter()
    done = 0
    while done < rounds or (time.perf_counter() - started < min_seconds and done < rounds * 20):
        for name, session in sessions.items():
            begin = time.perf_counter()
            session.run(None, feed)
            timings[name].append(time.perf_counter() - begin)
        done += 1
    return {name: float(np.median(values) * 1e3) for name, values in timings.items()}


def meets_budgets(result: Fidelity, reference: Fidelity, budgets: Budgets) -> tuple[bool, str]:
    """Whether a candidate's fidelity fits the profile's accuracy budgets, and if not, why."""
    if result.accuracy is not None and reference.accuracy is not None:
        drop = (reference.accuracy - result.accuracy) * 100
        if drop > budgets.max_accuracy_drop_pp:
            return False, f"accuracy drops {drop:.2f} pp (budget {budgets.max_accuracy_drop_pp} pp)"
    elif result.top1_agreement is not None:
        drop = (1 - result.top1_agreement) * 100
        if drop > budgets.max_accuracy_drop_pp:
            return (
                False,
                f"top-1 agreement {result.top1_agreement:.2%} (budget: at most {budgets.max_accuracy_drop_pp} pp off)",
            )
    # Class scores are judged by accuracy / agreement above; cosine judges the other outputs.
    cosine = result.regression_cosine
    if cosine is not None and cosine < budgets.min_output_cosine:
        return False, f"output cosine {cosine:.4f} below {budgets.min_output_cosine}"
    return True, ""
