"""The first pass: make a model from the wild fit for quantization (no numerical change)."""

from __future__ import annotations

import onnx

from compressor.onnx_model import op_counts, preprocess
from compressor.passes.base import CompressionContext, PassResult

__all__ = ["Prepare"]


class Prepare:
    """Constant nodes to initializers, opset upgrade, shape inference, BatchNorm folding."""

    name = "prepare"

    def supports(self, model: onnx.ModelProto) -> bool:
        """Every model can be prepared."""
        return True

    def run(self, model: onnx.ModelProto, ctx: CompressionContext) -> PassResult:
        """Return the normalized copy and what was worked around."""
        prepared, notes = preprocess(model, ctx.workdir)
        report = {
            "pass": self.name,
            "notes": notes,
            "ops_before": op_counts(model),
            "ops_after": op_counts(prepared),
            "bytes_before": model.ByteSize(),
            "bytes_after": prepared.ByteSize(),
        }
        return PassResult(model=prepared, report=report)
