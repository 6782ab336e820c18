"""Static int8 quantization, decided per node by measurement.

ONNX Runtime's `quantize_static` does the rewriting; this pass decides *what* it rewrites:

1. Every Conv/MatMul/Gemm weight is stored as int8 (see int8_weights.py), rounded by GPTQ on the
   calibration activations (rounding.py). With all compute left in float this "weight-only"
   candidate is ~4x smaller and exactly as fast as fp32: the fallback. If it misses a budget, the
   weights that do most damage alone (measured on the selection samples it hurts most) stay fp16.
   Then as many weights as keep the task metrics within half the budgets' slack go to 4 bits.
2. Int8 *compute* pays only where a node does enough work to amortize its Quantize/Dequantize
   pair. Candidates quantize the nodes above a multiply-accumulate threshold (all, top 50%, ...);
   element-wise ops (Add/Mul of squeeze-excite and hard-swish blocks) are never quantized.
3. Each candidate that is faster than the weight-only model gets the nodes that lose most accuracy
   (ranked by how much signal-to-noise they cost, measured once) moved back to float until it
   meets the profile's budgets.
4. The fastest candidate within budget wins; if none is faster than fp32, weight-only wins.
   "Faster" means faster by `speedup_required` in every one of several interleaved timing runs.
5. On transformer and recurrent models (MatMul-heavy, LSTM/GRU), ONNX Runtime's dynamic int8
   (per-channel weights, activations quantized at run time) is measured too, also on the graph ORT's
   transformer optimizer fuses, fitted and kept on the same terms (_dynamic_int8.py).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from compressor.int4_weights import store_weights_int4
from compressor.int8_weights import store_small_floats_fp16, store_weights_int8
from compressor.measure import fidelity, make_session, meets_budgets, run_all, timed_ratios
from compressor.onnx_model import shrink_names
from compressor.passes._dynamic_int8 import DynamicInt8
from compressor.passes._int8_search import (
    COMPUTE_OPS,
    CalibrationReader,
    Candidate,
    node_macs,
    quantizable_nodes,
    smallest_passing,
    sqnr_ranking,
    tightened,
)
from compressor.passes.base import CompressionContext, PassResult
from compressor.rounding import Rounding
from edge_runtime.config.profiles import Budgets, QuantDtype
from edge_runtime.core.errors import BudgetError, ModelError, UsageError

__all__ = ["Int8Options", "Int8Quantization"]

ABSORBED_OPS = ("Relu", "Clip")
"""Activations the int8 kernels fold into the preceding node's requantization."""
MAC_FRACTIONS = (1.0, 0.5, 0.25, 0.1)
PROBE_SAMPLES = 4
"""Selection samples each weight's damage is measured on (one session per weight and sample)."""
"""Candidate int8 sets: the nodes holding this share of the heaviest MACs."""


@dataclass(frozen=True)
class Int8Options:
    """Knobs of the int8 pass."""

    calibrate_method: str = "MinMax"
    """ONNX Runtime calibration method: MinMax, Entropy or Percentile."""
    calibration_samples: int = 64
    """At most this many calibration samples are used."""
    speedup_required: float = 0.95
    """Int8 compute is kept only if at most this share of the weight-only model's latency."""
    allow_int8_compute: bool = True
    dynamic: bool = True
    """Also measure ONNX Runtime's dynamic int8 (per-channel) on transformer and recurrent models, on
    the graph as given and on the one ONNX Runtime's transformer optimizer fuses."""
    dynamic_margin: float = 0.8
    """Share of each budget's slack a dynamic int8 candidate may use on the selection split."""
    storage_margin: float = 0.5
    """Share of each budget's slack the weights kept float are chosen to leave used on the selection
    split (when int8 storage of every weight misses a budget), so the report split still meets it."""
    rounding: str = "gptq"
    """How weights are rounded to int8/int4: "gptq" (error-compensating, on the calibration
    activations) or "nearest"."""
    rounding_samples: int = 16
    """Calibration samples whose layer inputs make GPTQ's Hessians."""
    int4: bool = True
    """Store at 4 bits (GPTQ-rounded) the weights whose 4-bit storage keeps the task metrics within
    `int4_margin` of the budgets on the selection split; the most sensitive stay int8."""
    int4_min_samples: int = 30
    """4-bit storage is tried only on a selection split of at least this many samples: on fewer,
    one sample moves a share by more than the budget, and 4-bit damage passes unseen."""
    int4_margin: float = 0.5
    """Share of each budget's slack (accuracy drop, 1 - cosine) a 4-bit candidate may use on the
    selection split, so that the report split, which it never saw, still meets the full budget."""


class Int8Quantization:
    """The int8 pass: weight storage always, int8 compute where measured to pay."""

    name = "int8"

    def __init__(self, options: Int8Options | None = None) -> None:
        self.options = options or Int8Options()

    def supports(self, model: onnx.ModelProto) -> bool:
        """Any Conv/MatMul/Gemm with a constant weight, or any weight int8 storage applies to."""
        return bool(quantizable_nodes(model)) or store_weights_int8(model)[1].tensors > 0

    def run(self, model: onnx.ModelProto, ctx: CompressionContext) -> PassResult:
        """Search per-node int8 configurations and return the best one within budget."""
        search = _Search(model, ctx, self.options)
        chosen, rows, decision = search.run()
        report = {
            "pass": self.name,
            "scheme": ctx.profile.quantization.name,
            "reduce_range": ctx.profile.quantization.reduce_range,
            "per_channel": ctx.profile.quantization.per_channel,
            "calibrate_method": self.options.calibrate_method,
            "quantizable_nodes": len(search.nodes),
            "int8_compute_nodes": list(chosen.int8_nodes),
            "float_compute_nodes": [n.name for n in search.nodes if n.name not in set(chosen.int8_nodes)],
            "weights_kept_float": sorted(search.float_weights),
            "chosen": chosen.label,
            "decision": decision,
            "candidates": rows,
            "bytes_before": search.input_size,
            "bytes_after": chosen.size,
            "latency_ratio": chosen.latency_ratio,
            "fidelity": chosen.fidelity.to_dict(),
        }
        return PassResult(model=chosen.model, report=report)


class _Search:
    """State of one int8 search: reference outputs, calibration cache, measured candidates."""

    def __init__(self, model: onnx.ModelProto, ctx: CompressionContext, options: Int8Options) -> None:
        self.model, self.ctx, self.options = model, ctx, options
        self.workdir = Path(tempfile.mkdtemp(prefix="int8-", dir=ctx.workdir))
        self.model_path = self.workdir / "float.onnx"
        onnx.save_model(model, str(self.model_path))
        self.input_size = self.model_path.stat().st_size
        self.nodes = quantizable_nodes(model)
        self.reference_session = make_session(model.SerializeToString(), ctx.profile)
        self.reference = run_all(self.reference_session, ctx.validation)
        self.reference_fidelity = ctx.fidelity(self.reference, self.reference)
        self.rows: dict[str, dict[str, Any]] = {}
        """One row per candidate label, the latest measurement of it."""
        self.cache_path = self.workdir / "calibration.json"
        self.timing_feed = dict(ctx.validation[0])
        self.int4_weights: frozenset[str] = frozenset()
        """Weights stored at 4 bits (their damage measured within budget)."""
        self.float_weights: frozenset[str] = frozenset()
        """Weights kept float because int8 storage of them cost too much fidelity."""
        self.rounding: Rounding | None = None
        if options.rounding == "gptq":
            samples = list(ctx.calibration[: options.rounding_samples])
            self.rounding = Rounding.measured(model, samples, ctx.profile, ctx.seed)
        elif options.rounding != "nearest":
            raise UsageError(f"int8 option rounding={options.rounding!r}: choose gptq or nearest")
        self.probe: list[int] = list(range(min(PROBE_SAMPLES, len(ctx.validation))))
        """Selection samples on which each weight's damage is measured: those int8 hurts most."""

    def run(self) -> tuple[Candidate, list[dict[str, Any]], str]:
        """Measure the candidates and choose one; rows are every candidate measured, once each."""
        log = self.ctx.log
        weight_only = self.evaluate("weight-only int8", ())
        self.probe = self.hardest_samples(weight_only)
        self.time([weight_only])
        ok, why = meets_budgets(weight_only.fidelity, self.reference_fidelity, self.ctx.profile.budgets)
        log(
            f"  weight-only int8: {weight_only.size} bytes, latency x{weight_only.latency_ratio:.2f}, "
            f"cosine {weight_only.fidelity.cosine:.4f}"
        )
        if not ok:
            log(f"  weight-only int8 misses the budget ({why}): finding the weights to keep float")
            weight_only = self.fit_weight_storage()
            self.time([weight_only])
        int4 = self.fit_int4(weight_only)
        if int4 is not weight_only:
            weight_only = int4
            self.time([weight_only])
        best, decision = (
            weight_only,
            "int8 compute was not clearly faster than float compute; weights stored int8",
        )
        if not self.options.allow_int8_compute:
            return best, list(self.rows.values()), "int8 compute disabled"
        for candidate in self.fast_candidates(weight_only) if self.nodes else []:
            fitted = self.fit_to_budget(candidate)
            if fitted is None:
                continue
            self.time([fitted, weight_only])
            log(
                f"  {fitted.label}: latency x{fitted.latency_ratio:.2f} vs weight-only x{weight_only.latency_ratio:.2f}"
            )
            if self.clearly_faster(fitted, weight_only):
                best = fitted
                decision = (
                    f"int8 compute on {len(fitted.int8_nodes)} of {len(self.nodes)} nodes (faster than "
                    f"weight-only in each of {len(fitted.per_run)} timing runs, within budget); "
                    "the rest compute in float with int8 weights"
                )
                break
        best, decision = DynamicInt8(self).choose(best, decision)
        return best, list(self.rows.values()), decision

    def fit_int4(self, storage: Candidate) -> Candidate:
        """Store at 4 bits as many weights as the budgets allow (the least sensitive first, each
        weight's damage measured alone); the rest stay int8. Returns `storage` when none can."""
        _, stored = store_weights_int8(self.model, skip=self.float_weights)
        eligible = store_weights_int4(self.model, only=frozenset(stored.names))[1].names
        if not (self.options.int4 and eligible):
            return storage
        if len(self.ctx.validation) < self.options.int4_min_samples:
            self.ctx.log(
                f"  4-bit weights not tried: {len(self.ctx.validation)} selection samples, "
                f"fewer than {self.options.int4_min_samples} (give more --validation data)"
            )
            return storage
        probe, reference = self.probe_feeds()
        damage = {}
        for name in eligible:
            single, _ = store_weights_int4(self.model, only=frozenset({name}), rounding=self.rounding)
            try:
                outputs = run_all(make_session(single.SerializeToString(), self.ctx.profile), probe)
            except ModelError as exc:  # an ORT graph optimizer that trips over the rebuild nodes
                self.ctx.log(f"  {name} stays int8: its 4-bit rebuild does not load ({exc})"[:200])
                continue
            damage[name] = 1.0 - fidelity(reference, outputs).cosine
        ranking = sorted(damage, key=lambda name: (-damage[name], name))  # most damaging first
        if not ranking:
            return storage
        budgets, trials = (
            tightened(self.ctx.profile.budgets, self.options.int4_margin),
            dict[int, Candidate](),
        )

        def passes(kept: int) -> bool:
            self.int4_weights = frozenset(ranking[kept:])
            try:
                trial = trials[kept] = self.evaluate(f"int4 weights, {kept} most sensitive int8", ())
            except ModelError:
                return False
            self.record(trial)
            return meets_budgets(trial.fidelity, self.reference_fidelity, budgets, self.options.int4_margin)[
                0
            ]

        kept = 0 if passes(0) else smallest_passing(len(ranking), passes)
        if kept is None or kept == len(ranking):
            self.int4_weights = frozenset()
            return storage
        self.int4_weights = frozenset(ranking[kept:])
        chosen = trials[kept]
        self.ctx.log(
            f"  {len(self.int4_weights)} of {len(ranking)} weights stored at 4 bits: {chosen.size} bytes"
        )
        return chosen

    def fit_weight_storage(self) -> Candidate:
        """Keep float (fp16-stored) the weights whose int8 storage costs most fidelity, so the budgets
        are met with `storage_margin` of their slack: weights ranked by the damage each does alone,
        and again by that damage per element (many small early weights whose errors compound cost
        few bytes), the count searched in each order; the smaller passing artifact is kept."""
        _, storage = store_weights_int8(self.model)
        probe, reference = self.probe_feeds()
        elements = {init.name: max(1, int(np.prod(init.dims))) for init in self.model.graph.initializer}
        damage = {}
        for name in storage.names:
            single, _ = store_weights_int8(self.model, only=frozenset({name}), rounding=self.rounding)
            outputs = run_all(make_session(single.SerializeToString(), self.ctx.profile), probe)
            damage[name] = 1.0 - fidelity(reference, outputs).cosine
        orders = {
            "most damaging": sorted(storage.names, key=lambda name: (-damage[name], name)),
            "most damaging per element": sorted(storage.names, key=lambda n: (-damage[n] / elements[n], n)),
        }
        best: tuple[frozenset[str], Candidate] | None = None
        measured: dict[
            frozenset[str], Candidate
        ] = {}  # a float set measured once, whatever the order or margin
        margin = self.options.storage_margin
        budgets = tightened(self.ctx.profile.budgets, margin)
        for relax in (False, True):
            if relax:  # even fp16 everywhere uses more slack than the margin leaves: the plain budgets
                margin, budgets = 1.0, self.ctx.profile.budgets
            for order, ranking in orders.items():
                found = self._kept_float(ranking, order, budgets, margin, measured)
                if found is not None and (best is None or found[1].size < best[1].size):
                    best = found
            if best is not None or margin >= 1.0:
                break
        if best is None:
            self.float_weights = frozenset(storage.names)  # smallest_passing tried it, unless there are none
            everything = measured.get(self.float_weights) or self.evaluate(
                "weight-only int8, every weight float", ()
            )
            why = meets_budgets(everything.fidelity, self.reference_fidelity, self.ctx.profile.budgets)[1]
            raise BudgetError(f"even int8 weight storage with float compute misses the budget: {why}")
        self.float_weights = best[0]
        return best[1]

    def _kept_float(
        self,
        ranking: list[str],
        order: str,
        budgets: Budgets,
        margin: float,
        measured: dict[frozenset[str], Candidate],
    ) -> tuple[frozenset[str], Candidate] | None:
        """The fewest leading weights of `ranking` kept float that meet `budgets`, with their candidate
        (each float set evaluated once: `measured` holds them)."""
        trials: dict[int, Candidate] = {}

        def passes(count: int) -> bool:
            self.float_weights = kept = frozenset(ranking[:count])
            if kept not in measured:
                measured[kept] = self.evaluate(f"weight-only int8, {count} {order} weights float", ())
                self.record(measured[kept])
            trial = trials[count] = measured[kept]
            ok, why = meets_budgets(trial.fidelity, self.reference_fidelity, budgets, margin)
            self.ctx.log(f"  {trial.label}: {trial.size} bytes, " + ("within budget" if ok else why))
            return ok

        count = smallest_passing(len(ranking), passes)
        return None if count is None else (frozenset(ranking[:count]), trials[count])

    def fast_candidates(self, weight_only: Candidate) -> list[Candidate]:
        """Int8 sets by MAC share, timed; those not clearly faster than weight-only are dropped. Nodes
        whose weight already proved too sensitive for int8 storage are never candidates."""
        macs = node_macs(self.model, self.nodes, self.timing_feed, self.ctx.profile)
        eligible = [node for node in self.nodes if node.input[1] not in self.float_weights]
        ordered = sorted(eligible, key=lambda node: (-macs[node.name], node.name))
        total = sum(macs.values()) or 1.0
        seen: set[tuple[str, ...]] = set()
        fast = []
        for share in MAC_FRACTIONS:
            chosen, running = [], 0.0
            for node in ordered:
                if running >= share * total - 1e-9:
                    break
                chosen.append(node.name)
                running += macs[node.name]
            key = tuple(sorted(chosen))
            if not key or key in seen:
                continue
            seen.add(key)
            candidate = self.evaluate(f"int8 compute, top {share:.0%} MACs", key)
            self.time([candidate, weight_only])
            self.ctx.log(
                f"  {candidate.label}: {len(key)} nodes, latency x{candidate.latency_ratio:.2f}, "
                f"cosine {candidate.fidelity.cosine:.4f}"
            )
            if self.clearly_faster(candidate, weight_only):
                fast.append(candidate)
        return sorted(fast, key=lambda c: (c.latency_ratio or math.inf, c.label))

    def fit_to_budget(self, candidate: Candidate) -> Candidate | None:
        """Move the most damaging nodes back to float until the candidate meets the budgets."""
        budgets = self.ctx.profile.budgets
        if meets_budgets(candidate.fidelity, self.reference_fidelity, budgets)[0]:
            return candidate
        ranking = self.damage_ranking(candidate)
        trials: dict[int, Candidate] = {}

        def passes(count: int) -> bool:
            kept = tuple(name for name in candidate.int8_nodes if name not in set(ranking[:count]))
            trial = trials[count] = self.evaluate(f"{candidate.label}, {count} sensitive nodes float", kept)
            self.record(trial)
            return meets_budgets(trial.fidelity, self.reference_fidelity, budgets)[0]

        count = smallest_passing(len(ranking) - 1, passes)
        return None if count is None else trials[count]

    def damage_ranking(self, candidate: Candidate) -> list[str]:
        """Int8 nodes ordered by the signal-to-noise (dB) they cost, measured on a few samples."""
        samples = list(self.ctx.validation[:4])
        return sqnr_ranking(
            self.model, candidate.named_model, candidate.int8_nodes, samples, self.ctx.profile
        )

    def evaluate(self, label: str, int8_nodes: tuple[str, ...]) -> Candidate:
        """Build a static candidate and measure its size and fidelity (not its latency)."""
        return self.evaluate_model(label, int8_nodes, self.build(int8_nodes))

    def evaluate_model(self, label: str, int8_nodes: tuple[str, ...], named: onnx.ModelProto) -> Candidate:
        """Measure a built candidate's size and fidelity (not its latency)."""
        model = shrink_names(named)
        model_bytes = model.SerializeToString()
        session = make_session(model_bytes, self.ctx.profile)
        outputs = run_all(session, self.ctx.validation)
        result = self.ctx.fidelity(self.reference, outputs)
        return Candidate(label, int8_nodes, model, named, session, len(model_bytes), result, outputs)

    def hardest_samples(self, candidate: Candidate) -> list[int]:
        """The PROBE_SAMPLES selection samples on which `candidate` scores worst (its lowest task
        score on each sample alone): where a weight's damage shows, so that ranking sees it."""
        scores = []
        for index, (reference, outputs) in enumerate(zip(self.reference, candidate.outputs, strict=True)):
            single = self.ctx.fidelity([reference], [outputs], labels=False)
            scores.append((min((s.value for s in single.tasks), default=1.0), index))
        return sorted(index for _, index in sorted(scores)[:PROBE_SAMPLES])

    def probe_feeds(self) -> tuple[list[dict[str, np.ndarray]], list[list[np.ndarray]]]:
        """The probe samples and the reference outputs on them."""
        feeds = [dict(self.ctx.validation[i]) for i in self.probe]
        return feeds, [self.reference[i] for i in self.probe]

    def build(self, int8_nodes: tuple[str, ...]) -> onnx.ModelProto:
        """The model with int8 compute on `int8_nodes` and int8 storage for every other weight."""
        model = self.model
        if int8_nodes:
            model = self.quantize(int8_nodes)
        model, _ = store_weights_int4(model, only=self.int4_weights, rounding=self.rounding)
        model, _ = store_weights_int8(model, skip=self.float_weights, rounding=self.rounding)
        model, _ = store_small_floats_fp16(model)
        return model

    def quantize(self, int8_nodes: tuple[str, ...]) -> onnx.ModelProto:
        """ORT static QDQ quantization restricted to `int8_nodes` (+ the activations they absorb)."""
        scheme = self.ctx.profile.quantization
        types = {QuantDtype.INT8: QuantType.QInt8, QuantDtype.UINT8: QuantType.QUInt8}
        output = self.workdir / "candidate.onnx"
        calibration = list(self.ctx.calibration[: self.options.calibration_samples])
        if not self.cache_path.exists():  # calibrate every candidate tensor once, reuse for all subsets
            quantize_static(
                str(self.model_path),
                str(output),
                CalibrationReader(calibration),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=[*COMPUTE_OPS, *ABSORBED_OPS],
                nodes_to_quantize=self.all_nodes_with_absorbed(),
                per_channel=scheme.per_channel,
                reduce_range=scheme.reduce_range,
                activation_type=types[scheme.activation_type],
                weight_type=types[scheme.weight_type],
                calibrate_method=CalibrationMethod[self.options.calibrate_method],
                calibration_cache_path=str(self.cache_path),
                extra_options=self.extra_options(),
            )
        quantize_static(
            str(self.model_path),
            str(output),
            None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=[*COMPUTE_OPS, *ABSORBED_OPS],
            nodes_to_quantize=self.with_absorbed(int8_nodes),
            per_channel=scheme.per_channel,
            reduce_range=scheme.reduce_range,
            activation_type=types[scheme.activation_type],
            weight_type=types[scheme.weight_type],
            calibrate_method=CalibrationMethod[self.options.calibrate_method],
            calibration_cache_path=str(self.cache_path),
            extra_options=self.extra_options(),
        )
        return onnx.load_model(str(output))

    def extra_options(self) -> dict[str, Any]:
        """ORT options implied by the profile's scheme."""
        symmetric = self.ctx.profile.quantization.activation_type is QuantDtype.INT8
        return {"ActivationSymmetric": symmetric, "WeightSymmetric": True}

    def all_nodes_with_absorbed(self) -> list[str]:
        """Every candidate node plus the activations it can absorb."""
        return self.with_absorbed(tuple(node.name for node in self.nodes))

    def with_absorbed(self, names: tuple[str, ...]) -> list[str]:
        """`names` plus the Relu/Clip nodes directly consuming their outputs."""
        chosen = set(names)
        outputs = {node.output[0] for node in self.model.graph.node if node.name in chosen}
        absorbed = [
            node.name
            for node in self.model.graph.node
            if node.op_type in ABSORBED_OPS and node.input and node.input[0] in outputs
        ]
        return sorted(chosen) + absorbed

    def time(self, candidates: list[Candidate]) -> None:
        """Set each candidate's latency ratio against the input model: several interleaved runs."""
        timing = timed_ratios(self.reference_session, [c.session for c in candidates], self.timing_feed)
        for index, candidate in enumerate(candidates):
            candidate.latency_ratio = timing.ratios[index]
            candidate.per_run = timing.per_run[index]
            self.record(candidate)

    def record(self, candidate: Candidate) -> None:
        """Keep the candidate's latest row, in first-measured order (a label appears once)."""
        self.rows[candidate.label] = candidate.row()

    def clearly_faster(self, candidate: Candidate, than: Candidate) -> bool:
        """Faster by the required margin in every timing run they shared: not noise."""
        pairs = list(zip(candidate.per_run, than.per_run, strict=True))
        return bool(pairs) and all(c <= self.options.speedup_required * t for c, t in pairs)
