"""Int8 weight storage for nodes that compute in float.

A float weight W feeding Conv/ConvTranspose/MatMul/Gemm, an embedding table read by Gather, or the
W/R weights of LSTM/GRU/RNN is stored as per-channel symmetric int8 plus one float scale per output
channel (per row for a Gather table), and rebuilt in the graph as ``Mul(Cast(W_int8), scale)``.
Both inputs are constants, so ONNX Runtime's constant folding turns them back into one float
initializer when the session loads: the file is ~4x smaller and the model runs at fp32 speed.
(A ``DequantizeLinear`` would not do: ORT deliberately keeps DQ nodes unfolded for QDQ fusion, and
then pays for dequantizing every weight on every run.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    from compressor.rounding import Rounding

__all__ = [
    "WeightStorageReport",
    "quantize_weight",
    "store_small_floats_fp16",
    "store_weights_int8",
    "subgraphs",
    "weight_channel_axis",
    "weight_precisions",
]

WEIGHT_OPS: dict[str, frozenset[int]] = {
    "Conv": frozenset({1}),
    "ConvTranspose": frozenset({1}),
    "MatMul": frozenset({1}),
    "Gemm": frozenset({1}),
    "Gather": frozenset({0}),
    "LSTM": frozenset({1, 2}),
    "GRU": frozenset({1, 2}),
    "RNN": frozenset({1, 2}),
}
"""Op type -> indices of the inputs that hold weights."""
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
MIN_ELEMENTS = 64
"""Smaller weights stay float: the Cast/Mul nodes would cost more bytes than they save."""


@dataclass(frozen=True)
class WeightStorageReport:
    """What the transform did."""

    tensors: int
    names: tuple[str, ...]
    """Initializers now stored as int8."""
    float_bytes: int
    int8_bytes: int
    worst_sqnr_db: float
    """Lowest signal-to-quantization-noise ratio over the converted weights."""


def weight_channel_axis(op_type: str, node: onnx.NodeProto, rank: int) -> int:
    """The output-channel axis of a weight: one scale per output channel."""
    if op_type == "Conv":
        return 0
    if op_type == "ConvTranspose":
        return 1
    if op_type == "Gemm":
        trans_b = next((attr.i for attr in node.attribute if attr.name == "transB"), 0)
        return 0 if trans_b else 1
    if op_type == "Gather":  # one scale per gathered row (token)
        axis = next((attr.i for attr in node.attribute if attr.name == "axis"), 0)
        return axis % rank
    if op_type in RECURRENT_OPS:  # W/R: [directions, gates x hidden, inputs]
        return 1
    return rank - 1  # MatMul: B is [..., K, N]


def _quantize_per_channel(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Symmetric per-channel int8: (int8 values, scale shaped to broadcast, SQNR in dB)."""
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
    max_abs = np.max(np.abs(weight), axis=reduce_axes, keepdims=True).astype(np.float32)
    scale = np.where(max_abs > 0, max_abs / 127.0, 1.0).astype(np.float32)
    quantized = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    error = weight - quantized.astype(np.float32) * scale
    signal = float(np.sum(weight.astype(np.float64) ** 2))
    noise = float(np.sum(error.astype(np.float64) ** 2))
    sqnr = 10 * np.log10(signal / noise) if noise > 0 and signal > 0 else float("inf")
    return quantized, scale, sqnr


def quantize_weight(
    name: str, weight: np.ndarray, axis: int, bits: int, rounding: Rounding | None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Symmetric per-channel levels at `bits`: (levels, scale shaped to broadcast, SQNR in dB), rounded
    by `rounding` (GPTQ) when it knows the weight, else to nearest."""
    rounded = rounding.quantize(name, weight, bits) if rounding is not None else None
    if rounded is None:
        if bits == 8:
            return _quantize_per_channel(weight, axis)
        qmax = (1 << (bits - 1)) - 1
        reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
        max_abs = np.max(np.abs(weight), axis=reduce_axes, keepdims=True).astype(np.float32)
        scale = np.where(max_abs > 0, max_abs / qmax, 1.0).astype(np.float32)
        levels = np.clip(np.round(weight / scale), -qmax, qmax)
    else:
        levels, flat_scale = rounded
        shape = [1] * weight.ndim
        shape[axis] = -1
        scale = flat_scale.reshape(shape)
    error = weight - levels.astype(np.float32) * scale
    signal = float(np.sum(weight.astype(np.float64) ** 2))
    noise = float(np.sum(error.astype(np.float64) ** 2))
    sqnr = 10 * np.log10(signal / noise) if noise > 0 and signal > 0 else float("inf")
    return levels, scale, sqnr


def _weight_consumers(graph: onnx.GraphProto, initializer_names: set[str]) -> dict[str, list[onnx.NodeProto]]:
    """Initializer name -> nodes reading it (any input position)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name in initializer_names:
                consumers.setdefault(name, []).append(node)
    return consumers


def _is_weight_input(node: onnx.NodeProto, name: str) -> bool:
    """Whether `name` is read by `node` exactly once, as one of its weight inputs."""
    positions = WEIGHT_OPS.get(node.op_type, frozenset())
    inputs = list(node.input)
    return inputs.count(name) == 1 and inputs.index(name) in positions


def subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """Every graph nested in `graph`'s nodes (If branches, Loop and Scan bodies), depth first."""
    found = []
    for node in graph.node:
        for attribute in node.attribute:
            nested = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for sub in nested:
                found += [sub, *subgraphs(sub)]
    return found


@dataclass
class _Tally:
    converted: list[str]
    float_bytes: int = 0
    int8_bytes: int = 0
    worst: float = float("inf")


def _store_in_graph(
    graph: onnx.GraphProto,
    skip: frozenset[str],
    only: frozenset[str] | None,
    tally: _Tally,
    rounding: Rounding | None = None,
) -> None:
    """Convert, in place, the weights `graph` itself holds (not those of nested graphs)."""
    initializers = {init.name: init for init in graph.initializer}
    consumers = _weight_consumers(graph, set(initializers))
    new_nodes: list[onnx.NodeProto] = []
    for name, init in initializers.items():
        users = consumers.get(name, [])
        if name in skip or (only is not None and name not in only) or init.data_type != TensorProto.FLOAT:
            continue
        if not users or not all(_is_weight_input(user, name) for user in users):
            continue
        weight = numpy_helper.to_array(init)
        axes = {weight_channel_axis(u.op_type, u, weight.ndim) for u in users} if weight.ndim >= 2 else set()
        if weight.size < MIN_ELEMENTS or len(axes) != 1:
            continue
        levels, scale, sqnr = quantize_weight(name, weight, axes.pop(), 8, rounding)
        quantized = levels.astype(np.int8)
        graph.initializer.remove(init)
        graph.initializer.extend(
            [numpy_helper.from_array(quantized, f"{name}_i8"), numpy_helper.from_array(scale, f"{name}_s")]
        )
        new_nodes.append(helper.make_node("Cast", [f"{name}_i8"], [f"{name}_f"], to=TensorProto.FLOAT))
        new_nodes.append(helper.make_node("Mul", [f"{name}_f", f"{name}_s"], [name]))
        tally.converted.append(name)
        tally.float_bytes += weight.nbytes
        tally.int8_bytes += quantized.nbytes + scale.nbytes
        tally.worst = min(tally.worst, sqnr)
    if new_nodes:
        existing = list(graph.node)
        del graph.node[:]
        graph.node.extend(new_nodes + existing)


def store_weights_int8(
    model: onnx.ModelProto,
    skip: frozenset[str] = frozenset(),
    only: frozenset[str] | None = None,
    rounding: Rounding | None = None,
) -> tuple[onnx.ModelProto, WeightStorageReport]:
    """A copy of `model` whose float weights (see WEIGHT_OPS) are stored as int8 + per-channel scale,
    in the main graph and in nested graphs (If branches, loop bodies) alike; main-graph weights that
    `rounding` knows are rounded by GPTQ."""
    result = copy.deepcopy(model)
    tally = _Tally(converted=[])
    # Nested graphs first, deepest first: rewriting a graph's node list copies the graphs inside it.
    for graph in [*reversed(subgraphs(result.graph)), result.graph]:
        _store_in_graph(graph, skip, only, tally, rounding if graph is result.graph else None)
    report = WeightStorageReport(
        len(tally.converted), tuple(tally.converted), tally.float_bytes, tally.int8_bytes, tally.worst
    )
    return result, report


def store_small_floats_fp16(model: onnx.ModelProto, min_elements: int = 16) -> tuple[onnx.ModelProto, int]:
    """A copy whose remaining float32 initializers (biases, small weights) are stored as float16 and
    cast back at load time (constant-folded, so compute stays fp32). Returns the model and bytes saved.

    Quantization parameters (inputs of QuantizeLinear/DequantizeLinear) stay float32.
    """
    result = copy.deepcopy(model)
    graph = result.graph
    protected = {
        name
        for node in graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear")
        for name in node.input
    }
    fp16_max = float(np.finfo(np.float16).max)
    cast_nodes, saved = [], 0
    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT or init.name in protected:
            continue
        value = numpy_helper.to_array(init)
        if value.size < min_elements or not np.all(np.abs(value) < fp16_max):
            continue
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float16), f"{init.name}_h"))
        cast_nodes.append(helper.make_node("Cast", [f"{init.name}_h"], [init.name], to=TensorProto.FLOAT))
        saved += value.nbytes // 2
    if cast_nodes:
        existing = list(graph.node)
        del graph.node[:]
        graph.node.extend(cast_nodes + existing)
    return result, saved


_PRECISIONS = {
    TensorProto.FLOAT: "fp32",
    TensorProto.FLOAT16: "fp16",
    TensorProto.BFLOAT16: "bf16",
    TensorProto.INT8: "int8",
    TensorProto.UINT8: "int8",
    TensorProto.INT4: "int4",
    TensorProto.UINT4: "int4",
}


def _scale_names(graph: onnx.GraphProto) -> set[str]:
    """Scales of low-bit weights: the float partner of a Mul fed by values rebuilt from an int8 or
    packed 4-bit initializer, and (De)QuantizeLinear scales."""
    low_bit = {
        init.name for init in graph.initializer if init.data_type in (TensorProto.INT8, TensorProto.UINT8)
    }
    derived = set(low_bit)
    names = set()
    for node in graph.node:  # our rebuild nodes come first, in order
        rescale = node.op_type == "Mul" and len(node.input) == 2 and node.input[0] in derived
        if rescale or (node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 1):
            names.add(node.input[1])
        elif node.input and any(name in derived for name in node.input):
            derived.update(node.output)
    return names


def _packed_int4(graph: onnx.GraphProto) -> set[str]:
    """uint8 initializers holding two 4-bit values per byte (read by BitShift: see int4_weights)."""
    return {node.input[0] for node in graph.node if node.op_type == "BitShift"}


def weight_precisions(model: onnx.ModelProto, min_elements: int = 16) -> dict[str, dict[str, float]]:
    """Weights by storage precision: element count, stored bytes, and share of all weight elements.

    Weights are the float and low-bit tensors of the graph (initializers and Constant nodes) with at
    least `min_elements` elements; shapes, indices and quantization scales are not counted."""
    tensors, packed = [], set[str]()
    for graph in [model.graph, *subgraphs(model.graph)]:
        scales = _scale_names(graph)
        packed |= _packed_int4(graph)
        tensors += [init for init in graph.initializer if init.name not in scales]
        for node in graph.node:
            tensors += [a.t for a in node.attribute if node.op_type == "Constant" and a.name == "value"]
    totals: dict[str, list[int]] = {}
    for tensor in tensors:
        precision = _PRECISIONS.get(tensor.data_type)
        elements = int(np.prod(tensor.dims)) if tensor.dims else 1
        if tensor.name in packed:
            precision, elements = "int4", 2 * elements
        if precision is None or elements < min_elements:
            continue
        stored = len(tensor.raw_data) or numpy_helper.to_array(tensor).nbytes
        entry = totals.setdefault(precision, [0, 0])
        entry[0], entry[1] = entry[0] + elements, entry[1] + stored
    everything = sum(elements for elements, _ in totals.values()) or 1
    return {
        precision: {"elements": elements, "bytes": stored, "share": elements / everything}
        for precision, (elements, stored) in sorted(totals.items())
    }
