"""Helpers of the int8 search: which nodes to quantize, their work, the count search, and SQNR."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader

from compressor.measure import Fidelity, make_session
from compressor.passes.base import Samples
from edge_runtime.config.profiles import Budgets, DeviceProfile

__all__ = [
    "COMPUTE_OPS",
    "CalibrationReader",
    "Candidate",
    "node_macs",
    "quantizable_nodes",
    "smallest_passing",
    "sqnr",
    "sqnr_ranking",
    "tensor_values",
    "tightened",
]

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")


@dataclass
class Candidate:
    """One measured configuration."""

    label: str
    int8_nodes: tuple[str, ...]
    model: onnx.ModelProto
    """The artifact: names shortened, ready to ship."""
    named_model: onnx.ModelProto
    """The same graph with the original tensor names (for per-tensor error measurement)."""
    session: ort.InferenceSession
    size: int
    fidelity: Fidelity
    outputs: list[list[np.ndarray]] = field(default_factory=list)
    """Its outputs on the selection split."""
    latency_ratio: float | None = None
    """Median latency relative to the pass's input model, timed interleaved (None: never timed)."""
    per_run: list[float] = field(default_factory=list)
    """Latency ratio of each timing run (shared with the candidates timed beside it)."""

    def row(self) -> dict[str, Any]:
        """The candidate as one line of the report."""
        return {
            "label": self.label,
            "int8_compute_nodes": len(self.int8_nodes),
            "bytes": self.size,
            "latency_ratio": self.latency_ratio,
            **self.fidelity.to_dict(),
        }


class CalibrationReader(CalibrationDataReader):
    """ORT calibration reader over a list of feeds."""

    def __init__(self, samples: Samples) -> None:
        self._iterator: Iterator[Any] = iter(samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return dict(next(self._iterator, None) or {}) or None


def quantizable_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv/MatMul/Gemm nodes whose weight is an initializer."""
    initializers = {init.name for init in model.graph.initializer}
    return [
        node
        for node in model.graph.node
        if node.op_type in COMPUTE_OPS and len(node.input) > 1 and node.input[1] in initializers
    ]


def node_macs(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto], feed: dict[str, np.ndarray], profile: DeviceProfile
) -> dict[str, float]:
    """Multiply-accumulates of each node on one real sample (output size x reduction length)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {out.name for out in probe.graph.output}
    for node in nodes:
        if node.output[0] not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.output[0]))
    session = make_session(probe.SerializeToString(), profile)
    names = [out.name for out in session.get_outputs()]
    values = dict(zip(names, session.run(None, feed), strict=True))
    weights = {init.name: init for init in model.graph.initializer}
    macs = {}
    for node in nodes:
        dims = list(weights[node.input[1]].dims)
        if node.op_type == "Conv":
            reduction = int(np.prod(dims[1:]))  # Cin/group * kH * kW
        elif node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            reduction = dims[1]
        else:
            reduction = dims[-2] if len(dims) >= 2 else dims[0]
        macs[node.name] = float(values[node.output[0]].size) * reduction
    return macs


def _doubling(limit: int) -> list[int]:
    """1, 2, 4, ... up to and including `limit`."""
    counts = [1 << i for i in range(max(limit, 1).bit_length()) if (1 << i) < limit]
    return [*counts, limit] if limit else []


def smallest_passing(limit: int, passes: Callable[[int], bool]) -> int | None:
    """The smallest k in 1..limit with passes(k) (assumed monotonic): doubling, then bisection.
    None when passes(limit) is false."""
    low, high = 0, None
    for count in _doubling(limit):
        if passes(count):
            high = count
            break
        low = count
    if high is None:
        return None
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high


def tensor_values(
    model: onnx.ModelProto, tensors: list[str], samples: Samples, profile: DeviceProfile
) -> dict[str, list[np.ndarray]]:
    """Values of intermediate tensors (those the model has) over a few samples."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    produced = {out for node in probe.graph.node for out in node.output} | {i.name for i in probe.graph.input}
    existing = {out.name for out in probe.graph.output}
    wanted = [name for name in tensors if name in produced]
    for name in wanted:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = make_session(probe.SerializeToString(), profile)
    names = [out.name for out in session.get_outputs()]
    values: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    for feed in samples:
        for name, value in zip(names, session.run(None, dict(feed)), strict=True):
            if name in values:
                values[name].append(value)
    return values


def sqnr(reference: list[np.ndarray] | None, noisy: list[np.ndarray] | None) -> float:
    """Signal-to-quantization-noise ratio in dB; +inf when identical or not measurable."""
    if not reference or not noisy:
        return math.inf
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    noise = sum(float(np.sum((r.astype(np.float64) - n) ** 2)) for r, n in zip(reference, noisy, strict=True))
    return math.inf if noise == 0 or signal == 0 else 10 * math.log10(signal / noise)


def sqnr_ranking(
    float_model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    nodes: Sequence[str],
    samples: Samples,
    profile: DeviceProfile,
) -> list[str]:
    """`nodes` (names in `float_model`, whose tensors `quantized` keeps), the one whose int8 costs most
    signal-to-noise first: its output's SQNR (dB) against its input's, on `samples`."""
    by_name = {node.name: node for node in float_model.graph.node}
    tensors = sorted({t for name in nodes for t in (by_name[name].input[0], by_name[name].output[0])})
    float_values = tensor_values(float_model, tensors, samples, profile)
    quant_values = tensor_values(quantized, tensors, samples, profile)
    damage = {}
    for name in nodes:
        node = by_name[name]
        sqnr_in = sqnr(float_values.get(node.input[0]), quant_values.get(node.input[0]))
        sqnr_out = sqnr(float_values.get(node.output[0]), quant_values.get(node.output[0]))
        damage[name] = sqnr_in - sqnr_out if math.isfinite(sqnr_in) else 100.0 - sqnr_out
    return sorted(nodes, key=lambda name: (-damage[name], name))


def tightened(budgets: Budgets, share: float) -> Budgets:
    """`budgets` with only `share` of their fidelity slack: a drop of share x the accuracy budget,
    a cosine 1 - share x (1 - the cosine budget)."""
    return replace(
        budgets,
        max_accuracy_drop_pp=budgets.max_accuracy_drop_pp * share,
        min_output_cosine=1.0 - (1.0 - budgets.min_output_cosine) * share,
    )
