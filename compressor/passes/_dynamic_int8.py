"""Dynamic int8 candidates of the int8 search: ONNX Runtime's `quantize_dynamic` (per-channel int8
weights, activations quantized at run time) on transformer and recurrent models.

Two graphs are tried: the model as given, and, for a transformer, the graph ONNX Runtime's own
transformer optimizer fuses (transformer_fusion.py), where attention becomes one `QAttention`.
Each is fitted to the budgets the way static int8 is: the nodes whose int8 costs most signal-to-
noise go back to float compute until the task metrics hold on the selection split (with a margin,
so that the report split, which no choice saw, still meets them), then it is timed interleaved
against the best candidate so far and kept only when faster in every timing run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from compressor.int8_weights import store_small_floats_fp16, store_weights_int8
from compressor.measure import meets_budgets
from compressor.passes._int8_search import Candidate, smallest_passing, sqnr_ranking, tightened
from compressor.transformer_fusion import fuse_transformer

if TYPE_CHECKING:
    from compressor.passes.quantize import _Search

__all__ = ["DYNAMIC_OPS", "DynamicInt8", "dynamic_nodes"]

DYNAMIC_OPS = ("MatMul", "LSTM", "GRU", "Attention")
"""Ops ONNX Runtime's dynamic quantization computes in int8 (activations quantized at run time)."""


def dynamic_nodes(model: onnx.ModelProto, float_weights: frozenset[str]) -> tuple[str, ...]:
    """MatMul/LSTM/GRU/Attention nodes with a constant weight not kept float, when the model looks like
    a transformer (at least four such MatMuls) or a recurrent network; () otherwise."""
    initializers = {init.name for init in model.graph.initializer}
    nodes = [
        node
        for node in model.graph.node
        if node.op_type in DYNAMIC_OPS
        and any(name in initializers and name not in float_weights for name in node.input[1:3])
    ]
    recurrent = any(node.op_type != "MatMul" for node in nodes)
    return tuple(sorted(node.name for node in nodes)) if recurrent or len(nodes) >= 4 else ()


class DynamicInt8:
    """The dynamic int8 candidates of one int8 search (`_Search` measures and times them)."""

    def __init__(self, search: _Search) -> None:
        self.search = search

    def choose(self, best: Candidate, decision: str) -> tuple[Candidate, str]:
        """`best`, or a dynamic int8 candidate that meets the budgets and is clearly faster than it."""
        search = self.search
        if not search.options.dynamic:
            return best, decision
        graphs = [("dynamic int8 (per-channel)", search.model)]
        fused = fuse_transformer(search.model)
        if fused is not None:
            graphs.append(("dynamic int8 on fused attention", fused))
        for label, graph in graphs:
            nodes = dynamic_nodes(graph, search.float_weights)
            if not nodes:
                continue
            candidate = self.fitted(label, graph, nodes)
            if candidate is None:
                continue
            search.time([candidate, best])
            search.ctx.log(
                f"  {candidate.label}: {len(candidate.int8_nodes)} of {len(nodes)} nodes, latency "
                f"x{candidate.latency_ratio:.2f} vs {best.label} x{best.latency_ratio:.2f}"
            )
            if search.clearly_faster(candidate, best):
                best, decision = (
                    candidate,
                    (
                        f"{label} on {len(candidate.int8_nodes)} of {len(nodes)} MatMul/attention/recurrent "
                        f"nodes (faster than {best.label} in each of {len(candidate.per_run)} timing runs, "
                        "within budget); other weights stored int8"
                    ),
                )
        return best, decision

    def fitted(self, label: str, graph: onnx.ModelProto, nodes: tuple[str, ...]) -> Candidate | None:
        """Dynamic int8 on `nodes`, with the fewest most-damaging ones moved back to float so that the
        budgets (with the pass's margin) hold; None when even one node in int8 misses them."""
        search = self.search
        budgets = tightened(search.ctx.profile.budgets, search.options.dynamic_margin)
        source = search.workdir / f"dynamic-source-{len(graph.graph.node)}.onnx"
        onnx.save_model(graph, str(source))
        trials: dict[int, Candidate] = {}
        ranking: list[str] = []

        def passes(count: int) -> bool:
            kept = tuple(name for name in nodes if name not in set(ranking[:count]))
            suffix = f", {count} sensitive nodes float" if count else ""
            trial = trials[count] = search.evaluate_model(f"{label}{suffix}", kept, self.build(source, kept))
            search.record(trial)
            ok, why = meets_budgets(
                trial.fidelity, search.reference_fidelity, budgets, search.options.dynamic_margin
            )
            search.ctx.log(f"  {trial.label}: cosine {trial.fidelity.cosine:.4f}{'' if ok else f' ({why})'}")
            return ok

        if passes(0):
            return trials[0]
        samples = list(search.ctx.validation[:4])
        ranking = sqnr_ranking(
            graph, trials[0].named_model, trials[0].int8_nodes, samples, search.ctx.profile
        )
        count = smallest_passing(len(ranking) - 1, passes)
        return None if count is None else trials[count]

    def build(self, source: Path, nodes: tuple[str, ...]) -> onnx.ModelProto:
        """ORT's dynamic int8 of the graph in `source` on `nodes`; int8 storage for every other weight."""
        search = self.search
        output = search.workdir / "dynamic.onnx"
        quantize_dynamic(
            str(source),
            str(output),
            op_types_to_quantize=list(DYNAMIC_OPS),
            nodes_to_quantize=list(nodes),
            per_channel=True,
            reduce_range=search.ctx.profile.quantization.reduce_range,
            weight_type=QuantType.QInt8,
            # Fused contrib ops have no ONNX shape inference: their outputs are float.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        model, _ = store_weights_int8(
            onnx.load_model(str(output)), skip=search.float_weights, rounding=search.rounding
        )
        model, _ = store_small_floats_fp16(model)
        return model
