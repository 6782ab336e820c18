"""Transformer graph fusion by ONNX Runtime's own optimizer (`onnxruntime.transformers`).

A BERT-style encoder exported from a framework is hundreds of small ops: each attention block is
three MatMuls, Reshape/Transpose pairs, a scaled Softmax and a residual LayerNorm. ONNX Runtime's
transformer optimizer rewrites them into its fused kernels (`Attention`, `SkipLayerNormalization`,
`BiasGelu`), which its dynamic int8 quantization then turns into `QAttention` and
`DynamicQuantizeMatMul`: one int8 GEMM per block where the unfused graph had a dozen float ops.
The fusion is pattern matching; a pattern it misreads changes the numbers, which is why the fused
model is only ever a candidate, judged by the task metric like every other.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter

import onnx

__all__ = ["fuse_transformer"]


def fuse_transformer(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The model with ONNX Runtime's BERT fusions applied (heads and width read from the graph),
    or None when it holds no attention block the optimizer recognises."""
    if not any(node.op_type == "Softmax" for node in model.graph.node):
        return None
    from onnxruntime.transformers.optimizer import optimize_model

    quiet = logging.getLogger("onnxruntime.transformers")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            # opt_level 0: only the Python fusions; ORT's own graph optimizations run at load time.
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # the optimizer rewrites the proto it is given
            fused = optimize_model(copy, model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
    except Exception:  # a pattern matcher that trips over an unusual graph: simply no fused candidate
        return None
    finally:
        quiet.level = level
    counts = Counter(node.op_type for node in fused.model.graph.node)
    if not counts.get("Attention") and not counts.get("MultiHeadAttention"):
        return None
    result = fused.model
    if not any(op.domain == "com.microsoft" for op in result.opset_import):
        result.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return result
