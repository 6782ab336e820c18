"""OpenVINO as a compression target: candidates loaded through our `openvino` engine, the static
input shape a fixed-shape data set allows, and our own int8 for it, chosen per node through OpenVINO.

OpenVINO fuses int8 compute only where activations are quantized symmetrically to int8 (measured on
an AMX Xeon, MiniLM: 0.27x of ONNX Runtime fp32 with signed activations, 0.4-0.6x with unsigned, no
faster than its bf16), so its candidate is a QDQ graph written by ONNX Runtime's `quantize_static`
with signed symmetric activations and per-channel weights on the inputs of the Conv/MatMul/Gemm nodes
(never their outputs, which float readers such as residual adds share; embedding tables stored int8,
other float weights fp16). The nodes
whose int8 costs most fidelity go back to float: each node's damage is measured through OpenVINO (the
engine that will run it, which reads QDQ graphs its own way), then the fewest of the worst are left
float so the budgets are met on the selection split.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from compressor.int8_weights import store_small_floats_fp16, store_weights_int8
from compressor.measure import budget_failures, fidelity, run_all
from compressor.onnx_model import preprocess, shrink_names
from compressor.passes._int8_search import COMPUTE_OPS, CalibrationReader, smallest_passing, tightened
from compressor.passes.base import CompressionContext, Samples
from edge_runtime.artifact.manifest import Manifest
from edge_runtime.config.profiles import DeviceProfile
from edge_runtime.core.errors import EdgeError
from edge_runtime.engines.openvino import format_static_shape

__all__ = [
    "NodeSearch",
    "NodeSets",
    "OpenvinoSession",
    "fewest_float",
    "fixed_input_shape",
    "float_again",
    "openvino_int8",
]

PROBE_SAMPLES = 4
"""Selection samples each node's damage is measured on."""
CALIBRATION_SAMPLES = 64
SLACK_SHARE = 0.5
"""Share of each budget's slack a node set may use on the selection split (the fewest float nodes that
fit the full budget there missed it on the report split: detector cosine 0.996 -> 0.970)."""


class OpenvinoSession:
    """Our OpenVINO engine behind the `run(None, feed) -> list` call the measurements use."""

    def __init__(self, model_bytes: bytes, engine_options: Mapping[str, str], profile: DeviceProfile) -> None:
        from edge_runtime.engines.openvino import OpenvinoBackend

        manifest = Manifest(
            name="candidate", version="1", profile=profile.name, engine="openvino",
            model_file="model.onnx", inputs=(), outputs=(), files={},
            engine_options=dict(engine_options),
        )  # fmt: skip
        self._backend = OpenvinoBackend.load(manifest, model_bytes, profile)
        self.precision = self._backend.precision

    def run(self, _names: object, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in the model's order."""
        outputs = self._backend.run(dict(feed))
        return [outputs[spec.name] for spec in self._backend.outputs]


def fixed_input_shape(model: onnx.ModelProto, samples: Sequence[Samples]) -> str:
    """The `static_shape` engine option when every sample of every split feeds each input of a
    dynamic dimension the same shape ('' otherwise): OpenVINO then compiles for that shape."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    dynamic = any(
        not dim.HasField("dim_value") for value in inputs for dim in value.type.tensor_type.shape.dim
    )
    shapes = {
        tuple((value.name, tuple(np.shape(feed[value.name]))) for value in inputs if value.name in feed)
        for split in samples
        for feed in split
    }
    if not dynamic or len(shapes) != 1:
        return ""
    return format_static_shape(dict(next(iter(shapes))))


class NodeSets(Protocol):
    """Int8 graphs for subsets of one set of nodes, the rest left float (what the searches rank)."""

    nodes: list[str]

    def build(self, nodes: Sequence[str]) -> bytes:
        """The model with int8 compute on `nodes` only."""
        ...


class _Builder:
    """Writes QDQ graphs for subsets of the nodes: ONNX Runtime quantizes them all once, and a subset
    is that graph with the other nodes reading their float inputs again."""

    def __init__(self, model: onnx.ModelProto, ctx: CompressionContext) -> None:
        folder = Path(tempfile.mkdtemp(prefix="openvino-int8-", dir=ctx.workdir))
        self.model, _ = preprocess(model, folder)
        initializers = {init.name for init in self.model.graph.initializer}
        self.nodes = [
            node.name
            for node in self.model.graph.node
            if node.op_type in COMPUTE_OPS
            and node.name
            and (node.op_type == "MatMul" or node.input[1] in initializers)
        ]
        self.built: dict[tuple[str, ...], bytes] = {}
        self.quantized = _quantize_all(self.model, self.nodes, ctx, folder) if self.nodes else self.model

    def build(self, nodes: Sequence[str]) -> bytes:
        """The model with int8 compute (signed symmetric activations) on `nodes`."""
        key = tuple(sorted(nodes))
        if key not in self.built:
            model = (
                float_again(self.quantized, self.model, set(self.nodes) - set(nodes)) if nodes else self.model
            )
            # Embedding tables stored int8; the float nodes' weights fp16, not int8: OpenVINO would run
            # an int8-stored weight with its own run-time int8 activations, the damage it was kept from.
            gathered = {node.input[0] for node in model.graph.node if node.op_type == "Gather"}
            stored, _ = store_weights_int8(model, only=frozenset(gathered))
            stored, _ = store_small_floats_fp16(stored)
            self.built[key] = shrink_names(stored).SerializeToString()
        return self.built[key]


def _quantize_all(
    model: onnx.ModelProto, nodes: list[str], ctx: CompressionContext, folder: Path
) -> onnx.ModelProto:
    """ONNX Runtime's static QDQ rewrite of `nodes`: signed symmetric activations, per-channel weights."""
    source, output = folder / "float.onnx", folder / "int8.onnx"
    onnx.save_model(model, str(source))
    quantize_static(
        str(source),
        str(output),
        CalibrationReader(list(ctx.calibration[:CALIBRATION_SAMPLES])),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(COMPUTE_OPS),
        nodes_to_quantize=nodes,
        per_channel=ctx.profile.quantization.per_channel,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            # inputs only: a quantized output would reach the float readers too (residual adds)
            "OpTypesToExcludeOutputQuantization": list(COMPUTE_OPS),
        },
    )
    return onnx.load_model(str(output))


def float_again(quantized: onnx.ModelProto, original: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy where the nodes `names` read float inputs: the tensor before its Quantize/Dequantize pair,
    or their original float weight; pairs no node reads any more are dropped."""
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    originals = {node.name: node for node in original.graph.node}
    float_weights = {init.name: init for init in original.graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.name not in names:
            continue
        for index, tensor in enumerate(node.input):
            dequantize = producer.get(tensor)
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue
            source = dequantize.input[0]
            if source in weights and node.name in originals:
                name = originals[node.name].input[index]
                if name not in weights:
                    weights[name] = float_weights[name]
                    graph.initializer.append(float_weights[name])
                node.input[index] = name
            elif source in producer and producer[source].op_type == "QuantizeLinear":
                node.input[index] = producer[source].input[0]
    _drop_unread(graph)
    return model


def _drop_unread(graph: onnx.GraphProto) -> None:
    """Remove Quantize/DequantizeLinear nodes nothing reads, then the initializers nothing reads."""
    while True:
        read = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
        dead = [
            n
            for n in graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in read
        ]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in read]:
        graph.initializer.remove(init)


class NodeSearch:
    """One search: each candidate compiled and run by OpenVINO, judged against the original."""

    def __init__(
        self, ctx: CompressionContext, options: Mapping[str, str], reference: list[list[np.ndarray]],
        names: list[str], slack: float = SLACK_SHARE, label: str = "OpenVINO int8",
    ) -> None:  # fmt: skip
        self.ctx, self.options, self.reference, self.names = ctx, dict(options), reference, names
        self.slack, self.label = slack, label

    def outputs(self, model_bytes: bytes, samples: Samples) -> list[list[np.ndarray]]:
        """The candidate's outputs through OpenVINO."""
        return run_all(OpenvinoSession(model_bytes, self.options, self.ctx.profile), samples)

    def failures(self, model_bytes: bytes, count: int) -> list[str]:
        """The budgets the candidate (int8 on `count` nodes) misses on the whole selection split."""
        result = fidelity(self.reference, self.outputs(model_bytes, self.ctx.validation), self.ctx.labels,
                          names=self.names, tasks=self.ctx.tasks)  # fmt: skip
        failures = budget_failures(result, tightened(self.ctx.profile.budgets, self.slack), self.slack)
        precision = self.options.get("inference_precision", "f32")
        self.ctx.log(f"  {self.label} ({precision}) on {count} nodes: cosine {result.cosine:.4f}"
                     + (f", misses the budget ({failures[0]})" if failures else ""))  # fmt: skip
        return failures

    def damage(self, builder: NodeSets) -> dict[str, float]:
        """Per node, how much output cosine on the probe samples is recovered by leaving it float."""
        probe = list(self.ctx.validation[:PROBE_SAMPLES])
        reference = self.reference[:PROBE_SAMPLES]
        full = fidelity(reference, self.outputs(builder.build(builder.nodes), probe)).cosine
        damage = {}
        for name in builder.nodes:
            rest = [node for node in builder.nodes if node != name]
            damage[name] = fidelity(reference, self.outputs(builder.build(rest), probe)).cosine - full
        return damage


def fewest_float(search: NodeSearch, builder: NodeSets, ranking: list[str]) -> tuple[int | None, list[str]]:
    """How many of the worst nodes must stay float for the rest in int8 to meet the budgets on the
    selection split (0 when all may be int8; None when no count does), and the nodes worst first:
    `ranking`, or when that is empty and needed, each node's damage measured through OpenVINO."""
    total = len(builder.nodes)
    if not search.failures(builder.build(builder.nodes), total):
        return 0, ranking
    if not ranking:
        search.ctx.log(f"  {search.label}: measuring each of {total} nodes' damage through OpenVINO")
        damage = search.damage(builder)
        ranking = sorted(builder.nodes, key=lambda name: (-damage[name], name))  # worst first
    passes = functools.cache(functools.partial(_passes, search, builder, ranking))
    if total < 2 or not passes(total - 1):  # not even the least damaging node alone: no count passes
        return None, ranking
    return smallest_passing(total - 1, passes), ranking


def _passes(search: NodeSearch, builder: NodeSets, ranking: list[str], count: int) -> bool:
    """Whether int8 on all but the `count` most damaging nodes meets the budgets."""
    return not search.failures(builder.build(ranking[count:]), len(ranking) - count)


def openvino_int8(
    model: onnx.ModelProto, ctx: CompressionContext, reference: list[list[np.ndarray]], names: list[str],
    option_sets: Sequence[Mapping[str, str]],
) -> list[tuple[bytes, str, dict[str, str]]]:  # fmt: skip
    """Our int8 for OpenVINO within budget on the selection split, for each of `option_sets` (precision
    hints) where some node set meets the budgets: bytes, label, engine options (the engine choice
    times them); at bf16 the float graph with fp16-stored weights too. Each node's damage is measured
    once, with the first options that need it."""
    try:
        builder = _Builder(model, ctx)
    except (EdgeError, ValueError, RuntimeError) as exc:
        ctx.log(f"engine choice: no OpenVINO int8 candidate: {str(exc)[:200]}")
        return []
    total, ranking, found = len(builder.nodes), list[str](), []
    try:
        for options in option_sets if builder.nodes else ():
            search = NodeSearch(ctx, options, reference, names)
            if options.get("inference_precision") == "bf16" and not search.failures(builder.build([]), 0):
                # bf16 compute on the float graph (weights stored fp16, embeddings int8) is a candidate
                found.append(
                    (builder.build([]), "our float graph for OpenVINO (fp16 weights)", dict(options))
                )
            count, ranking = fewest_float(search, builder, ranking)
            if count is not None:
                chosen = ranking[count:] if ranking else builder.nodes
                label = f"our int8 for OpenVINO, {total - count} of {total} nodes"
                found.append((builder.build(chosen), label, dict(options)))
    except EdgeError as exc:
        ctx.log(f"engine choice: OpenVINO cannot run our int8: {str(exc)[:200]}")
    if builder.nodes and not found:
        ctx.log("engine choice: no OpenVINO int8 node set meets the budgets")
    return found
