"""Split dense detection heads: per stride one class-score output and one box-distribution output.

PP-PicoDet and other GFL-style detectors (and YOLOv8 before its final concat) leave the head split:
for each stride a score output [N, anchors, classes] (probabilities) and a box output
[N, anchors, 4 * (reg_max + 1)]: for each side (left, top, right, bottom) a distribution over
`reg_max + 1` distance bins (DFL). Anchors are the cell centres of each stride's grid, row by row.
No single output means anything alone, so the group is judged as one detection task: decode boxes
above the score threshold, non-maximum suppression per class, match candidate to reference by IoU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from compressor.tasks import METRIC_NAMES, TaskKind, TaskScore, TaskSpec, match_detections

__all__ = ["DenseHead", "decode_dense", "find_dense_heads", "image_size_of", "score_dense_head"]

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]
"""boxes [n, 4] as x1 y1 x2 y2 (input pixels), scores [n], class ids [n]."""
BASE_STRIDE = 8
"""Stride of the finest level when the input size is unknown (PicoDet, GFL, YOLOv8 all start at 8).
IoU does not change with the scale, so only the ratios between levels matter for matching."""
_STRIDES = tuple(2**k for k in range(1, 10))
TOP_K = 1000
"""Best anchors kept per level before thresholding (PicoDet's `nms_top_k`)."""
PER_CLASS = 200
"""Best candidates per class going into NMS (PicoDet's `candidate_size`)."""
NMS_IOU = 0.5


@dataclass(frozen=True)
class DenseHead:
    """Which outputs form a split dense head, and each level's anchor grid, finest level first."""

    score_indices: tuple[int, ...]
    box_indices: tuple[int, ...]
    grids: tuple[tuple[int, int], ...]
    """(rows, columns) of anchors per level."""
    strides: tuple[int, ...]

    @property
    def members(self) -> tuple[int, ...]:
        """Indices of every output of the head."""
        return (*self.score_indices, *self.box_indices)


def image_size_of(feed: Mapping[str, np.ndarray]) -> tuple[int, int] | None:
    """(height, width) of a sample's one image input (NCHW or NHWC), or None when it has none or several."""
    images = [v for v in feed.values() if np.asarray(v).ndim == 4 and np.asarray(v).dtype.kind == "f"]
    if len(images) != 1:
        return None
    shape = np.asarray(images[0]).shape
    if shape[1] in (1, 3, 4):
        return int(shape[2]), int(shape[3])
    return (int(shape[1]), int(shape[2])) if shape[3] in (1, 3, 4) else None


def _role(score: np.ndarray, box: np.ndarray) -> bool:
    """Whether `score` can be a level's class scores and `box` its box distributions."""
    unit = lambda v: bool(v.size and v.min() >= 0 and v.max() <= 1)  # noqa: E731
    return unit(score) and not unit(box) and box.shape[-1] % 4 == 0 and box.shape[-1] >= 8


def _grids_for(
    counts: Sequence[int], image_size: tuple[int, int] | None
) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]] | None:
    """Anchor grids and strides that give each level's anchor count, or None when none fit."""
    if image_size is not None:
        height, width = image_size
        strides: list[int] = []
        for count in counts:
            fits = [s for s in _STRIDES if math.ceil(height / s) * math.ceil(width / s) == count]
            if not fits or (strides and fits[0] <= strides[-1]):
                break
            strides.append(fits[0])
        else:
            return tuple((math.ceil(height / s), math.ceil(width / s)) for s in strides), tuple(strides)
    options = [
        (rows, counts[0] // rows)
        for rows in range(1, counts[0] + 1)
        if counts[0] % rows == 0
        and all(
            math.ceil(rows / 2**k) * math.ceil(counts[0] // rows / 2**k) == count
            for k, count in enumerate(counts)
        )
    ]
    if not options:
        return None
    rows, cols = min(options, key=lambda rc: (abs(rc[0] - rc[1]), -rc[0]))  # squarest, rows >= columns
    grids = tuple((math.ceil(rows / 2**k), math.ceil(cols / 2**k)) for k in range(len(counts)))
    return grids, tuple(BASE_STRIDE * 2**k for k in range(len(counts)))


def find_dense_heads(
    names: Sequence[str], outputs: Sequence[np.ndarray], image_size: tuple[int, int] | None = None
) -> list[DenseHead]:
    """The split dense head among one sample's outputs ([] or one head): at least two levels, each a
    probability output and a box-distribution output with the same anchor count, on a stride grid."""
    by_anchors: dict[tuple[int, int], list[int]] = {}
    for index, value in enumerate(outputs):
        if value.dtype.kind == "f" and value.ndim == 3:
            by_anchors.setdefault(value.shape[:2], []).append(index)
    levels = []
    for (_, anchors), indices in by_anchors.items():
        if len(indices) != 2:
            continue
        first, second = indices
        roles = [(s, b) for s, b in ((first, second), (second, first)) if _role(outputs[s], outputs[b])]
        if len(roles) == 1:
            levels.append((anchors, *roles[0]))
    levels.sort(reverse=True)
    if len(levels) < 2 or len({outputs[b].shape[-1] for _, _, b in levels}) != 1:
        return []
    placed = _grids_for([anchors for anchors, _, _ in levels], image_size)
    if placed is None:
        return []
    grids, strides = placed
    return [DenseHead(tuple(s for _, s, _ in levels), tuple(b for _, _, b in levels), grids, strides)]


def _level_boxes(distribution: np.ndarray, grid: tuple[int, int], stride: int) -> np.ndarray:
    """Corners [anchors, 4] from one level's box distributions [anchors, 4 * bins] (DFL expectation)."""
    bins = distribution.shape[-1] // 4
    logits = distribution.reshape(-1, 4, bins).astype(np.float64)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    distance = (weights / weights.sum(-1, keepdims=True)) @ np.arange(bins) * stride
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    centres = np.stack([(cols.ravel() + 0.5) * stride, (rows.ravel() + 0.5) * stride], axis=1)
    return np.concatenate([centres - distance[:, :2], centres + distance[:, 2:]], axis=1)


def _hard_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS of one class's boxes, best first."""
    order = np.argsort(-scores, kind="stable")[:PER_CLASS]
    kept = []
    while order.size:
        best, order = order[0], order[1:]
        kept.append(int(best))
        top_left = np.maximum(boxes[best, :2], boxes[order, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[order, 2:])
        inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
        areas = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)
        union = areas[best] + areas[order] - inter
        order = order[inter <= iou * np.where(union > 0, union, 1.0)]
    return np.array(kept, dtype=np.int64)


def decode_dense(head: DenseHead, outputs: Sequence[np.ndarray], threshold: float) -> list[Detections]:
    """Detections per image from one sample's outputs: each level's best `TOP_K` anchors, every class
    scoring above `threshold` (a box may carry several classes), NMS per class."""
    results = []
    for image in range(outputs[head.score_indices[0]].shape[0]):
        corners, scores = [], []
        for s, b, grid, stride in zip(
            head.score_indices, head.box_indices, head.grids, head.strides, strict=True
        ):
            level_scores = outputs[s][image].astype(np.float64)
            best = np.argsort(-level_scores.max(-1), kind="stable")[:TOP_K]
            corners.append(_level_boxes(outputs[b][image], grid, stride)[best])
            scores.append(level_scores[best])
        all_boxes, all_scores = np.concatenate(corners), np.concatenate(scores)
        picked: list[Detections] = []
        for cls in range(all_scores.shape[1]):
            mask = all_scores[:, cls] > threshold
            if mask.any():
                keep = _hard_nms(all_boxes[mask], all_scores[mask, cls], NMS_IOU)
                cls_boxes, cls_scores = all_boxes[mask][keep], all_scores[mask, cls][keep]
                picked.append((cls_boxes, cls_scores, np.full(len(keep), cls)))
        if picked:
            results.append(tuple(np.concatenate(parts) for parts in zip(*picked, strict=True)))
        else:
            results.append((np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)))
    return results  # type: ignore[return-value]


def score_dense_head(
    head: DenseHead,
    names: Sequence[str],
    reference: Sequence[Sequence[np.ndarray]],
    candidate: Sequence[Sequence[np.ndarray]],
    spec: TaskSpec,
    *,
    guessed: bool = False,
) -> TaskScore:
    """Share of detections (either side's, above the threshold) that the other side has at IoU >=
    `spec.iou`, the other side decoded `spec.margin` below the threshold (as for one-output heads)."""
    found = ref_count = cand_count = 0
    low = max(spec.score_threshold - spec.margin, 0.0)
    for ref, cand in zip(reference, candidate, strict=True):
        ref_high, ref_low = decode_dense(head, ref, spec.score_threshold), decode_dense(head, ref, low)
        cand_high, cand_low = decode_dense(head, cand, spec.score_threshold), decode_dense(head, cand, low)
        for rh, rl, ch, cl in zip(ref_high, ref_low, cand_high, cand_low, strict=True):
            found += match_detections(rh, cl, spec.iou) + match_detections(ch, rl, spec.iou)
            ref_count, cand_count = ref_count + len(rh[0]), cand_count + len(ch[0])
    total = ref_count + cand_count
    return TaskScore(
        output=names[head.score_indices[0]],
        task=TaskKind.DETECTION.value,
        metric=METRIC_NAMES[TaskKind.DETECTION],
        value=found / total if total else 1.0,
        min_score=spec.min_score,
        guessed=guessed,
        details={
            "reference_detections": ref_count,
            "candidate_detections": cand_count,
            "head_outputs": len(head.members),
        },
    )
