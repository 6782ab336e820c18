"""Reading ONNX models as they come out of the wild, and normalizing them for quantization."""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from compressor.transformer_fusion import fuse_transformer
from edge_runtime.core.errors import ModelError
from edge_runtime.core.types import TensorSpec

__all__ = [
    "MIN_QDQ_OPSET",
    "constants_to_initializers",
    "load_model",
    "name_unnamed_nodes",
    "op_counts",
    "preprocess",
    "shrink_names",
    "tensor_specs",
    "upgrade_opset",
]

MIN_QDQ_OPSET = 13
"""Per-channel QuantizeLinear/DequantizeLinear (the `axis` attribute) needs opset 13."""


def load_model(path: Path) -> onnx.ModelProto:
    """Read and check an ONNX file; every failure becomes one readable ModelError."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        model = onnx.load_model(str(path), load_external_data=True)
    except DecodeError as exc:
        raise ModelError(f"{path} is not an ONNX model (protobuf decode failed: {exc})") from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: cannot read ONNX model: {exc}") from exc
    if not model.graph.node:
        raise ModelError(
            f"{path} is not an ONNX model (it holds no graph nodes; truncated or another format?)"
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"{path} is not a valid ONNX model: {first}") from exc
    return model


def default_opset(model: onnx.ModelProto) -> int:
    """The model's version of the default ("" / ai.onnx) operator set."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ModelError("the model imports no default ONNX operator set")


def upgrade_opset(model: onnx.ModelProto, minimum: int = MIN_QDQ_OPSET) -> onnx.ModelProto:
    """A copy of `model` at opset >= `minimum` (unchanged copy when it already is)."""
    if default_opset(model) >= minimum:
        return copy.deepcopy(model)
    try:
        return onnx.version_converter.convert_version(model, minimum)
    except Exception as exc:  # the converter raises bare RuntimeError/IndexError on ops it cannot adapt
        raise ModelError(
            f"cannot upgrade the model from opset {default_opset(model)} to {minimum}, which per-channel "
            f"int8 needs: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where top-level `Constant` nodes holding tensors become initializers (quantizers need that)."""
    result = copy.deepcopy(model)
    graph = result.graph
    kept = []
    for node in graph.node:
        value = _constant_value(node)
        if value is None:
            kept.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)
    return result


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The tensor a Constant node produces, or None for any other node."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    attribute = node.attribute[0]
    if attribute.name == "value":
        return numpy_helper.to_array(attribute.t)
    scalar_kinds: dict[str, Callable[[onnx.AttributeProto], np.ndarray]] = {
        "value_float": lambda a: np.array(a.f, np.float32),
        "value_int": lambda a: np.array(a.i, np.int64),
        "value_floats": lambda a: np.array(list(a.floats), np.float32),
        "value_ints": lambda a: np.array(list(a.ints), np.int64),
    }
    convert = scalar_kinds.get(attribute.name)
    return convert(attribute) if convert else None


def name_unnamed_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where every node has a unique name (per-node decisions refer to nodes by name)."""
    result = copy.deepcopy(model)
    seen: set[str] = set()
    for index, node in enumerate(result.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)
    return result


DEFAULT_ATTRIBUTES: dict[str, dict[str, object]] = {
    "Conv": {"group": 1, "dilations": 1, "strides": 1, "pads": 0, "auto_pad": b"NOTSET"},
    "Gemm": {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0},
}
"""Attribute values equal to the operator's default, which can be left out of the file."""


def _is_default(op_type: str, attribute: onnx.AttributeProto) -> bool:
    default = DEFAULT_ATTRIBUTES.get(op_type, {}).get(attribute.name)
    if default is None:
        return op_type == "Conv" and attribute.name == "kernel_shape"  # optional: read from the weight
    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, list):
        return all(item == default for item in value)
    return value == default


def shrink_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with short tensor names, no node names, doc strings, value_info or default attributes;
    graph inputs/outputs keep their names.

    On small models the graph outweighs the weights: exporters write long, path-like names for
    every tensor, and quantization adds `_quantized`, `_scale`, `_zero_point` suffixes to each.
    """
    if any(
        attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for node in model.graph.node
        for attribute in node.attribute
    ):
        return copy.deepcopy(model)  # subgraphs capture outer names: renaming is not worth the risk
    result = copy.deepcopy(model)
    graph = result.graph
    keep = {value.name for value in graph.input} | {value.name for value in graph.output}
    mapping: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in mapping:
            mapping[name] = format(len(mapping), "x")
        return mapping[name]

    for initializer in graph.initializer:
        initializer.name = short(initializer.name)
        initializer.ClearField("doc_string")
    for node in graph.node:
        node.ClearField("name")
        node.ClearField("doc_string")
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]
        kept = [attribute for attribute in node.attribute if not _is_default(node.op_type, attribute)]
        del node.attribute[:]
        node.attribute.extend(kept)
    graph.ClearField("value_info")
    graph.ClearField("doc_string")
    result.ClearField("doc_string")
    return result


def tensor_specs(
    values: list[onnx.ValueInfoProto], initializers: set[str] | None = None
) -> tuple[TensorSpec, ...]:
    """TensorSpecs (numpy dtype name, shape with free dims as strings) for graph inputs or outputs."""
    specs = []
    for value in values:
        if initializers and value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        shape = tuple(
            dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?")
            for dim in tensor_type.shape.dim
        )
        specs.append(TensorSpec(name=value.name, dtype=dtype, shape=shape))
    return tuple(specs)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the top-level graph holds."""
    return dict(Counter(node.op_type for node in model.graph.node).most_common())


def preprocess(model: onnx.ModelProto, workdir: Path) -> tuple[onnx.ModelProto, list[str]]:
    """Normalize a model for int8: Constant nodes to initializers, opset >= 13, named nodes, then ORT's
    `quant_pre_process` (shape inference + basic graph optimizations such as BatchNorm folding).

    Returns the model and notes on what had to be worked around.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes: list[str] = []
    if any(node.op_type == "Constant" for node in model.graph.node):
        notes.append("weights stored in Constant nodes were moved to initializers")
    opset = default_opset(model)
    model = constants_to_initializers(model)
    if opset < MIN_QDQ_OPSET:
        model = upgrade_opset(model)
        notes.append(f"opset upgraded from {opset} to {MIN_QDQ_OPSET}")
    model = name_unnamed_nodes(model)
    # ORT's basic optimizations turn a transformer's MatMul + Add into Reshape/Gemm/Reshape, which
    # hides the attention and feed-forward patterns its transformer fusion and dynamic int8 need (and
    # it re-applies them at load time anyway): a transformer skips them.
    skip = fuse_transformer(model) is not None
    if skip:
        notes.append(
            "a transformer: ORT's offline graph optimizations skipped (its transformer fusion is tried instead)"
        )
    source, target = Path(workdir) / "prep_in.onnx", Path(workdir) / "prep_out.onnx"
    onnx.save_model(model, str(source))
    try:
        with contextlib.chdir(workdir):  # ORT drops a sym_shape_infer_temp.onnx into the cwd on failure
            quant_pre_process(str(source), str(target), skip_optimization=skip)
    except Exception:  # symbolic shape inference trips over many real exporters' graphs
        try:
            quant_pre_process(str(source), str(target), skip_optimization=skip, skip_symbolic_shape=True)
            notes.append("symbolic shape inference failed; used ONNX shape inference only")
        except Exception as exc:
            raise ModelError(f"ONNX Runtime cannot optimize this model for quantization: {exc}") from exc
    prepared = name_unnamed_nodes(constants_to_initializers(onnx.load_model(str(target))))
    prepared, rewritten = reshapes_to_flatten(prepared)
    if rewritten:
        notes.append(f"{rewritten} Reshape(x, [-1, K]) nodes that flatten [N, K, 1, 1] rewritten as Flatten")
    return prepared, notes


def reshapes_to_flatten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy where `Reshape(x, [-1, K])` with x of known shape [N, ...] and prod(...) == K becomes
    `Flatten(x, axis=1)`: the same numbers, but a fixed K no longer pins the channel count, so
    channel pruning and student derivation can change it."""
    result = copy.deepcopy(model)
    graph = result.graph
    initializers = {init.name: init for init in graph.initializer}
    shapes = {
        value.name: [
            dim.dim_value if dim.HasField("dim_value") else None for dim in value.type.tensor_type.shape.dim
        ]
        for value in [*graph.value_info, *graph.input]
    }
    count = 0
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        target = numpy_helper.to_array(initializers[node.input[1]]).tolist()
        source = shapes.get(node.input[0])
        if len(target) != 2 or target[0] != -1 or not source or len(source) < 2 or None in source[1:]:
            continue
        if int(np.prod([int(dim) for dim in source[1:] if dim is not None])) != target[1]:
            continue
        node.op_type = "Flatten"
        del node.input[1:]
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("axis", 1))
        count += 1
    return result, count
