"""Fix input shapes from the data and fold the shape arithmetic with onnxslim (a kept-up ONNX
simplifier), so real exported graphs (`Shape` -> `Gather` -> `Concat` -> `Reshape` flattens) reach
converters that need static graphs, such as full-integer TFLite."""

from __future__ import annotations

import copy

import onnx

from compressor.onnx_model import op_counts
from compressor.passes.base import CompressionContext, PassResult
from edge_runtime.core.errors import CompressionError, DataError

__all__ = ["Simplify", "static_input_shapes"]


def static_input_shapes(model: onnx.ModelProto, ctx: CompressionContext) -> list[str]:
    """`name:d0,d1,...` for every graph input, from the first calibration sample."""
    if not ctx.calibration:
        raise DataError("simplify needs one calibration sample to fix the input shapes")
    sample = ctx.calibration[0]
    initializers = {init.name for init in model.graph.initializer}
    shapes = []
    for value in model.graph.input:
        if value.name in initializers or value.name not in sample:
            continue
        dims = sample[value.name].shape
        if dims:
            shapes.append(f"{value.name}:{','.join(str(d) for d in dims)}")
    return shapes


class Simplify:
    """Static input shapes from the data, then onnxslim's constant folding and shape simplification."""

    name = "simplify"

    def supports(self, model: onnx.ModelProto) -> bool:
        """Every model can be simplified."""
        return True

    def run(self, model: onnx.ModelProto, ctx: CompressionContext) -> PassResult:
        """Return the simplified copy and the ops it removed."""
        import onnxslim

        shapes = static_input_shapes(model, ctx)
        try:
            slim = onnxslim.slim(copy.deepcopy(model), input_shapes=shapes or None)
        except Exception as exc:  # the simplifier raises many types on graphs it cannot handle
            raise CompressionError(
                f"onnxslim cannot simplify this model: {str(exc).splitlines()[0]}"
            ) from exc
        report = {
            "pass": self.name,
            "input_shapes": shapes,
            "ops_before": op_counts(model),
            "ops_after": op_counts(slim),
            "bytes_before": model.ByteSize(),
            "bytes_after": slim.ByteSize(),
            "notes": [f"input shapes fixed to {', '.join(shapes)}; shape arithmetic folded by onnxslim"]
            if shapes
            else [],
        }
        return PassResult(model=slim, report=report)
