"""The compression pipeline: original model + data + device profile -> compressed model + report."""

from __future__ import annotations

import platform
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compressor.measure import compare_latency, fidelity, make_session, meets_budgets, run_all
from compressor.onnx_model import load_model, op_counts, tensor_specs
from compressor.passes import DEFAULT_RECIPE, check_recipe, create_pass
from compressor.passes.base import CompressionContext
from compressor.progress import Progress
from edge_runtime.artifact.golden import GoldenCase
from edge_runtime.artifact.manifest import GoldenSpec
from edge_runtime.config.profiles import DeviceProfile, Engine
from edge_runtime.core.errors import BudgetError, CompressionError, DataError
from edge_runtime.core.types import TensorSpec

__all__ = ["CompressionResult", "compress", "default_recipe", "host_cpu"]

GOLDEN_CASES = 4
SLOWER_TOLERANCE = 1.10
"""Latency ratio above which a compressed ONNX model counts as slower than its original."""


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


def compress(
    model_path: Path,
    profile: DeviceProfile,
    calibration: Sequence[Mapping[str, np.ndarray]],
    *,
    validation: Sequence[Mapping[str, np.ndarray]] | None = None,
    labels: np.ndarray | None = None,
    workdir: Path | None = None,
    recipe: Sequence[str] | None = None,
    pass_options: Mapping[str, Mapping[str, Any]] | None = None,
    log: Callable[[str], Any] = print,
    seed: int = 0,
    enforce_budgets: bool = True,
    show_progress: bool = True,
) -> CompressionResult:
    """Compress `model_path` for `profile`, measure it against the original, enforce the budgets.

    `recipe` names the passes in order (default: the profile's); with `enforce_budgets=False` a
    model that misses a budget is returned with the failures in its report instead of refused.
    """
    passes = tuple(recipe or default_recipe(profile))
    check_recipe(passes)
    original = load_model(Path(model_path))
    if validation is None:
        raise DataError("validation samples are required (held-out data to measure fidelity)")
    if labels is not None and len(labels) != len(validation):
        raise DataError(f"{len(labels)} labels for {len(validation)} validation samples")
    with tempfile.TemporaryDirectory(prefix="edge-compress-", dir=workdir) as scratch:
        ctx = CompressionContext(
            profile=profile,
            calibration=list(calibration),
            validation=list(validation),
            workdir=Path(scratch),
            labels=labels,
            seed=seed,
            log=log,
            options=dict(pass_options or {}),
        )
        progress = Progress(len(passes), log) if show_progress else None
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
                log(f"{name}: nothing to do for this model")
                continue
            if progress is None:
                log(f"{name}: running")
            else:
                progress.step(f"pass {name}")
            result = step.run(model, ctx)
            model, reports = result.model, [*reports, result.report]
            if result.artifact is not None:
                artifact = (result.artifact, result.artifact_format)
        final_bytes, final_format = artifact or (model.SerializeToString(), "onnx")
        _check_format(final_format, profile)
        outcome = _finish(original, model, final_bytes, final_format, reports, ctx, Path(model_path))
    if enforce_budgets and not outcome.budgets_met:
        failures = "; ".join(outcome.report["budgets"]["failures"])
        raise BudgetError(f"profile '{profile.name}' budgets not met: {failures}")
    return outcome


def default_recipe(profile: DeviceProfile) -> tuple[str, ...]:
    """The passes a profile runs when no recipe is given."""
    if profile.compression.recipe:
        return profile.compression.recipe
    if profile.runtime.engine is Engine.TFLITE:
        return ("prepare", "tflite")
    return DEFAULT_RECIPE


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
    source: Path,
) -> CompressionResult:
    """Measure the final artifact against the original model, check the budgets, build golden data."""
    profile = ctx.profile
    initializers = {init.name for init in original.graph.initializer}
    inputs = tensor_specs(list(original.graph.input), initializers)
    outputs = tensor_specs(list(original.graph.output))
    original_bytes = original.SerializeToString()
    reference_session = make_session(original_bytes, profile)
    session = _runner(model_bytes, artifact_format, profile, original)
    reference = run_all(reference_session, ctx.validation)
    produced = run_all(session, ctx.validation)
    latency = compare_latency(
        {"fp32": reference_session, "compressed": session}, dict(ctx.validation[0]), rounds=60
    )
    result_fidelity = fidelity(reference, produced, ctx.labels)
    reference_fidelity = fidelity(reference, reference, ctx.labels)
    report = {
        "model": source.name,
        "format": artifact_format,
        "profile": profile.to_dict(),
        "host": host_cpu(),
        "validation_samples": len(ctx.validation),
        "calibration_samples": len(ctx.calibration),
        "original": {
            "bytes": len(original_bytes),
            "latency_ms": latency["fp32"],
            "ops": op_counts(original),
            "accuracy": reference_fidelity.accuracy,
        },
        "compressed": {
            "bytes": len(model_bytes),
            "size_ratio": len(original_bytes) / len(model_bytes),
            "deflated_bytes": len(zlib.compress(model_bytes, 9)),
            "latency_ms": latency["compressed"],
            "latency_ratio": latency["compressed"] / latency["fp32"],
            "fidelity": result_fidelity.to_dict(),
            "ops": op_counts(model),
        },
        "passes": reports,
    }
    _check_budgets(report, result_fidelity, reference_fidelity, profile)
    names = [spec.name for spec in outputs]
    golden = [
        GoldenCase(dict(feed), dict(zip(names, outs, strict=True)))
        for feed, outs in zip(ctx.validation[:GOLDEN_CASES], produced[:GOLDEN_CASES], strict=False)
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


def _check_budgets(report: dict[str, Any], result: Any, reference: Any, profile: DeviceProfile) -> None:
    """Refuse, with numbers, a model that misses the profile's budgets or is slower than the original."""
    budgets, compressed = profile.budgets, report["compressed"]
    ok, why = meets_budgets(result, reference, budgets)
    failures = [] if ok else [why]
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
    if report["format"] == "onnx" and compressed["latency_ratio"] > SLOWER_TOLERANCE:
        failures.append(
            f"compressed model is {compressed['latency_ratio']:.2f}x the original's latency (slower)"
        )
    report["budgets"] = {"met": not failures, "failures": failures}
