"""Numbers the prune, distill and TFLite passes report: bytes, parameters, MACs and output fidelity."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from compressor.passes.base import Samples

__all__ = [
    "WEIGHT_OPS",
    "deflated_bytes",
    "fidelity",
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


def run_onnx(model: onnx.ModelProto, samples: Samples, threads: int = 1) -> list[np.ndarray]:
    """Run `model` with ONNX Runtime on every sample; each output concatenated over the samples."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return stack_outputs([session.run(None, dict(sample)) for sample in samples])


def stack_outputs(per_sample: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Concatenate per-sample output lists along the batch axis."""
    if not per_sample:
        return []
    return [np.concatenate([np.asarray(out[i]) for out in per_sample]) for i in range(len(per_sample[0]))]


def fidelity(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], labels: np.ndarray | None = None
) -> dict[str, float]:
    """Compare two models' first outputs: top-1 agreement (classifiers), cosine, max abs error, accuracy."""
    ref = np.asarray(reference[0], dtype=np.float64).reshape(len(reference[0]), -1)
    cand = np.asarray(candidate[0], dtype=np.float64).reshape(len(candidate[0]), -1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-12)
    out: dict[str, float] = {
        "cosine": float(np.mean(cosine)),
        "max_abs_error": float(np.max(np.abs(ref - cand))) if ref.size else 0.0,
    }
    if ref.shape[1] > 1:
        out["top1_agreement"] = float(np.mean(ref.argmax(1) == cand.argmax(1)))
        if labels is not None and len(labels) == len(ref):
            out["reference_accuracy"] = float(np.mean(ref.argmax(1) == labels))
            out["accuracy"] = float(np.mean(cand.argmax(1) == labels))
    return out


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
