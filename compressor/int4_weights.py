"""4-bit weight storage for nodes that compute in float: beyond 4x.

A weight is quantized symmetrically per output channel to 15 levels (-7..7), shifted to 0..14 and
packed two to a byte: the first half of the rows (along axis 0) in the high nibble, the second half
in the low nibble. The graph rebuilds it with opset-11 ops only (BitShift, Cast, Mul, Sub, Concat),
all on constants, so ONNX Runtime folds them into one float initializer when the session loads:
the file holds ~1/8 of the float bytes and the model runs at fp32 speed, as with int8 storage.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressor.int8_weights import (
    MIN_ELEMENTS,
    _is_weight_input,
    _weight_consumers,
    quantize_weight,
    weight_channel_axis,
)

if TYPE_CHECKING:
    from compressor.rounding import Rounding

__all__ = ["Int4Report", "store_weights_int4"]


@dataclass(frozen=True)
class Int4Report:
    """What the transform did."""

    names: tuple[str, ...]
    float_bytes: int
    packed_bytes: int


def _pack(
    name: str, weight: np.ndarray, axis: int, rounding: Rounding | None
) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 [rows/2, ...], scale shaped to broadcast) of a weight with an even axis 0."""
    signed, scale, _ = quantize_weight(name, weight, axis, 4, rounding)
    scale = scale.astype(np.float32)
    levels = (signed + 8).astype(np.uint8)  # 1..15
    half = weight.shape[0] // 2
    return (levels[:half] << 4) | levels[half:], scale


def _rebuild_nodes(name: str) -> list[onnx.NodeProto]:
    """Nodes that turn `{name}_p4` (packed) and `{name}_s4` (scale) back into the float `name`:
    high = p >> 4, low = p - 16 * high, rows = concat(high, low) - 8, times the scale."""
    return [
        helper.make_node("BitShift", [f"{name}_p4", f"{name}_k4"], [f"{name}_hi"], direction="RIGHT"),
        helper.make_node("Cast", [f"{name}_hi"], [f"{name}_hi_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", [f"{name}_p4"], [f"{name}_p_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{name}_hi_f", f"{name}_16"], [f"{name}_hi_16"]),
        helper.make_node("Sub", [f"{name}_p_f", f"{name}_hi_16"], [f"{name}_lo_f"]),
        helper.make_node("Concat", [f"{name}_hi_f", f"{name}_lo_f"], [f"{name}_u4"], axis=0),
        helper.make_node("Sub", [f"{name}_u4", f"{name}_z4"], [f"{name}_q4"]),
        helper.make_node("Mul", [f"{name}_q4", f"{name}_s4"], [name]),
    ]


def store_weights_int4(
    model: onnx.ModelProto, only: frozenset[str], rounding: Rounding | None = None
) -> tuple[onnx.ModelProto, Int4Report]:
    """A copy of `model` whose float weights named in `only` (main graph) are stored as packed 4-bit,
    rounded by `rounding` (GPTQ) where it knows the weight."""
    result = copy.deepcopy(model)
    graph = result.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers = _weight_consumers(graph, set(initializers))
    new_nodes: list[onnx.NodeProto] = []
    names, float_bytes, packed_bytes = [], 0, 0
    for name in sorted(only & set(initializers)):
        init, users = initializers[name], consumers.get(name, [])
        if (
            init.data_type != TensorProto.FLOAT
            or not users
            or not all(_is_weight_input(u, name) for u in users)
        ):
            continue
        weight = numpy_helper.to_array(init)
        axes = {weight_channel_axis(u.op_type, u, weight.ndim) for u in users} if weight.ndim >= 2 else set()
        if weight.size < MIN_ELEMENTS or len(axes) != 1 or weight.shape[0] % 2:
            continue
        packed, scale = _pack(name, weight, axes.pop(), rounding)
        graph.initializer.remove(init)
        graph.initializer.extend(
            [
                numpy_helper.from_array(packed, f"{name}_p4"),
                numpy_helper.from_array(scale, f"{name}_s4"),
                numpy_helper.from_array(np.array(4, np.uint8), f"{name}_k4"),
                numpy_helper.from_array(np.array(8.0, np.float32), f"{name}_z4"),
                numpy_helper.from_array(np.array(16.0, np.float32), f"{name}_16"),
            ]
        )
        new_nodes += _rebuild_nodes(name)
        names.append(name)
        float_bytes += weight.nbytes
        packed_bytes += packed.nbytes + scale.nbytes
    if new_nodes:
        existing = list(graph.node)
        del graph.node[:]
        graph.node.extend(new_nodes + existing)
    return result, Int4Report(tuple(names), float_bytes, packed_bytes)
