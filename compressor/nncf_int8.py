"""NNCF's post-training int8 as OpenVINO candidates: ONNX in, a QDQ ONNX graph out, which our
`openvino` engine reads like any other artifact.

A few NNCF settings are built, not one guessed: the engine choice measures each through OpenVINO by
the task metric on the selection split and times it (engine_choice.py). For a transformer (a graph
ONNX Runtime's transformer fusion recognises: transformer_fusion.py) NNCF gets
`model_type=TRANSFORMER`, which keeps the Softmax/LayerNorm/GELU inputs float, with SmoothQuant
(activation outliers moved into the weights) off, and is built with NNCF's default asymmetric
activations for a transformer and with symmetric ones (OpenVINO's fastest int8 form, less exact).
Before NNCF, the few activation channels that dwarf the rest of a MatMul input are split off into
float terms (outlier_channels.py), so NNCF's per-tensor int8 ranges fit the other channels; its
quantizers then read the unmasked tensors. Then, as for our own int8 for OpenVINO
(openvino_target.py), each node's damage is measured through OpenVINO and the fewest of the worst go
back to float until the budgets are met on the selection split.
One-off probes on the MiniLM encoder through OpenVINO f32 (AMX Xeon, pooled cosine on held-out sentences,
latency of ONNX Runtime fp32): SmoothQuant on at its default alpha 0.979 (alpha 0.5: 0.988, 0.3:
0.986), off 0.9895 at 0.31x; symmetric 0.975 at 0.29x; leaving each block's second feed-forward
MatMul float 0.995 but 0.55x; NNCF's defaults without `model_type` 0.83. On an AMD EPYC (bf16), with
the outlier channels split off: 0.996 with every node int8 (0.989 without). The nodes reading a
weight our own int8 search kept float are NNCF's ignored scope.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from compressor.int8_weights import store_small_floats_fp16
from compressor.onnx_model import constants_to_initializers, name_unnamed_nodes
from compressor.openvino_target import NodeSearch, fewest_float, float_again
from compressor.outlier_channels import split_outliers, unmask
from compressor.passes.base import CompressionContext
from compressor.transformer_fusion import fuse_transformer
from edge_runtime.core.errors import EdgeError

__all__ = ["SLACK_SHARE", "NncfInt8", "nncf_int8"]

SLACK_SHARE = 0.8
"""Share of each budget's slack NNCF's graph may use on the selection split (cosine 0.992 for a 0.99
budget): every node left float costs OpenVINO speed, and a graph the report split refuses passes the
choice on to the next candidate."""


_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclasses.dataclass(frozen=True)
class NncfInt8:
    """One NNCF int8 graph: its bytes, what it was built with, the nodes NNCF was told to leave float."""

    model_bytes: bytes
    label: str
    ignored: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Setting:
    """One NNCF configuration: a label and the keyword arguments beyond data and ignored scope."""

    label: str
    options: Callable[[Any], dict[str, Any]]


class _NncfGraph:
    """NNCF's int8 graph with any subset of its quantized nodes, the others reading float inputs again
    (openvino_target's `NodeSets`, which its per-node search ranks)."""

    def __init__(self, quantized: onnx.ModelProto, original: onnx.ModelProto) -> None:
        self.quantized, self.original = quantized, original
        dequantized = {node.output[0] for node in quantized.graph.node if node.op_type == "DequantizeLinear"}
        # every node NNCF feeds int8: compute nodes, and on a CNN also the Add/Concat/pooling it quantizes
        self.nodes = [
            node.name
            for node in quantized.graph.node
            if node.op_type not in _QDQ and node.name and dequantized & set(node.input)
        ]
        self.built: dict[tuple[str, ...], bytes] = {}

    def build(self, nodes: Sequence[str]) -> bytes:
        """The graph with int8 on `nodes` only; what stays float is stored fp16 (biases too)."""
        key = tuple(sorted(nodes))
        if key not in self.built:
            rest = set(self.nodes) - set(nodes)
            model = _original_biases(float_again(self.quantized, self.original, rest), self.original, rest)
            stored, _ = store_small_floats_fp16(model)
            self.built[key] = stored.SerializeToString()
        return self.built[key]


def _original_biases(model: onnx.ModelProto, original: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """`model` with the original values of the float constants that the nodes `names`, and the Adds
    reading their outputs, read: NNCF's bias correction shifted them for its int8, not for float."""
    float_values = {init.name: init for init in original.graph.initializer}
    outputs = {out for node in model.graph.node if node.name in names for out in node.output}
    read = {
        name
        for node in model.graph.node
        if node.name in names or (node.op_type == "Add" and outputs & set(node.input))
        for name in node.input
    }
    for init in model.graph.initializer:
        if init.name in read and init.name in float_values and init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(float_values[init.name])
    return model


def _no_smooth_quant(nncf: Any) -> dict[str, Any]:
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    off = AdvancedSmoothQuantParameters(matmul=-1)
    return {
        "model_type": nncf.ModelType.TRANSFORMER,
        "advanced_parameters": AdvancedQuantizationParameters(smooth_quant_alphas=off),
    }


TRANSFORMER_SETTINGS = (
    _Setting("transformer, SmoothQuant off", _no_smooth_quant),
    _Setting(
        "transformer, SmoothQuant off, symmetric activations",
        lambda nncf: {**_no_smooth_quant(nncf), "preset": nncf.QuantizationPreset.PERFORMANCE},
    ),
)
"""What is built for a transformer, in this order."""
OTHER_SETTINGS = (
    _Setting("performance preset", lambda _nncf: {}),
    _Setting("mixed preset", lambda nncf: {"preset": nncf.QuantizationPreset.MIXED}),
)
"""What is built for any other model: symmetric int8 activations (OpenVINO's fast form), then
asymmetric ones (better on activations such as ReLU6 outputs that are far from centred)."""


def nncf_int8(
    original: onnx.ModelProto, ctx: CompressionContext, ignored: Sequence[str],
    reference: list[list[np.ndarray]], names: list[str], options: Mapping[str, str],
) -> list[NncfInt8]:  # fmt: skip
    """NNCF's int8 of `original` in each setting for its kind of model, `ignored` left float and then
    the fewest of its worst nodes (their damage measured through OpenVINO with `options`, once) that
    meet the budgets on the selection split; [] without `nncf`. A setting NNCF fails on, or whose
    graph no node set brings within budget, is logged and measured as NNCF wrote it."""
    if importlib.util.find_spec("nncf") is None:
        return []
    model = name_unnamed_nodes(constants_to_initializers(original))  # NNCF reads weights as initializers
    settings = TRANSFORMER_SETTINGS if fuse_transformer(model) is not None else OTHER_SETTINGS
    try:
        split = split_outliers(model, ctx.calibration, ctx.profile)
    except EdgeError as exc:  # a graph ONNX Runtime cannot run: NNCF, which runs it too, logs its own failure
        ctx.log(f"engine choice: NNCF (outlier channels) cannot measure this model: {str(exc)[:200]}")
        split = None
    if split is not None:
        ctx.log(f"  NNCF int8: {split.summary}, channels in all: {sum(map(len, split.channels.values()))}")
    out: list[NncfInt8] = []
    ranking: list[str] = []
    for setting in settings:
        if split is None:
            quantized, floated_graph, extra = _quantize(model, ctx, setting, ignored), model, ""
        else:
            quantized = _quantize(split.model, ctx, setting, [*ignored, *split.float_nodes])
            quantized = None if quantized is None else unmask(quantized, split)
            floated_graph, extra = split.model, f", {split.summary}"
        if quantized is None:
            continue
        graph = _NncfGraph(quantized, floated_graph)
        if set(ranking) != set(graph.nodes):  # the ranking is shared by settings that quantize the same nodes
            ranking = []
        label = f"NNCF int8 ({setting.label}{extra}"
        search = NodeSearch(ctx, options, reference, names, slack=SLACK_SHARE, label=label + ")")
        try:
            count, ranking = fewest_float(search, graph, ranking)
        except EdgeError as exc:
            ctx.log(f"engine choice: OpenVINO cannot run NNCF's int8 ({setting.label}): {str(exc)[:200]}")
            continue
        if count is None:
            ctx.log(f"engine choice: no node set of NNCF's int8 ({setting.label}) meets the budgets")
        kept = ranking[count:] if count else graph.nodes
        floated = tuple(dict.fromkeys([*ignored, *(ranking[:count] if count else ())]))
        text = f"{label}; {len(kept)} of {len(graph.nodes)} nodes int8, {len(floated)} float)"
        out.append(NncfInt8(graph.build(kept), text, floated))
    return out


def _quantize(
    model: onnx.ModelProto, ctx: CompressionContext, setting: _Setting, ignored: Sequence[str]
) -> onnx.ModelProto | None:
    """NNCF's `quantize` in one setting, quietly; None (logged) when NNCF fails on the model."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    try:  # NNCF draws progress bars on stdout: the user's terminal shows our progress only
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return nncf.quantize(
                model,
                nncf.Dataset(list(ctx.calibration)),
                subset_size=len(ctx.calibration),
                ignored_scope=nncf.IgnoredScope(names=list(ignored), validate=False),
                **setting.options(nncf),
            )
    except Exception as exc:  # NNCF failing on a real model is a measured outcome, not a crash
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        ctx.log(f"engine choice: NNCF ({setting.label}) cannot quantize this model: {reason}")
        return None
