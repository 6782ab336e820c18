"""Fidelity judged by the task: what the users of each kind of output measure.

Every output gets a task, named by the user (``--task logits=classes``, or ``[tasks]`` in a TOML
recipe) or guessed from its shape and values. Each task scores a candidate's outputs against the
original model's, as a share where 1.0 means "as the original":

    classes     top-1 agreement per row (and accuracy against labels, when given)
    ctc         per-step class scores decoded greedily as CTC: share of identical strings (+ CER)
    detection   YOLO-layout heads decoded above a score threshold and matched by IoU: matched share;
                a head split over several outputs (PP-PicoDet/GFL: per stride class scores and DFL
                box distributions) is found and judged as one task (compressor/dense_head.py)
    boxes       probability maps (DB text detectors): connected regions above `map_threshold`,
                their bounding boxes matched by IoU: matched share (named by the user, never guessed)
    embedding   cosine of the pooled (mean over tokens) vector
    decision    binary scores thresholded at 0.5: share of identical decisions
    regression  maps and regressions: cosine (+ max abs error)

A user's own metric (``--metric module:function``) is scored the same way beside them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from edge_runtime.core.errors import UsageError

__all__ = [
    "COSINE_TASKS",
    "METRIC_NAMES",
    "CustomMetric",
    "TaskConfig",
    "TaskKind",
    "TaskScore",
    "TaskSpec",
    "decode_yolo",
    "guess_task",
    "load_metric",
    "map_boxes",
    "match_detections",
    "nms",
    "parse_task_option",
    "score_output",
]

Outputs = Sequence[np.ndarray]
"""One output's value for every sample."""
MetricFunction = Callable[[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], Any], float]


class TaskKind(StrEnum):
    """What an output means, which decides how its fidelity is judged."""

    CLASSES = "classes"
    CTC = "ctc"
    DETECTION = "detection"
    BOXES = "boxes"
    EMBEDDING = "embedding"
    DECISION = "decision"
    REGRESSION = "regression"


METRIC_NAMES = {
    TaskKind.CLASSES: "top-1 agreement",
    TaskKind.CTC: "strings identical",
    TaskKind.DETECTION: "detections matched",
    TaskKind.BOXES: "boxes matched",
    TaskKind.EMBEDDING: "pooled cosine",
    TaskKind.DECISION: "decisions identical",
    TaskKind.REGRESSION: "cosine",
}
COSINE_TASKS = frozenset({TaskKind.EMBEDDING, TaskKind.REGRESSION})
"""Tasks whose score is a cosine, budgeted by the profile's `min_output_cosine`; the others are
shares of identical decisions, budgeted by `max_accuracy_drop_pp`."""


@dataclass(frozen=True)
class TaskSpec:
    """How to judge one output."""

    kind: TaskKind
    min_score: float | None = None
    """Budget for this output's score (default: the profile's budgets)."""
    score_threshold: float = 0.25
    """detection: boxes scoring below this are not detections."""
    iou: float = 0.5
    """detection: smallest IoU for a candidate box to match a reference box of the same class."""
    margin: float = 0.05
    """detection: a box is looked for on the other side down to this far below the threshold."""
    blank: int = 0
    """ctc: the blank class index."""
    map_threshold: float = 0.3
    """boxes: map values above this are text (PP-OCR's DB post-processing default)."""
    min_pixels: int = 4
    """boxes: smaller regions are noise, not boxes."""


@dataclass(frozen=True)
class CustomMetric:
    """A user's metric: `function(reference, candidate, labels) -> float`, higher is better."""

    name: str
    function: MetricFunction
    min_score: float | None = None


@dataclass(frozen=True)
class TaskConfig:
    """The tasks the user named (others are guessed) and an optional metric of their own."""

    specs: Mapping[str, TaskSpec] = field(default_factory=dict)
    metric: CustomMetric | None = None
    image_size: tuple[int, int] | None = None
    """The model's image input (height, width), when it has one: places a split dense head's anchors."""


@dataclass(frozen=True)
class TaskScore:
    """One output's (or the custom metric's) score on the task metric."""

    output: str
    task: str
    metric: str
    value: float
    reference: float | None = None
    """The original model's own value, for label-based metrics (accuracy, a custom metric)."""
    min_score: float | None = None
    guessed: bool = False
    details: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "output": self.output,
            "task": self.task,
            "metric": self.metric,
            "value": self.value,
            "reference": self.reference,
            "min_score": self.min_score,
            "guessed": self.guessed,
            **{key: float(value) for key, value in self.details.items()},
        }


EMPTY_NORM = 1e-3
"""A reference row whose norm is below this share of the typical (median) reference norm is empty."""
_EMBEDDING_HINTS = ("embed", "hidden", "pool", "feature", "sentence", "vector")


def _rows_are_distributions(value: np.ndarray) -> bool:
    return bool(value.min() >= 0 and np.allclose(value.sum(-1), 1.0, atol=1e-3))


def guess_task(name: str, value: np.ndarray) -> TaskKind:
    """The task an output most likely serves, from its name, shape and values (one sample)."""
    if value.dtype.kind != "f" or value.ndim == 0:
        return TaskKind.DECISION if value.dtype.kind == "b" else TaskKind.REGRESSION
    hinted = any(hint in name.lower() for hint in _EMBEDDING_HINTS)
    if value.ndim in (2, 3) and value.shape[-1] == 1:  # one score per row: a yes/no or a value
        inside = value.min() >= 0 and value.max() <= 1
        return TaskKind.DECISION if inside else TaskKind.REGRESSION
    if value.ndim == 2:
        unit_rows = np.allclose(np.linalg.norm(value, axis=-1), 1.0, atol=1e-3) and value.min() < 0
        return TaskKind.EMBEDDING if hinted or unit_rows else TaskKind.CLASSES
    if value.ndim == 3:
        short, long = sorted(value.shape[1:])
        if hinted:
            return TaskKind.EMBEDDING
        if value.shape[-1] > 2 and _rows_are_distributions(value):
            return TaskKind.CTC
        if long >= 256 and 5 <= short <= 300 and long >= 8 * short:
            return TaskKind.DETECTION
        return TaskKind.EMBEDDING if value.shape[-1] >= 128 else TaskKind.CLASSES
    return TaskKind.REGRESSION


def parse_task_option(text: str) -> tuple[str, TaskSpec]:
    """`NAME=KIND` or `NAME=KIND:MIN_SCORE` (the `--task` option) -> (output name, spec)."""
    name, sep, rest = text.partition("=")
    kind_text, _, minimum = rest.partition(":")
    known = ", ".join(kind.value for kind in TaskKind)
    if not sep or not name or kind_text not in {kind.value for kind in TaskKind}:
        raise UsageError(f"--task {text!r}: expected OUTPUT=KIND[:MIN_SCORE] with KIND one of {known}")
    try:
        min_score = float(minimum) if minimum else None
    except ValueError:
        raise UsageError(f"--task {text!r}: MIN_SCORE must be a number such as 0.98") from None
    return name, TaskSpec(TaskKind(kind_text), min_score=min_score)


def load_metric(target: str, min_score: float | None = None) -> CustomMetric:
    """Import `module:function` as a metric (the `--metric` option)."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"--metric {target!r}: expected module:function")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except ImportError as exc:
        raise UsageError(f"--metric {target!r}: cannot import {module_name}: {exc}") from exc
    except AttributeError:
        raise UsageError(f"--metric {target!r}: {module_name} has no '{attribute}'") from None
    if not callable(function):
        raise UsageError(f"--metric {target!r}: '{attribute}' is not a function")
    return CustomMetric(target, function, min_score)


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    dots = np.sum(a64 * b64, axis=-1)
    same = np.all(a64 == b64, axis=-1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(same, 1.0, 0.0))


def _ctc_decode(steps: np.ndarray, blank: int) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of [lines, steps, classes] scores: best class per step, repeats collapsed,
    blanks dropped."""
    lines = []
    for best in steps.argmax(-1):
        collapsed = [int(c) for i, c in enumerate(best) if i == 0 or c != best[i - 1]]
        lines.append(tuple(c for c in collapsed if c != blank))
    return lines


def _edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _score_rows(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """One image's head as [anchors, values] and whether it carries objectness (anchors first)."""
    anchors_first = image.shape[0] >= image.shape[1]
    return (image if anchors_first else image.T), anchors_first


def scores_are_logits(head: np.ndarray) -> bool:
    """Whether a head's score channels are logits (outside [0, 1]) rather than probabilities."""
    rows, _ = _score_rows(head[0])
    scores = rows[:, 4:]
    return bool(scores.size and (scores.min() < -0.05 or scores.max() > 1.05))


def decode_yolo(
    head: np.ndarray, threshold: float, logits: bool | None = None
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Detections of a YOLO head per image: (boxes [n, 4] as x1 y1 x2 y2, scores [n], classes [n]).

    Anchors on the longer axis. [N, anchors, 5 + C] (YOLOv5/YOLOX) carries objectness at index 4;
    [N, 4 + C, anchors] (YOLOv8) does not. Boxes are centre x, centre y, width, height. Scores go
    through a sigmoid when `logits` (default: judged from this head's values)."""
    logits = scores_are_logits(head) if logits is None else logits
    squash = (lambda x: 1.0 / (1.0 + np.exp(-x))) if logits else (lambda x: x)
    results = []
    for image in head.astype(np.float64):
        rows, anchors_first = _score_rows(image)
        boxes = np.concatenate([rows[:, :2], np.abs(rows[:, 2:4])], axis=1)  # sizes taken as given
        if anchors_first:
            classes = squash(rows[:, 5:]) if rows.shape[1] > 5 else np.ones((len(rows), 1))
            scores_per_class = squash(rows[:, 4])[:, None] * classes
        else:
            scores_per_class = squash(rows[:, 4:])
        best = scores_per_class.argmax(-1)
        scores = scores_per_class[np.arange(len(rows)), best]
        keep = scores >= threshold
        corners = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], axis=1)
        results.append(nms(corners[keep], scores[keep], best[keep]))
    return results


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    top_left = np.maximum(box[:2], others[:, :2])
    bottom_right = np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
    area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)  # noqa: E731
    union = area(box) + area(others) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float = 0.5, limit: int = 300
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy per-class non-maximum suppression, best `limit` boxes."""
    order = np.argsort(-scores, kind="stable")[: limit * 4]
    kept: list[int] = []
    for index in order:
        same = [k for k in kept if classes[k] == classes[index]]
        if same and np.max(_iou(boxes[index], boxes[same])) > iou:
            continue
        kept.append(int(index))
        if len(kept) == limit:
            break
    return boxes[kept], scores[kept], classes[kept]


def match_detections(reference: tuple[np.ndarray, ...], candidate: tuple[np.ndarray, ...], iou: float) -> int:
    """Reference detections with a same-class candidate detection at IoU >= `iou` (greedy, by score)."""
    ref_boxes, _, ref_classes = reference
    cand_boxes, _, cand_classes = candidate
    free = np.ones(len(cand_boxes), dtype=bool)
    matched = 0
    for box, cls in zip(ref_boxes, ref_classes, strict=True):
        options = np.flatnonzero(free & (cand_classes == cls))
        if not len(options):
            continue
        overlaps = _iou(box, cand_boxes[options])
        if overlaps.max() >= iou:
            free[options[int(overlaps.argmax())]] = False
            matched += 1
    return matched


def _score_detection(ref: Outputs, cand: Outputs, spec: TaskSpec) -> tuple[float, dict[str, float]]:
    """Share of detections (either side's, above the threshold) found by the other side at IoU >=
    `iou`; the other side is decoded `margin` below the threshold, so that a box whose score merely
    crosses the threshold does not count as lost."""
    found = ref_count = cand_count = 0
    low = max(spec.score_threshold - spec.margin, 0.0)
    for r, c in zip(ref, cand, strict=True):
        logits = scores_are_logits(r)  # the reference decides, so noise cannot change the decoding
        ref_high, cand_high = (
            decode_yolo(r, spec.score_threshold, logits),
            decode_yolo(c, spec.score_threshold, logits),
        )
        ref_low, cand_low = decode_yolo(r, low, logits), decode_yolo(c, low, logits)
        for images in zip(ref_high, cand_high, ref_low, cand_low, strict=True):
            found += match_detections(images[0], images[3], spec.iou) + match_detections(
                images[1], images[2], spec.iou
            )
            ref_count, cand_count = ref_count + len(images[0][0]), cand_count + len(images[1][0])
    total = ref_count + cand_count
    return (found / total if total else 1.0), {
        "reference_detections": ref_count,
        "candidate_detections": cand_count,
    }


def map_boxes(probability: np.ndarray, threshold: float, min_pixels: int) -> np.ndarray:
    """Bounding boxes [n, 4] (x1 y1 x2 y2) of the connected regions of a 2-D map above `threshold`."""
    from scipy import ndimage

    labels, count = ndimage.label(probability > threshold)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    boxes = [
        (region[1].start, region[0].start, region[1].stop, region[0].stop)
        for index, region in enumerate(ndimage.find_objects(labels), start=1)
        if region is not None and sizes[index] >= min_pixels
    ]
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)


def _score_boxes(ref: Outputs, cand: Outputs, spec: TaskSpec) -> tuple[float, dict[str, float]]:
    """Share of boxes (either side's) that the other side has at IoU >= `iou`, on maps [N, (1,) H, W]."""
    found = ref_count = cand_count = 0
    for r, c in zip(ref, cand, strict=True):
        for ref_map, cand_map in zip(r.reshape(-1, *r.shape[-2:]), c.reshape(-1, *c.shape[-2:]), strict=True):
            sides = [map_boxes(m, spec.map_threshold, spec.min_pixels) for m in (ref_map, cand_map)]
            detections = [(boxes, np.ones(len(boxes)), np.zeros(len(boxes))) for boxes in sides]
            found += match_detections(detections[0], detections[1], spec.iou) + match_detections(
                detections[1], detections[0], spec.iou
            )
            ref_count, cand_count = ref_count + len(sides[0]), cand_count + len(sides[1])
    total = ref_count + cand_count
    return (found / total if total else 1.0), {"reference_boxes": ref_count, "candidate_boxes": cand_count}


def _score_ctc(ref: Outputs, cand: Outputs, spec: TaskSpec) -> tuple[float, dict[str, float]]:
    same = lines = errors = length = 0
    for r, c in zip(ref, cand, strict=True):
        for ref_line, cand_line in zip(_ctc_decode(r, spec.blank), _ctc_decode(c, spec.blank), strict=True):
            lines += 1
            same += ref_line == cand_line
            errors += _edit_distance(ref_line, cand_line)
            length += len(ref_line)
    return same / max(lines, 1), {"cer": errors / max(length, 1), "lines": lines}


def _score_regression(ref: Outputs, cand: Outputs, pooled: bool) -> tuple[float, dict[str, float]]:
    """Mean cosine per sample (per pooled row for embeddings) and the largest absolute error. A
    reference that is (nearly) all zeros, such as the map of a page with no text, has no direction:
    its cosine would be the noise's. Below `EMPTY_NORM` of the typical reference norm it counts as
    empty, and the candidate scores 1 there when it stays within 1% of that typical norm, else 0."""
    rows_ref, rows_cand, max_abs = [], [], 0.0
    for r, c in zip(ref, cand, strict=True):
        if pooled and r.ndim == 3:
            r, c = r.mean(axis=1), c.mean(axis=1)
        flat_r, flat_c = (r, c) if pooled else (r.reshape(1, -1), c.reshape(1, -1))
        rows_ref.append(flat_r.reshape(-1, flat_r.shape[-1]).astype(np.float64))
        rows_cand.append(flat_c.reshape(-1, flat_c.shape[-1]).astype(np.float64))
        if r.size:
            max_abs = max(max_abs, float(np.max(np.abs(r.astype(np.float64) - c))))
    if not rows_ref:
        return 1.0, {"max_abs_error": max_abs}
    a, b = np.concatenate(rows_ref), np.concatenate(rows_cand)
    norms = np.linalg.norm(a, axis=-1)
    typical = float(np.median(norms[norms > 0])) if np.any(norms > 0) else 1.0
    cosines = _cosine_rows(a, b)
    empty = norms <= EMPTY_NORM * typical
    cosines[empty] = (np.linalg.norm(b[empty], axis=-1) <= 0.01 * typical).astype(np.float64)
    return float(np.mean(cosines)), {"max_abs_error": max_abs}


def score_output(
    name: str, ref: Outputs, cand: Outputs, spec: TaskSpec, *, guessed: bool = False
) -> TaskScore:
    """Score one output of a candidate against the reference's, by its task."""
    details: dict[str, float] = {}
    if ref[0].dtype.kind != "f":
        equal = [np.array_equal(r, c) for r, c in zip(ref, cand, strict=True)]
        value = float(np.mean(equal))
    elif spec.kind is TaskKind.CLASSES:
        agree = [np.mean(r.argmax(-1) == c.argmax(-1)) for r, c in zip(ref, cand, strict=True)]
        value = float(np.mean(agree))
    elif spec.kind is TaskKind.DECISION:
        value = float(np.mean([np.mean((r > 0.5) == (c > 0.5)) for r, c in zip(ref, cand, strict=True)]))
    elif spec.kind is TaskKind.CTC:
        value, details = _score_ctc(ref, cand, spec)
    elif spec.kind is TaskKind.DETECTION:
        value, details = _score_detection(ref, cand, spec)
    elif spec.kind is TaskKind.BOXES:
        value, details = _score_boxes(ref, cand, spec)
    else:
        value, details = _score_regression(ref, cand, pooled=spec.kind is TaskKind.EMBEDDING)
    return TaskScore(
        output=name,
        task=spec.kind.value,
        metric=METRIC_NAMES[spec.kind],
        value=value,
        min_score=spec.min_score,
        guessed=guessed,
        details=details,
    )
