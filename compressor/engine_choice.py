"""Engine choice by measurement (issue 14): for a profile that lists several engines, run the
compressed ONNX artifact through each one installed here, add OpenVINO's own candidates (our int8 for
it, its nodes chosen through OpenVINO, and the float graph at bf16: compressor/openvino_target.py; NNCF's
post-training int8 in a few settings, our sensitive weights as its ignored scope, when `nncf` is
installed: compressor/nncf_int8.py), compiled
for the data's one input shape when they have one, and keep the fastest candidate whose task metrics
and size meet the budgets.

Every choice is made on the selection split and timed interleaved against the original model on
ONNX Runtime, in repeated runs; the profile's preferred engine (the first listed) is left only for a
candidate faster than it in every run by `MARGIN`, so noise never changes the engine. The report
split gives the chosen candidate's reported fidelity and the golden outputs come from the chosen
engine, since the device's self-test runs there.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from compressor.data import Dataset
from compressor.measure import budget_failures, fidelity, make_session, run_all, timed_ratios
from compressor.nncf_int8 import nncf_int8
from compressor.openvino_target import OpenvinoSession, fixed_input_shape, openvino_int8
from compressor.passes.base import CompressionContext
from edge_runtime.artifact.golden import GoldenCase
from edge_runtime.config.profiles import DeviceProfile, Engine
from edge_runtime.core.errors import EdgeError

__all__ = ["MARGIN", "EngineCandidate", "choose_engine", "engine_candidates", "installed_engines"]

MARGIN = 0.90
"""A candidate on another engine must reach this share of the preferred one's latency in every run."""
ONNX_ENGINES = (Engine.ONNXRUNTIME, Engine.OPENVINO)
"""Engines that load an .onnx artifact."""
DISPLAY = {Engine.ONNXRUNTIME: "ONNX Runtime", Engine.OPENVINO: "OpenVINO", Engine.TFLITE: "TFLite"}
"""Engine names for the log (a user reads them beside the library messages we keep off the terminal)."""
_PACKAGES = {Engine.ONNXRUNTIME: "onnxruntime", Engine.OPENVINO: "openvino", Engine.TFLITE: "ai_edge_litert"}


@dataclasses.dataclass(frozen=True)
class EngineCandidate:
    """One artifact in one engine, with the options the bundle must record to load it so."""

    engine: Engine
    label: str
    model_bytes: bytes
    engine_options: dict[str, str] = dataclasses.field(default_factory=dict)
    session_config: dict[str, str] = dataclasses.field(default_factory=dict)


def installed_engines(profile: DeviceProfile, artifact_format: str) -> list[Engine]:
    """The profile's engines, in its order, that load this artifact format and are installed here."""
    loads = ONNX_ENGINES if artifact_format == "onnx" else (Engine.TFLITE,)
    return [
        engine
        for engine in profile.runtime.engines
        if engine in loads and importlib.util.find_spec(_PACKAGES[engine]) is not None
    ]


def _openvino_has_bf16() -> bool:
    """Whether OpenVINO reports BF16 compute on this CPU (AVX512_BF16 or AMX)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _sensitive_nodes(original: onnx.ModelProto, reports: Sequence[Mapping[str, Any]]) -> list[str]:
    """Nodes of the original graph that read a weight our int8 search kept in float."""
    kept = {name for report in reports for name in report.get("weights_kept_float", ())}
    return [node.name for node in original.graph.node if node.name and kept & set(node.input)]


def _openvino_candidates(
    result: Any, original: onnx.ModelProto, ctx: CompressionContext, reports: Sequence[Mapping[str, Any]],
    reference: list[list[np.ndarray]],
) -> list[EngineCandidate]:  # fmt: skip
    """Our artifact at f32 (and bf16 where the CPU has it), our int8 chosen through OpenVINO, and NNCF's
    int8 when installed; all compiled for the data's one input shape when they have one."""
    static = fixed_input_shape(original, (ctx.calibration, ctx.validation))
    shape = {"static_shape": static} if static else {}
    precision = "bf16" if _openvino_has_bf16() else "f32"
    out = [EngineCandidate(Engine.OPENVINO, "our artifact, f32", result.model_bytes,
                           {"inference_precision": "f32", **shape})]  # fmt: skip
    if precision == "bf16":
        out.append(EngineCandidate(Engine.OPENVINO, "our artifact, bf16", result.model_bytes,
                                   {"inference_precision": "bf16", **shape}))  # fmt: skip
    names = [spec.name for spec in result.outputs]
    # int8 beside bf16 and beside f32 differ in speed and fidelity: both are built, both timed
    option_sets = [{"inference_precision": wanted, **shape} for wanted in dict.fromkeys((precision, "f32"))]
    for model_bytes, label, options in openvino_int8(original, ctx, reference, names, option_sets):
        out.append(
            EngineCandidate(
                Engine.OPENVINO, f"{label}, {options['inference_precision']}", model_bytes, options
            )
        )
    # NNCF's int8 in each of its settings, each at both precision hints: neither fidelity nor speed
    # of int8 beside bf16 follows from the f32 one
    f32 = {"inference_precision": "f32", **shape}
    for built in nncf_int8(original, ctx, _sensitive_nodes(original, reports), reference, names, f32):
        for wanted in dict.fromkeys(("f32", precision)):
            out.append(EngineCandidate(Engine.OPENVINO, f"{built.label}, {wanted}", built.model_bytes,
                                       {"inference_precision": wanted, **shape}))  # fmt: skip
    return out


def engine_candidates(
    result: Any, original: onnx.ModelProto, ctx: CompressionContext, reports: Sequence[Mapping[str, Any]],
    reference: list[list[np.ndarray]],
) -> list[EngineCandidate]:  # fmt: skip
    """Our artifact in each installed engine, OpenVINO's own candidates after it; the profile's
    preferred engine comes first."""
    out: list[EngineCandidate] = []
    for engine in installed_engines(ctx.profile, result.artifact_format):
        if engine is Engine.OPENVINO:
            out += _openvino_candidates(result, original, ctx, reports, reference)
        else:
            out.append(
                EngineCandidate(engine, "our artifact", result.model_bytes, {}, dict(result.session_config))
            )
    return out


def _session(candidate: EngineCandidate, profile: DeviceProfile) -> Any:
    """The candidate loaded as the device would load it."""
    if candidate.engine is Engine.OPENVINO:
        return OpenvinoSession(candidate.model_bytes, candidate.engine_options, profile)
    return make_session(candidate.model_bytes, profile, candidate.session_config)


def _row(candidate: EngineCandidate, timing: Any, index: int, failures: list[str]) -> dict[str, Any]:
    """One line of the report's `engine_choice.candidates`."""
    return {
        "engine": str(candidate.engine),
        "label": candidate.label,
        "engine_options": dict(candidate.engine_options),
        "bytes": len(candidate.model_bytes),
        "latency_ratio": timing.ratios[index],
        "latency_ratio_range": list(timing.ranges[index]),
        "budgets_met": not failures,
        "failures": failures,
    }


def _ranked(candidates: list[EngineCandidate], timing: Any, ok: list[bool]) -> list[int]:
    """Indexes of the candidates that meet the budgets, are faster than the preferred one (0) by
    MARGIN in every timing run, and do not pay for it with more bytes than speed (size x latency no
    worse than the preferred one's: twice the bytes needs at least twice the speed), fastest first."""
    preferred = timing.per_run[0]
    cost = [len(c.model_bytes) * timing.ratios[i] for i, c in enumerate(candidates)]
    better = [
        index
        for index in range(1, len(candidates))
        if ok[index]
        and all(c < MARGIN * p for c, p in zip(timing.per_run[index], preferred, strict=True))
        and cost[index] <= cost[0]
    ]
    return sorted(better, key=lambda index: timing.ratios[index])


def _pick(candidates: list[EngineCandidate], timing: Any, ok: list[bool]) -> int:
    """Index of the chosen candidate: the fastest of `_ranked`, else the preferred one (0)."""
    return (_ranked(candidates, timing, ok) or [0])[0]


def _size_failures(candidate: EngineCandidate, profile: DeviceProfile) -> list[str]:
    """The model-size budget, when the candidate misses it."""
    limit = profile.budgets.max_model_bytes
    size = len(candidate.model_bytes)
    return [f"model is {size} bytes, over the {limit}-byte budget"] if size > limit else []


def _measured(
    candidates: list[EngineCandidate],
    ctx: CompressionContext,
    ref_outputs: list[list[np.ndarray]],
    names: list[str],
) -> tuple[list[EngineCandidate], list[Any], list[list[str]]]:
    """The candidates that load and run on the selection split, their sessions and budget failures;
    one that cannot load or run is logged and left out (the compression goes on without it)."""
    kept, sessions, failures = [], [], []
    for candidate in candidates:
        try:
            session = _session(candidate, ctx.profile)
            outputs = run_all(session, ctx.validation)
        except EdgeError as exc:
            ctx.log(f"engine choice: {DISPLAY[candidate.engine]} cannot run {candidate.label}: {exc}")
            continue
        result = fidelity(ref_outputs, outputs, ctx.labels, names=names, tasks=ctx.tasks)
        kept.append(candidate)
        sessions.append(session)
        failures.append(budget_failures(result, ctx.profile.budgets) + _size_failures(candidate, ctx.profile))
    return kept, sessions, failures


def choose_engine(result: Any, original: onnx.ModelProto, ctx: CompressionContext, held: Dataset) -> Any:
    """`result` for the engine that measured best within budget, with the choice in its report."""
    engines = installed_engines(ctx.profile, result.artifact_format)
    preferred = str(engines[0] if engines else ctx.profile.runtime.engine)
    if len(engines) < 2 and Engine.OPENVINO not in engines:
        return dataclasses.replace(result, engine=preferred)
    names = [spec.name for spec in result.outputs]
    reference = make_session(original.SerializeToString(), ctx.profile)
    ref_outputs = run_all(reference, ctx.validation)
    candidates = engine_candidates(result, original, ctx, result.report.get("passes", ()), ref_outputs)
    if len(candidates) < 2:
        return dataclasses.replace(result, engine=preferred)
    kept, sessions, failures = _measured(candidates, ctx, ref_outputs, names)
    if len(kept) < 2 or kept[0] is not candidates[0]:
        return dataclasses.replace(result, engine=preferred)
    timing = timed_ratios(reference, sessions, dict(ctx.validation[0]))
    rows = [_row(c, timing, i, failures[i]) for i, c in enumerate(kept)]
    order = _ranked(kept, timing, [not f for f in failures])
    if kept[0].engine is not Engine.ONNXRUNTIME:  # not what the pipeline validated: judged here too
        order.append(0)
    refused: dict[str, list[str]] = {}
    for chosen in order:  # the report split may refuse what the selection split chose: the next one
        pick = kept[chosen]
        rows[chosen]["chosen"] = True
        choice = {"engine": str(pick.engine), "margin": MARGIN, "candidates": rows}
        report = {
            **result.report,
            "engine_choice": {**choice, **({"refused_on_report_split": refused} if refused else {})},
        }
        measured = (timing.ratios[chosen], timing.ranges[chosen])
        outcome = _as_chosen(result, pick, sessions[chosen], reference, held, ctx, report, measured)
        if outcome.budgets_met or chosen == 0:
            ctx.log(
                f"engine choice: {DISPLAY[pick.engine]} ({pick.label}), {measured[0]:.2f}x of the original"
            )
            return outcome
        rows[chosen]["chosen"] = False
        refused[pick.label] = list(outcome.report["budgets"]["failures"])
        ctx.log(
            f"engine choice: {DISPLAY[pick.engine]} ({pick.label}) misses the budgets on the report split"
        )
    rows[0]["chosen"] = True
    ctx.log(
        f"engine choice: {DISPLAY[kept[0].engine]} ({kept[0].label}), {timing.ratios[0]:.2f}x of the original"
    )
    choice = {"engine": preferred, "margin": MARGIN, "candidates": rows}
    report = {
        **result.report,
        "engine_choice": {**choice, **({"refused_on_report_split": refused} if refused else {})},
    }
    return dataclasses.replace(result, engine=preferred, report=report)


def _as_chosen(
    result: Any, chosen: EngineCandidate, session: Any, reference: Any, held: Dataset,
    ctx: CompressionContext, report: dict[str, Any], measured: tuple[float, tuple[float, float]],
) -> Any:  # fmt: skip
    """The result rebuilt around the chosen candidate: bytes, options, fidelity on the report split
    (which no choice saw), budgets checked again, golden outputs from the chosen engine."""
    from compressor.pipeline import _check_budgets

    report = dict(report)  # the caller's report stays as measured, should this one be refused
    names = [spec.name for spec in result.outputs]
    original_bytes = report["original"]["bytes"]
    ratio, ratio_range = measured
    held_fidelity = fidelity(run_all(reference, held.samples), run_all(session, held.samples), held.labels,
                             names=names, tasks=ctx.tasks)  # fmt: skip
    baseline_ms = report["original"]["latency_ms"]
    report["compressed"] = {
        **report["compressed"],
        "engine": str(chosen.engine),
        "engine_options": dict(chosen.engine_options),
        "bytes": len(chosen.model_bytes),
        "size_ratio": original_bytes / len(chosen.model_bytes),
        "latency_ms": baseline_ms * ratio,
        "latency_ratio": ratio,
        "latency_ratio_range": list(ratio_range),
        "fidelity": held_fidelity.to_dict(),
    }
    _check_budgets(report, held_fidelity, ctx.profile)
    golden = [
        GoldenCase(dict(case.inputs), dict(zip(names, session.run(None, case.inputs), strict=True)))
        for case in result.golden
    ]
    return dataclasses.replace(
        result,
        model_bytes=chosen.model_bytes,
        engine=str(chosen.engine),
        engine_options=dict(chosen.engine_options),
        session_config=dict(chosen.session_config),
        report=report,
        golden=golden,
    )
