"""The compression pipeline: original model + data + device profile -> compressed model + report."""

from __future__ import annotations

import dataclasses
import platform
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compressor.data import MIN_REPORT_SAMPLES, Dataset, split_selection
from compressor.dense_head import image_size_of
from compressor.int8_weights import weight_precisions
from compressor.measure import budget_failures, fidelity, make_session, run_all, timed_ratios
from compressor.onnx_model import load_model, op_counts, tensor_specs
from compressor.passes import DEFAULT_RECIPE, check_recipe, create_pass
from compressor.passes.base import CompressionContext
from compressor.progress import Progress
from compressor.tasks import TaskConfig
from edge_runtime.artifact.golden import GoldenCase
from edge_runtime.artifact.manifest import GoldenSpec
from edge_runtime.config.profiles import DeviceProfile, Engine
from edge_runtime.core.errors import BudgetError, CompressionError, DataError
from edge_runtime.core.types import TensorSpec

__all__ = ["CompressionResult", "compress", "default_recipe", "host_cpu", "target_steps"]

GOLDEN_CASES = 4
SLOWER_TOLERANCE = 1.10
"""Latency ratio above which, in every one of the repeated timing runs, a compressed ONNX model
counts as slower than its original (one run above it is the noise of a shared host)."""


@dataclass(frozen=True)
class CompressionResult:
    """The compressed model, how to load it, what it was measured to do, and its self-test data."""

    model: onnx.ModelProto
    """The final ONNX graph (for a TFLite artifact: the graph it was converted from)."""
    model_bytes: bytes
    """The artifact's bytes: the ONNX model, or the .tflite file."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    report: dict[str, Any]
    golden: list[GoldenCase]
    golden_spec: GoldenSpec
    session_config: dict[str, str] = field(default_factory=dict)
    artifact_format: str = "onnx"
    engine: str = ""
    """The engine the bundle names (empty: the profile's preferred engine)."""
    engine_options: dict[str, str] = field(default_factory=dict)
    """Options the bundle records for that engine (openvino: inference_precision)."""

    @property
    def budgets_met(self) -> bool:
        """Whether the report found every budget of the profile met."""
        return bool(self.report["budgets"]["met"])


def host_cpu() -> dict[str, Any]:
    """This machine's CPU name and the instruction-set extensions that matter for int8 kernels."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp")
    return {"cpu": name, "arch": platform.machine(), "features": [f for f in wanted if f in flags]}


def _with_image_size(tasks: TaskConfig, calibration: Sequence[Mapping[str, np.ndarray]]) -> TaskConfig:
    """`tasks` knowing the model's image input size (from the data), for dense detection heads."""
    if tasks.image_size is not None or not calibration:
        return tasks
    return dataclasses.replace(tasks, image_size=image_size_of(calibration[0]))


def compress(
    model_path: Path,
    profile: DeviceProfile,
    calibration: Sequence[Mapping[str, np.ndarray]],
    *,
    validation: Sequence[Mapping[str, np.ndarray]] | None = None,
    labels: np.ndarray | None = None,
    report_samples: Sequence[Mapping[str, np.ndarray]] | None = None,
    report_labels: np.ndarray | None = None,
    tasks: TaskConfig | None = None,
    workdir: Path | None = None,
    recipe: Sequence[str] | None = None,
    pass_options: Mapping[str, Mapping[str, Any]] | None = None,
    log: Callable[[str], Any] = print,
    seed: int = 0,
    enforce_budgets: bool = True,
    show_progress: bool = True,
) -> CompressionResult:
    """Compress `model_path` for `profile`, measure it against the original, enforce the budgets.

    Three disjoint splits: `calibration` fits, `validation` (the selection split) decides every
    measured choice, `report_samples` give the reported numbers (default: half of `validation`,
    which then selects with the other half). `recipe` names the passes in order (default: the
    profile's); with `enforce_budgets=False` a model that misses a budget is returned with the
    failures in its report instead of refused.
    """
    passes = tuple(recipe or default_recipe(profile))
    check_recipe(passes)
    original = load_model(Path(model_path))
    if validation is None:
        raise DataError("validation samples are required (held-out data to measure fidelity)")
    if labels is not None and len(labels) != len(validation):
        raise DataError(f"{len(labels)} labels for {len(validation)} validation samples")
    if report_samples is None:
        selection, held = split_selection([dict(feed) for feed in validation], labels, seed)
    else:
        selection = Dataset([dict(feed) for feed in validation], labels)
        held = Dataset([dict(feed) for feed in report_samples], report_labels)
    with tempfile.TemporaryDirectory(prefix="edge-compress-", dir=workdir) as scratch:
        ctx = CompressionContext(
            profile=profile,
            calibration=list(calibration),
            validation=selection.samples,
            workdir=Path(scratch),
            labels=selection.labels,
            seed=seed,
            log=log,
            options=dict(pass_options or {}),
            tasks=_with_image_size(tasks or TaskConfig(), calibration),
            output_names=tuple(out.name for out in original.graph.output),
        )
        model, reports, artifact = _run_passes(original, passes, ctx, show_progress)
        final_bytes, final_format = artifact or (model.SerializeToString(), "onnx")
        _check_format(final_format, profile)
        outcome = _finish(original, model, final_bytes, final_format, reports, ctx, held, Path(model_path))
        # --- issue 14 hook: engine choice by measurement (all of it in compressor/engine_choice.py)
        if len(profile.runtime.engines) > 1:
            from compressor.engine_choice import choose_engine

            outcome = choose_engine(outcome, original, ctx, held)
        # --- end of the issue 14 hook
    if enforce_budgets and not outcome.budgets_met:
        failures = "; ".join(outcome.report["budgets"]["failures"])
        raise BudgetError(f"profile '{profile.name}' budgets not met: {failures}")
    return outcome


def _run_passes(
    original: onnx.ModelProto, passes: Sequence[str], ctx: CompressionContext, show_progress: bool
) -> tuple[onnx.ModelProto, list[dict[str, Any]], tuple[bytes, str] | None]:
    """Run the passes in order: the last model, every pass's report, and a non-ONNX artifact if any."""
    progress = Progress(len(passes), ctx.log) if show_progress else None
    model, reports = original, list[dict[str, Any]]()
    artifact: tuple[bytes, str] | None = None
    for name in passes:
        step = create_pass(name, **dict(ctx.options.get(name, {})))
        if not step.supports(model):
            if name == "tflite":
                from compressor.tflite_export import unsupported_tflite_ops

                raise CompressionError(
                    f"the model has ops with no TFLite int8 kernel here: {', '.join(unsupported_tflite_ops(model))}; "
                    "distill it into a supported student first (recipe prepare,distill,tflite)"
                )
            ctx.log(f"{name}: nothing to do for this model")
            continue
        if progress is None:
            ctx.log(f"{name}: running")
        else:
            progress.step(f"pass {name}")
        result = step.run(model, ctx)
        model, reports = result.model, [*reports, result.report]
        if result.artifact is not None:
            artifact = (result.artifact, result.artifact_format)
    return model, reports, artifact


def target_steps(profile: DeviceProfile) -> tuple[str, ...]:
    """The passes that make the profile engine's artifact, always last in a recipe: int8 for ONNX
    Runtime; static shapes (simplify) then a full-integer .tflite for TFLite."""
    if profile.runtime.engine is Engine.TFLITE:
        return ("simplify", "tflite")
    return DEFAULT_RECIPE[1:]


def default_recipe(profile: DeviceProfile) -> tuple[str, ...]:
    """The passes a profile runs when no recipe is given."""
    if profile.compression.recipe:
        return profile.compression.recipe
    return ("prepare", *target_steps(profile))


def _check_format(artifact_format: str, profile: DeviceProfile) -> None:
    """The artifact must be what the profile's engine loads."""
    wanted = "tflite" if profile.runtime.engine is Engine.TFLITE else "onnx"
    if artifact_format != wanted:
        raise CompressionError(
            f"profile '{profile.name}' runs {profile.runtime.engine} and needs a .{wanted} artifact, "
            f"but the recipe produced .{artifact_format}"
        )


def _runner(artifact: bytes, artifact_format: str, profile: DeviceProfile, model: onnx.ModelProto) -> Any:
    """Something with `run(None, feed)` that executes the artifact as the device would."""
    if artifact_format == "tflite":
        from compressor.tflite_export import TFLiteRunner

        return TFLiteRunner(artifact, model, profile)
    return make_session(artifact, profile)


def _finish(
    original: onnx.ModelProto,
    model: onnx.ModelProto,
    model_bytes: bytes,
    artifact_format: str,
    reports: list[dict[str, Any]],
    ctx: CompressionContext,
    held: Dataset,
    source: Path,
) -> CompressionResult:
    """Measure the final artifact against the original on the report split (which no choice saw),
    time it the way the passes time their candidates, check the budgets, build golden data."""
    profile = ctx.profile
    inputs = tensor_specs(list(original.graph.input), {init.name for init in original.graph.initializer})
    outputs = tensor_specs(list(original.graph.output))
    original_bytes = original.SerializeToString()
    reference_session = make_session(original_bytes, profile)
    session = _runner(model_bytes, artifact_format, profile, original)
    reference = run_all(reference_session, held.samples)
    produced = run_all(session, held.samples)
    timing = timed_ratios(reference_session, [session], dict(ctx.validation[0]))
    names = [spec.name for spec in outputs]
    result_fidelity = fidelity(reference, produced, held.labels, names=names, tasks=ctx.tasks)
    report = {
        "model": source.name,
        "format": artifact_format,
        "profile": profile.to_dict(),
        "host": host_cpu(),
        "validation_samples": len(held.samples),
        "calibration_samples": len(ctx.calibration),
        "splits": {
            "calibration": len(ctx.calibration),
            "selection": len(ctx.validation),
            "report": len(held.samples),
        },
        "warnings": _split_warnings(held),
        "original": {
            "bytes": len(original_bytes),
            "latency_ms": timing.baseline_ms,
            "ops": op_counts(original),
            "weights": weight_precisions(original),
            "accuracy": next((s.reference for s in result_fidelity.tasks if s.metric == "accuracy"), None),
        },
        "compressed": {
            "bytes": len(model_bytes),
            "size_ratio": len(original_bytes) / len(model_bytes),
            "deflated_bytes": len(zlib.compress(model_bytes, 9)),
            "latency_ms": timing.median_ms[0],
            "latency_ratio": timing.ratios[0],
            "latency_ratio_range": list(timing.ranges[0]),
            "fidelity": result_fidelity.to_dict(),
            "ops": op_counts(model),
            "weights": weight_precisions(model) if artifact_format == "onnx" else None,
        },
        "passes": reports,
    }
    _check_budgets(report, result_fidelity, profile)
    golden_feeds = [*held.samples, *ctx.validation][:GOLDEN_CASES]
    golden_outputs = run_all(session, golden_feeds)
    golden = [
        GoldenCase(dict(feed), dict(zip(names, outs, strict=True)))
        for feed, outs in zip(golden_feeds, golden_outputs, strict=True)
    ]
    scale = max(
        (float(np.max(np.abs(v))) for case in golden for v in case.outputs.values() if v.size), default=1.0
    )
    golden_spec = GoldenSpec(
        file="golden.npz", cases=len(golden), rtol=0.05, atol=max(1e-4, 0.05 * scale), min_top1_agreement=0.75
    )
    return CompressionResult(
        model=model,
        model_bytes=model_bytes,
        inputs=inputs,
        outputs=outputs,
        report=report,
        golden=golden,
        golden_spec=golden_spec,
        artifact_format=artifact_format,
    )


def _split_warnings(held: Dataset) -> list[str]:
    """Why the report's numbers may be less firm than they look."""
    warnings = list(held.notes)
    count = len(held.samples)
    if count < MIN_REPORT_SAMPLES:
        warnings.append(
            f"the report rests on {count} held-out samples: one sample moves a share by "
            f"{100 / max(count, 1):.1f} pp; give at least {MIN_REPORT_SAMPLES} (more --validation data)"
        )
    return warnings


def _check_budgets(report: dict[str, Any], result: Any, profile: DeviceProfile) -> None:
    """Refuse, with numbers, a model that misses the profile's budgets or is slower than the original."""
    budgets, compressed = profile.budgets, report["compressed"]
    failures = budget_failures(result, budgets)
    if compressed["bytes"] > budgets.max_model_bytes:
        over = compressed["bytes"] - budgets.max_model_bytes
        failures.append(
            f"model is {compressed['bytes']} bytes, {over} over the {budgets.max_model_bytes}-byte budget"
        )
    if compressed["latency_ms"] > budgets.latency_target_ms:
        failures.append(
            f"median latency {compressed['latency_ms']:.2f} ms on this host exceeds the "
            f"{budgets.latency_target_ms} ms target"
        )
    # Same engine: never slower than the original (10% is the timing noise of a shared host). A .tflite
    # runs in another engine than the ORT original, so there the ratio is reported, not enforced.
    low, high = compressed["latency_ratio_range"]
    if report["format"] == "onnx" and low > SLOWER_TOLERANCE:  # slower in every timing run: not noise
        failures.append(
            f"compressed model is {compressed['latency_ratio']:.2f}x the original's latency (slower in "
            f"every timing run: {low:.2f}x-{high:.2f}x)"
        )
    report["budgets"] = {"met": not failures, "failures": failures}
