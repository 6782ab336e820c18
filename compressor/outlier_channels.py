"""Activation outlier channels taken out of int8: the few input channels of a MatMul whose values dwarf
the others' are multiplied in float, so the int8 range of the rest fits the rest.

This is the mixed-precision decomposition of LLM.int8() (Dettmers et al., 2022) made static: the
channels are chosen once on the calibration data. A transformer's MatMul inputs hold one or two such
channels (all-MiniLM-L6-v2: the feed-forward output MatMuls read one channel up to 24.3 beside a
median channel maximum of 1.0), and one per-tensor int8 range stretched to cover them leaves the other
channels a few levels. NNCF's int8 of that encoder read pooled cosine 0.989 through OpenVINO; with its
9 outlier-bearing MatMuls split it read 0.996 (with symmetric activations, 0.995). Measured on an
AMD EPYC at bf16; the split cost under 0.01x of ONNX Runtime's fp32 latency.

The rewrite, exact in float, of `Y = X @ W` for outlier channels `c`:
    Y = (X * mask) @ W' + sum over c of X[..., c:c+1] * W[c, :]
`mask` is 0 on `c`, `W'` is `W` with the rows `c` zeroed. The quantizer calibrates on `X * mask`;
after quantization `unmask` removes the Mul, so the quantizer reads `X` itself: the outlier channels
saturate, and their zeroed rows make that harmless. Each outlier term is a float broadcast Mul and an
Add, which OpenVINO fuses (a small MatMul for them ran as a separate bf16 FullyConnected). The terms
are added after the MatMul's bias Add, so MatMul + bias still fuse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.measure import make_session
from compressor.passes.base import Samples
from edge_runtime.config.profiles import DeviceProfile

__all__ = ["FACTOR", "MOST_CHANNELS", "OutlierSplit", "split_outliers", "unmask"]

FACTOR = 10.0
"""A channel is an outlier when its largest |value| on the calibration data exceeds this many times the
median channel's largest |value|. MiniLM's outliers stand at 13-25x, and its next channels at 4-10x.
At 6x it split 13 MatMuls instead of 9, for a cosine of 0.9967 instead of 0.9963, and ran slower."""
MOST_CHANNELS = 4
"""At most this many channels of one tensor stay float: more is no longer an outlier, and each costs a
float multiply."""


@dataclasses.dataclass(frozen=True)
class OutlierSplit:
    """A float graph with outlier channels split off: what to quantize, and what to undo afterwards."""

    model: onnx.ModelProto
    split_nodes: tuple[str, ...]
    """The MatMuls whose outlier input channels were split off."""
    float_nodes: tuple[str, ...]
    """The nodes multiplying the outlier channels, which must stay float (the quantizer's ignored scope)."""
    masked: dict[str, str]
    """Masked tensor -> the tensor it masks: `unmask` makes the masked tensor's readers read the other."""
    channels: dict[str, tuple[int, ...]]
    """Split tensor -> its outlier channels."""

    @property
    def summary(self) -> str:
        """E.g. 'outlier channels float in 13 MatMuls'."""
        count = len(self.split_nodes)
        return f"outlier channels float in {count} MatMul{'s' if count != 1 else ''}"


def _split_inputs(
    nodes: Sequence[onnx.NodeProto], weights: dict[str, onnx.TensorProto]
) -> dict[str, list[onnx.NodeProto]]:
    """Activation tensor -> the MatMuls reading it with a constant 2-D float weight."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        if (
            node.op_type == "MatMul"
            and node.input[1] in weights
            and len(weights[node.input[1]].dims) == 2
            and weights[node.input[1]].data_type == onnx.TensorProto.FLOAT
            and node.input[0] not in weights
        ):
            found.setdefault(node.input[0], []).append(node)
    return found


def _channel_maxima(
    model: onnx.ModelProto, tensors: Sequence[str], samples: Samples, profile: DeviceProfile
) -> dict[str, np.ndarray]:
    """Largest |value| per last-axis channel of each tensor over `samples` (running, not stored)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {out.name for out in probe.graph.output}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = make_session(probe.SerializeToString(), profile)
    wanted = set(tensors)
    names = [out.name for out in session.get_outputs()]
    maxima: dict[str, np.ndarray] = {}
    for feed in samples:
        for name, value in zip(names, session.run(None, dict(feed)), strict=True):
            if name in wanted and np.ndim(value) >= 1:
                channel = np.abs(np.asarray(value, np.float32).reshape(-1, np.shape(value)[-1])).max(axis=0)
                maxima[name] = channel if name not in maxima else np.maximum(maxima[name], channel)
    return maxima


def _outliers(maxima: np.ndarray) -> tuple[int, ...]:
    """The channels over FACTOR x the median channel maximum, at most MOST_CHANNELS of them, in order."""
    median = float(np.median(maxima))
    if maxima.size < 4 * MOST_CHANNELS or not median > 0:
        return ()
    largest = np.argsort(maxima)[::-1][:MOST_CHANNELS]
    return tuple(sorted(int(c) for c in largest if maxima[c] > FACTOR * median))


def split_outliers(model: onnx.ModelProto, samples: Samples, profile: DeviceProfile) -> OutlierSplit | None:
    """`model` (weights as initializers) with each MatMul's outlier input channels on `samples` split
    off into float terms; None when no MatMul reads an outlier channel."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    listed = list(graph.node)  # the same message objects throughout: `id` below tells them apart
    weights = {init.name: init for init in graph.initializer}
    inputs = _split_inputs(listed, weights)
    maxima = _channel_maxima(model, list(inputs), samples, profile)
    channels = {name: found for name in inputs if name in maxima and (found := _outliers(maxima[name]))}
    if not channels:
        return None
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in listed:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {value.name for value in graph.output}
    nodes: list[onnx.NodeProto] = []
    after: dict[str, list[onnx.NodeProto]] = {}  # tensor -> nodes that must follow its producer
    float_nodes: list[str] = []
    split_nodes: list[str] = []
    masked: dict[str, str] = {}
    split = {id(node) for name in channels for node in inputs[name]}
    replaced = {node.input[1] for name in channels for node in inputs[name]}  # the unsplit weights
    for node in listed:
        if id(node) not in split:
            nodes.append(node)
            nodes += after.pop(node.output[0], []) if node.output else []  # a bias Add's outlier term
            continue
        source = node.input[0]
        picked = channels[source]
        mask_name = f"{source}_outliers_masked"
        if mask_name not in masked:
            nodes += _mask_and_gathers(graph, source, picked, maxima[source].size)
            masked[mask_name] = source
        weight = numpy_helper.to_array(weights[node.input[1]])
        rest = weight.copy()
        rest[list(picked)] = 0.0
        prefix = node.name or node.output[0]
        graph.initializer.append(numpy_helper.from_array(rest, f"{prefix}_inliers_weight"))
        node.input[0], node.input[1] = mask_name, f"{prefix}_inliers_weight"
        nodes.append(node)
        split_nodes.append(prefix)
        # the outlier term joins after the bias Add when the MatMul has one, so MatMul + bias still fuse
        bias = readers.get(node.output[0], [])
        producer = (
            bias[0]
            if len(bias) == 1
            and bias[0].op_type == "Add"
            and any(name in weights for name in bias[0].input)
            and node.output[0] not in graph_outputs
            else node
        )
        target, total = producer.output[0], f"{prefix}_outliers_joined"
        producer.output[0] = total  # the last outlier Add writes `target`, which its readers keep reading
        terms: list[onnx.NodeProto] = []
        for position, channel in enumerate(picked):
            # each channel times its weight row, a broadcast Mul and an Add that OpenVINO fuses
            row, term = f"{prefix}_outliers_weight_{channel}", f"{prefix}_outliers_term_{channel}"
            graph.initializer.append(numpy_helper.from_array(weight[channel].copy(), row))
            summed = target if position == len(picked) - 1 else f"{prefix}_outliers_sum_{channel}"
            float_nodes.append(f"{prefix}_outliers_mul_{channel}")
            terms += [
                onnx.helper.make_node("Mul", [f"{source}_outlier_{channel}", row], [term], name=float_nodes[-1]),
                onnx.helper.make_node("Add", [total, term], [summed], name=f"{prefix}_outliers_add_{channel}"),
            ]  # fmt: skip
            total = summed
        after[producer.output[0]] = terms
        nodes += after.pop(node.output[0], [])
    ordered = [onnx.NodeProto.FromString(node.SerializeToString()) for node in nodes]
    del graph.node[:]
    graph.node.extend(ordered)
    _drop_unread(graph, replaced)
    return OutlierSplit(out, tuple(split_nodes), tuple(float_nodes), masked, channels)


def _mask_and_gathers(
    graph: onnx.GraphProto, source: str, picked: tuple[int, ...], width: int
) -> list[onnx.NodeProto]:
    """The Mul zeroing `picked` channels of `source` and one Gather per picked channel (its initializers
    added to `graph`)."""
    mask = np.ones(width, np.float32)
    mask[list(picked)] = 0.0
    graph.initializer.append(numpy_helper.from_array(mask, f"{source}_outliers_mask"))
    nodes = [onnx.helper.make_node("Mul", [source, f"{source}_outliers_mask"], [f"{source}_outliers_masked"],
                                   name=f"{source}_outliers_mask_mul")]  # fmt: skip
    for channel in picked:
        index = f"{source}_outlier_index_{channel}"
        graph.initializer.append(numpy_helper.from_array(np.asarray([channel], np.int64), index))
        nodes.append(onnx.helper.make_node("Gather", [source, index], [f"{source}_outlier_{channel}"], axis=-1,
                                           name=f"{source}_outlier_gather_{channel}"))  # fmt: skip
    return nodes


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node reads, in `graph` and in the subgraphs of its If/Loop/Scan nodes."""
    read = set()
    for node in graph.node:
        read.update(node.input)
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs] if attribute.HasField("g") else attribute.graphs:
                read |= _read_names(sub)
    return read


def _drop_unread(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the initializers `names` that nothing reads any more."""
    unread = names - _read_names(graph)
    for init in [init for init in graph.initializer if init.name in unread]:
        graph.initializer.remove(init)


def unmask(quantized: onnx.ModelProto, split: OutlierSplit) -> onnx.ModelProto:
    """A copy of the quantized `split` graph whose quantizers read the unmasked tensors: the mask Muls
    removed (each outlier channel saturates its quantizer, and its weight rows are zero)."""
    out = onnx.ModelProto()
    out.CopyFrom(quantized)
    graph = out.graph
    mask_nodes = [node for node in graph.node if node.op_type == "Mul" and node.output[0] in split.masked]
    for node in mask_nodes:
        graph.node.remove(node)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in split.masked:
                node.input[index] = split.masked[name]
    _drop_unread(graph, {f"{source}_outliers_mask" for source in split.masked.values()})
    return out
