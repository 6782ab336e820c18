"""Split dense detection heads (PP-PicoDet / GFL: per stride a class-score and a DFL box output) are
recognised without a flag, decoded, and judged as one detection task (issue 13, item 1)."""

from __future__ import annotations

import numpy as np
import pytest

from compressor.dense_head import decode_dense, find_dense_heads, image_size_of
from compressor.measure import budget_failures, fidelity
from compressor.tasks import TaskConfig, TaskKind, TaskSpec
from edge_runtime.config.profiles import load_profile

BUDGETS = load_profile("x86-vnni-gateway").budgets
IMAGE = (64, 48)
"""(height, width): stride 8 gives an 8 x 6 grid, stride 16 a 4 x 3 grid."""
GRIDS = ((8, 6), (4, 3))
BINS = 8
NAMES = ["scores8", "scores16", "boxes8", "boxes16"]
Box = tuple[int, int, int, int, float, tuple[int, int, int, int]]
"""(level, row, column, class, score, distances left/top/right/bottom in bins)."""


def _head(boxes: list[Box], classes: int = 3, noise: float = 0.0, seed: int = 0) -> list[np.ndarray]:
    """The four outputs of a two-level head with `boxes` lit up (every other anchor scores 0.01)."""
    rng = np.random.default_rng(seed)
    scores = [np.full((1, rows * cols, classes), 0.01, np.float32) for rows, cols in GRIDS]
    dists = [rng.normal(0, 1, (1, rows * cols, 4 * BINS)).astype(np.float32) for rows, cols in GRIDS]
    for level, row, col, cls, score, sides in boxes:
        anchor = row * GRIDS[level][1] + col
        scores[level][0, anchor, cls] = score
        logits = np.full((4, BINS), -20.0, np.float32)
        logits[np.arange(4), list(sides)] = 20.0
        dists[level][0, anchor] = logits.ravel()
    if noise:
        dists = [d + rng.normal(0, noise, d.shape).astype(np.float32) for d in dists]
    return [*scores, *dists]


BOXES: list[Box] = [
    (0, 2, 1, 0, 0.9, (1, 1, 2, 1)),
    (0, 5, 4, 1, 0.8, (3, 2, 1, 2)),
    (1, 1, 1, 2, 0.7, (1, 1, 1, 1)),
    (1, 3, 2, 0, 0.6, (2, 1, 1, 1)),
]


def test_head_is_found_with_and_without_the_input_size() -> None:
    outputs = _head(BOXES)
    (head,) = find_dense_heads(NAMES, outputs, IMAGE)
    assert (head.score_indices, head.box_indices) == ((0, 1), (2, 3))
    assert (head.grids, head.strides) == (GRIDS, (8, 16))
    (guessed,) = find_dense_heads(NAMES, outputs)  # unknown size: squarest grid, rows >= columns
    assert (guessed.grids, guessed.strides) == (GRIDS, (8, 16))
    assert image_size_of({"image": np.zeros((1, 3, *IMAGE), np.float32)}) == IMAGE


def test_outputs_that_are_no_dense_head_are_left_alone() -> None:
    outputs = _head(BOXES)
    assert find_dense_heads(NAMES[::2], outputs[::2]) == []  # one level only
    squashed = [*outputs[:2], *(1 / (1 + np.exp(-o)) for o in outputs[2:])]  # both sides probabilities
    assert find_dense_heads(NAMES, squashed) == []
    odd = [*outputs[:2], outputs[2][..., :30], outputs[3][..., :30]]  # not 4 sides
    assert find_dense_heads(NAMES, odd) == []


def test_decoded_boxes_sit_on_their_anchor_centres() -> None:
    outputs = _head(BOXES)
    (head,) = find_dense_heads(NAMES, outputs, IMAGE)
    boxes, scores, classes = decode_dense(head, outputs, 0.5)[0]
    assert sorted(scores.round(2).tolist()) == [0.6, 0.7, 0.8, 0.9]
    first = boxes[np.argmax(scores)]  # level 0, row 2, column 1: centre (12, 20), stride 8
    np.testing.assert_allclose(first, [12 - 8, 20 - 8, 12 + 16, 20 + 8], atol=1e-3)
    assert classes[np.argmax(scores)] == 0
    assert len(decode_dense(head, outputs, 0.75)[0][0]) == 2


def test_overlapping_boxes_of_one_class_are_suppressed() -> None:
    twins = [(0, 2, 1, 0, 0.9, (1, 1, 2, 1)), (0, 2, 2, 0, 0.8, (2, 1, 1, 1))]  # same box, next anchor
    outputs = _head([*twins, (0, 2, 2, 1, 0.7, (2, 1, 1, 1))])  # a third: same place, another class
    (head,) = find_dense_heads(NAMES, outputs, IMAGE)
    _, scores, classes = decode_dense(head, outputs, 0.5)[0]
    assert sorted(zip(classes.tolist(), scores.round(2).tolist(), strict=True)) == [(0, 0.9), (1, 0.7)]


def test_the_head_is_judged_as_one_detection_task_and_moved_boxes_fail() -> None:
    reference = [_head(BOXES, seed=s) for s in range(3)]
    close = [_head(BOXES, noise=0.3, seed=s + 10) for s in range(3)]
    moved_boxes = [(lvl, r, c, k, p, (7, sides[1], 0, sides[3])) for lvl, r, c, k, p, sides in BOXES[:2]]
    moved = [_head([*moved_boxes, *BOXES[2:]], seed=s) for s in range(3)]
    tasks = TaskConfig(image_size=IMAGE)
    kept = fidelity(reference, close, names=NAMES, tasks=tasks)
    (score,) = kept.tasks  # one score for the four outputs, none for each of them
    assert (score.task, score.metric, score.guessed) == ("detection", "detections matched", True)
    assert score.value == 1.0 and score.details["reference_detections"] == 12
    assert budget_failures(kept, BUDGETS) == []
    lost = fidelity(reference, moved, names=NAMES, tasks=tasks)
    assert lost.tasks[0].value == pytest.approx(0.5)  # two of four boxes per image moved away
    assert "detections matched 0.5000" in budget_failures(lost, BUDGETS)[0]


def test_a_user_floor_applies_to_the_head_and_another_task_splits_it() -> None:
    reference = [_head(BOXES)]
    moved = [_head([*BOXES[:3], (1, 3, 2, 0, 0.6, (0, 1, 3, 1))])]  # one box in four shifted
    floor = TaskConfig(specs={"boxes16": TaskSpec(TaskKind.DETECTION, min_score=0.7)})
    result = fidelity(reference, moved, names=NAMES, tasks=floor)
    assert result.tasks[0].value == pytest.approx(0.75) and budget_failures(result, BUDGETS) == []
    split = TaskConfig(specs={"boxes16": TaskSpec(TaskKind.REGRESSION)})
    outputs = [score.output for score in fidelity(reference, moved, names=NAMES, tasks=split).tasks]
    assert outputs == NAMES  # judged output by output, as the user asked
