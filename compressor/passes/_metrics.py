"""Numbers the prune, distill and TFLite passes report: bytes, parameters, MACs and output fidelity."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.measure import make_session, run_all
from compressor.passes.base import CompressionContext, Samples
from edge_runtime.config.profiles import DeviceProfile

__all__ = [
    "WEIGHT_OPS",
    "compare_models",
    "deflated_bytes",
    "has_weights",
    "model_bytes",
    "model_cost",
    "run_onnx",
    "stack_outputs",
    "timed",
]

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
"""Op types whose weight tensors pruning and cost counting care about."""


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of `model` in bytes."""
    return model.ByteSize()


def deflated_bytes(data: bytes) -> int:
    """Size after zip-style deflate at level 9: what a bundle member costs on disk."""
    return len(zlib.compress(data, 9))


def run_onnx(model: onnx.ModelProto, samples: Samples, profile: DeviceProfile) -> list[list[np.ndarray]]:
    """Every output of `model` for every sample, run by ONNX Runtime as `profile`'s device would."""
    return run_all(make_session(model.SerializeToString(), profile), samples)


def stack_outputs(per_sample: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Concatenate per-sample output lists along the batch axis."""
    if not per_sample:
        return []
    return [np.concatenate([np.asarray(out[i]) for out in per_sample]) for i in range(len(per_sample[0]))]


def _weight_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every float tensor stored in the graph (initializers and Constant nodes), by tensor name."""
    arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return {name: a for name, a in arrays.items() if a.dtype.kind == "f"}


def _with_static_inputs(model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose graph inputs have the sample's concrete shapes, shapes inferred."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for graph_input in fixed.graph.input:
        if graph_input.name in sample:
            dims = graph_input.type.tensor_type.shape.dim
            for dim, size in zip(dims, sample[graph_input.name].shape, strict=False):
                dim.ClearField("dim_param")
                dim.dim_value = int(size)
    return onnx.shape_inference.infer_shapes(fixed)


def _shape_table(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Known static shapes of every value in an inferred model."""
    table: dict[str, tuple[int, ...]] = {}
    values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            table[value.name] = tuple(d.dim_value for d in dims)
    for name, array in _weight_arrays(model).items():
        table[name] = array.shape
    return table


def _node_macs(node: Any, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of one Conv/Gemm/MatMul node (0 when a shape is unknown)."""
    out = shapes.get(node.output[0])
    if out is None or len(node.input) < 2 or node.input[1] not in shapes:
        return 0
    weight = shapes[node.input[1]]
    if node.op_type == "Conv":
        return int(np.prod(out)) * int(np.prod(weight[1:]))
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        a_shape = shapes.get(node.input[0])
        inner = (a_shape[0] if trans_a else a_shape[-1]) if a_shape else 0
        return int(np.prod(out)) * int(inner)
    left = shapes.get(node.input[0])
    return int(np.prod(out)) * int(left[-1]) if left else 0


def model_cost(model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> dict[str, int]:
    """Float parameter count and Conv/Gemm/MatMul multiply-accumulates for one `sample`."""
    inferred = _with_static_inputs(model, sample)
    shapes = _shape_table(inferred)
    macs = sum(_node_macs(n, shapes) for n in inferred.graph.node if n.op_type in WEIGHT_OPS)
    params = sum(int(a.size) for a in _weight_arrays(model).values())
    return {"params": params, "macs": macs}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Call `fn` and return its result with the seconds it took."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def compare_models(
    before: onnx.ModelProto, after: onnx.ModelProto, ctx: CompressionContext
) -> dict[str, Any]:
    """Bytes (raw and deflated), params, MACs before/after and fidelity of `after` vs `before`."""
    before_bytes, after_bytes = before.SerializeToString(), after.SerializeToString()
    report: dict[str, Any] = {
        "bytes_before": len(before_bytes),
        "bytes_after": len(after_bytes),
        "deflated_bytes_before": deflated_bytes(before_bytes),
        "deflated_bytes_after": deflated_bytes(after_bytes),
    }
    sample = next(iter(ctx.validation or ctx.calibration), None)
    if sample is not None:
        cost_before, cost_after = model_cost(before, dict(sample)), model_cost(after, dict(sample))
        report |= {f"{k}_before": v for k, v in cost_before.items()}
        report |= {f"{k}_after": v for k, v in cost_after.items()}
    if ctx.validation:
        reference = run_onnx(before, ctx.validation, ctx.profile)
        result = ctx.fidelity(reference, run_onnx(after, ctx.validation, ctx.profile))
        report["fidelity"] = result.to_dict()
        if ctx.labels is not None:
            report["accuracy_before"] = next(
                (score.reference for score in result.tasks if score.metric == "accuracy"), None
            )
    return report


def has_weights(model: onnx.ModelProto) -> bool:
    """Whether `model` has any Conv/Gemm/MatMul to train or prune."""
    return any(node.op_type in WEIGHT_OPS for node in model.graph.node)
