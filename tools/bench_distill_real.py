"""Distill a real pretrained model: PP-OCR's text-direction classifier (from rapidocr-onnxruntime)
into a width-0.5 student derived from it, then int8; report against the fp32 original.

Run from the repository root:  python -m tools.bench_distill_real  (about 12 minutes on 2 cores)
"""

from __future__ import annotations

import time

from compressor.pipeline import compress
from edge_runtime.artifact.report_text import format_report
from edge_runtime.config.profiles import load_profile
from tools.zoo import ppocr_model, text_direction_dataset


def main() -> None:
    """Distill, quantize, print the report (budgets are reported, not enforced)."""
    started = time.perf_counter()
    transfer, _ = text_direction_dataset(3000, seed=1)
    validation, labels = text_direction_dataset(200, seed=2)
    result = compress(
        ppocr_model("cls"),
        load_profile("x86-vnni-gateway"),
        transfer,
        validation=validation,
        labels=labels,
        recipe=("prepare", "distill", "int8"),
        pass_options={"distill": {"width": 0.5, "epochs": 40, "patience": 8}},
        enforce_budgets=False,
    )
    print(format_report(result.report))
    print(f"command: python -m tools.bench_distill_real ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
