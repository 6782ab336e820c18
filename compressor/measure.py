"""Measuring candidates: outputs, fidelity against the original model, and interleaved latency."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from compressor.dense_head import find_dense_heads, score_dense_head
from compressor.tasks import (
    COSINE_TASKS,
    CustomMetric,
    TaskConfig,
    TaskKind,
    TaskScore,
    TaskSpec,
    guess_task,
    score_output,
)
from edge_runtime.config.profiles import Budgets, DeviceProfile
from edge_runtime.core.errors import DataError, ModelError, UsageError

__all__ = [
    "Fidelity",
    "budget_failures",
    "compare_latency",
    "fidelity",
    "make_session",
    "meets_budgets",
    "run_all",
    "timed_ratios",
]

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
    """How closely a candidate's outputs follow the reference model's, by task and overall."""

    cosine: float
    """Smallest (over outputs) mean per-sample cosine similarity of the raw outputs."""
    max_abs_error: float
    top1_agreement: float | None
    """Smallest share of arg-max decisions equal to the reference's, over class-score outputs."""
    accuracy: float | None
    """Task accuracy of the candidate against labels (first class-score output), when labels are given."""
    regression_cosine: float | None = None
    """Smallest task cosine over embedding and regression outputs."""
    tasks: tuple[TaskScore, ...] = ()
    """The score of every output on its task metric (plus the user's metric): what budgets judge."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = {name: getattr(self, name) for name in _SCALARS}
        data["tasks"] = [score.to_dict() for score in self.tasks]
        return data


_SCALARS = ("cosine", "max_abs_error", "top1_agreement", "accuracy", "regression_cosine")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denominator = np.linalg.norm(a64) * np.linalg.norm(b64)
    if denominator == 0:
        return 1.0 if np.array_equal(a64, b64) else 0.0
    return float(np.dot(a64, b64) / denominator)


def fidelity(
    reference: list[list[np.ndarray]],
    candidate: list[list[np.ndarray]],
    labels: np.ndarray | None = None,
    *,
    names: Sequence[str] | None = None,
    tasks: TaskConfig | None = None,
) -> Fidelity:
    """Compare candidate outputs with reference outputs sample by sample, each output by its task."""
    tasks = tasks or TaskConfig()
    count = len(reference[0]) if reference else 0
    names = list(names) if names is not None else [f"output{i}" for i in range(count)]
    scores, grouped = _dense_head_scores(names, reference, candidate, tasks)
    cosines: list[float] = []
    for index, name in enumerate(names):
        ref = [outputs[index] for outputs in reference]
        cand = [outputs[index] for outputs in candidate]
        spec = tasks.specs.get(name)
        if index not in grouped:
            scores.append(
                score_output(
                    name, ref, cand, spec or TaskSpec(guess_task(name, ref[0])), guessed=spec is None
                )
            )
        per_sample = [
            _cosine(r, c) if r.dtype.kind == "f" else float(np.array_equal(r, c))
            for r, c in zip(ref, cand, strict=True)
        ]
        cosines.append(float(np.mean(per_sample)))
    accuracy = None
    if labels is not None:
        accuracy_score = _accuracy(names, reference, candidate, scores, labels)
        scores.append(accuracy_score)
        accuracy = accuracy_score.value
    if tasks.metric is not None:
        scores.append(_custom(tasks.metric, names, reference, candidate, labels))
    classes = [s.value for s in scores if s.task == TaskKind.CLASSES and s.metric != "accuracy"]
    regression = [s.value for s in scores if s.task in COSINE_TASKS]
    max_abs = max(
        (
            float(np.max(np.abs(r.astype(np.float64) - c)))
            for rs, cs in zip(reference, candidate, strict=True)
            for r, c in zip(rs, cs, strict=True)
            if r.dtype.kind == "f" and r.size
        ),
        default=0.0,
    )
    return Fidelity(
        cosine=min(cosines) if cosines else 1.0,
        max_abs_error=max_abs,
        top1_agreement=min(classes) if classes else None,
        accuracy=accuracy,
        regression_cosine=min(regression) if regression else None,
        tasks=tuple(scores),
    )


def _dense_head_scores(
    names: Sequence[str],
    reference: list[list[np.ndarray]],
    candidate: list[list[np.ndarray]],
    tasks: TaskConfig,
) -> tuple[list[TaskScore], set[int]]:
    """The detection score of a split dense head (judged as one task, see compressor/dense_head.py)
    and the outputs it covers; none when the user named one of its outputs as another task."""
    heads = find_dense_heads(names, reference[0], tasks.image_size) if reference else []
    scores, grouped = [], set[int]()
    for head in heads:
        named = [tasks.specs[names[i]] for i in head.members if names[i] in tasks.specs]
        if any(spec.kind is not TaskKind.DETECTION for spec in named):
            continue
        spec = named[0] if named else TaskSpec(TaskKind.DETECTION)
        scores.append(score_dense_head(head, names, reference, candidate, spec, guessed=not named))
        grouped.update(head.members)
    return scores, grouped


def _accuracy(
    names: Sequence[str],
    reference: list[list[np.ndarray]],
    candidate: list[list[np.ndarray]],
    scores: Sequence[TaskScore],
    labels: np.ndarray,
) -> TaskScore:
    """Accuracy against labels of the first class-score output, for the candidate and the reference."""
    first = next((s.output for s in scores if s.task == TaskKind.CLASSES), None)
    if first is None:
        raise DataError("labels were given but the model has no class-score output ([N, classes])")
    index = list(names).index(first)
    truth = np.asarray(labels).ravel()

    def share(outputs: list[list[np.ndarray]]) -> float:
        predictions = np.concatenate([o[index].argmax(-1).ravel() for o in outputs])
        return float(np.sum(predictions[: len(truth)] == truth[: len(predictions)])) / max(len(truth), 1)

    return TaskScore(names[index], TaskKind.CLASSES.value, "accuracy", share(candidate), share(reference))


def _custom(
    metric: CustomMetric,
    names: Sequence[str],
    reference: list[list[np.ndarray]],
    candidate: list[list[np.ndarray]],
    labels: np.ndarray | None,
) -> TaskScore:
    """The user's metric on the candidate, and on the reference itself (its best possible value)."""
    as_dicts = lambda outputs: [dict(zip(names, o, strict=True)) for o in outputs]  # noqa: E731
    try:
        value = float(metric.function(as_dicts(reference), as_dicts(candidate), labels))
        best = float(metric.function(as_dicts(reference), as_dicts(reference), labels))
    except Exception as exc:  # a user's function may raise anything: report it as theirs
        raise UsageError(f"--metric {metric.name} failed: {type(exc).__name__}: {exc}") from exc
    if not (np.isfinite(value) and np.isfinite(best)):
        raise UsageError(f"--metric {metric.name} returned a non-finite value ({value}, {best})")
    return TaskScore("*", "custom", metric.name, value, best, metric.min_score)


BACK_TO_BACK = 3
"""Runs of one session in a row before the next one's turn. A device serving a model runs it back to
back, its weights warm in the cache; one call each in turn timed every model just after the others had
evicted them (MiniLM int8, 23 MB, after its 90 MB fp32 original: 3.0-3.2 ms, after itself 2.3-2.4 ms).
The first run of each turn pays that, and the median leaves it out."""


def compare_latency(
    sessions: Mapping[str, ort.InferenceSession],
    feed: Mapping[str, np.ndarray],
    *,
    rounds: int = 10,
    min_seconds: float = 0.5,
) -> dict[str, float]:
    """Median latency in ms of each session, timed interleaved so they share the noise: every round,
    each session in turn runs BACK_TO_BACK times in a row."""
    timings: dict[str, list[float]] = {name: [] for name in sessions}
    feed = dict(feed)
    for session in sessions.values():  # warm-up
        session.run(None, feed)
    started = time.perf_counter()
    done = 0
    while done < rounds or (time.perf_counter() - started < min_seconds and done < rounds * 20):
        for name, session in sessions.items():
            for _ in range(BACK_TO_BACK):
                begin = time.perf_counter()
                session.run(None, feed)
                timings[name].append(time.perf_counter() - begin)
        done += 1
    return {name: float(np.median(values) * 1e3) for name, values in timings.items()}


def budget_failures(result: Fidelity, budgets: Budgets, floor_share: float = 1.0) -> list[str]:
    """Every task-metric budget a candidate misses, each with its numbers. `floor_share` < 1 keeps that
    share of the slack a task's own minimum leaves (0.98 at 0.5: 0.99), as tightened budgets do."""
    failures = []
    labelled = {s.output for s in result.tasks if s.metric == "accuracy"}
    for score in result.tasks:
        if score.metric != "accuracy" and score.output in labelled:
            continue  # with labels, the output is judged by accuracy, not by agreement
        where = f"{score.output} ({score.task}): {score.metric} {score.value:.4f}"
        if score.min_score is not None:
            floor = score.min_score if floor_share == 1.0 else 1.0 - floor_share * (1.0 - score.min_score)
            if score.value < floor:
                bar = (
                    f"{score.min_score}"
                    if floor == score.min_score
                    else f"{floor:.4g} (of {score.min_score})"
                )
                failures.append(f"{where} below its minimum {bar}")
        elif score.reference is not None:
            drop = (score.reference - score.value) * 100
            if drop > budgets.max_accuracy_drop_pp:
                failures.append(
                    f"{where}, {drop:.2f} pp below the original (budget {budgets.max_accuracy_drop_pp} pp)"
                )
        elif score.task in COSINE_TASKS:
            if score.value < budgets.min_output_cosine:
                failures.append(f"{where} below {budgets.min_output_cosine}")
        elif (1 - score.value) * 100 > budgets.max_accuracy_drop_pp:
            failures.append(f"{where} (budget: at most {budgets.max_accuracy_drop_pp} pp off)")
    return failures


@dataclass(frozen=True)
class Timing:
    """Latency of candidates relative to a baseline, from several separate interleaved runs."""

    baseline_ms: float
    median_ms: list[float]
    ratios: list[float]
    """Per candidate: median over the runs of its latency / the baseline's in the same run."""
    ranges: list[tuple[float, float]]
    """Per candidate: the smallest and largest of those per-run ratios (the noise)."""
    per_run: list[list[float]]


def timed_ratios(
    baseline: Any,
    candidates: Sequence[Any],
    feed: Mapping[str, np.ndarray],
    *,
    runs: int = 5,
    rounds: int = 5,
) -> Timing:
    """Time `candidates` against `baseline`, interleaved (`compare_latency`), in `runs` separate runs
    (alternating the order), so that a ratio can be told from noise by its spread over the runs."""
    base_ms: list[float] = []
    cand_ms: list[list[float]] = [[] for _ in candidates]
    for run in range(runs):
        order = ["base", *map(str, range(len(candidates)))]
        if run % 2:
            order.reverse()
        sessions = {key: baseline if key == "base" else candidates[int(key)] for key in order}
        medians = compare_latency(sessions, feed, rounds=rounds, min_seconds=0.05)
        base_ms.append(medians["base"])
        for index in range(len(candidates)):
            cand_ms[index].append(medians[str(index)])
    per_run = [[c / b for c, b in zip(ms, base_ms, strict=True)] for ms in cand_ms]
    return Timing(
        baseline_ms=float(np.median(base_ms)),
        median_ms=[float(np.median(ms)) for ms in cand_ms],
        ratios=[float(np.median(r)) for r in per_run],
        ranges=[(min(r), max(r)) for r in per_run],
        per_run=per_run,
    )


def meets_budgets(
    result: Fidelity, reference: Fidelity | None, budgets: Budgets, floor_share: float = 1.0
) -> tuple[bool, str]:
    """Whether a candidate's task metrics fit the profile's budgets, and if not, why."""
    failures = budget_failures(result, budgets, floor_share)
    return not failures, "; ".join(failures)
