"""Benchmark: OpenVINO vs ONNX Runtime on the same real models, fp32 and int8, one thread each.

Run from the repository root:
    python -m tools.bench_openvino [--quick] [--models cls,det,rec] [--profile x86-avx2-gateway]
                                   [--runs N] [--no-ours] [--no-nncf]

Per model, every variant runs through each engine as a device loads it (ONNX Runtime: one intra-op
thread, sequential; OpenVINO: our `openvino` engine, one thread, latency hint, f32), and all of them
are timed interleaved in one loop (blocks of `bench_compress.BLOCK` runs back to back, the order
rotating every round), so the machine's load falls on each alike. Latency is the median, as a ratio
to ONNX Runtime on the fp32 model. Variants: the fp32 model; our compressor's int8 artifact (when it
meets the profile's budgets); ONNX Runtime's `quantize_static` after `pre_process` (int8 QDQ); NNCF
post-training quantization with ONNX in and ONNX QDQ out (the artifact a bundle could ship), and
NNCF on OpenVINO's own model (what OpenVINO + NNCF reach on their own, not shippable in a bundle).
Quality is judged on held-out samples against ONNX Runtime's fp32 outputs, by the same rules as
tools/bench_compress.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from tools import bench_compress as bc

__all__ = ["main"]

Feed = dict[str, np.ndarray]
Run = Callable[[Feed], np.ndarray]
MODELS = ("cls", "det", "rec")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model artifact: ONNX bytes (both engines) or an OpenVINO model (OpenVINO only)."""

    name: str
    onnx_bytes: bytes | None = None
    session_config: dict[str, str] = dataclasses.field(default_factory=dict)
    ov_model: Any = None
    failure: str = ""
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Runner:
    """One variant loaded in one engine."""

    variant: str
    engine: str
    run: Run


def load_average() -> str:
    """`uptime`'s three load averages, for the table's header."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def ort_runner(variant: Variant) -> Run:
    """ONNX Runtime as the device loads it."""
    assert variant.onnx_bytes is not None
    s = bc.session(variant.onnx_bytes, variant.session_config)
    return lambda feed: s.run(None, feed)[0]


def openvino_runner(variant: Variant, profile_name: str) -> Run:
    """Our OpenVINO engine, one thread, f32 (ONNX bytes), or OpenVINO's own model compiled alike."""
    from edge_runtime.artifact.manifest import Manifest
    from edge_runtime.config.profiles import load_profile
    from edge_runtime.engines.openvino import OpenvinoBackend, compile_config

    if variant.ov_model is not None:
        import openvino as ov

        core = ov.Core()
        config, _ = compile_config("f32", 1, tuple(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")))
        request = core.compile_model(variant.ov_model, "CPU", config).create_infer_request()
        return lambda feed: np.asarray(request.infer(feed, share_outputs=False)[0])
    assert variant.onnx_bytes is not None
    manifest = Manifest(
        name=variant.name.replace(" ", "-")[:64] or "model", version="1", profile=profile_name,
        engine="openvino", model_file="model.onnx", inputs=(), outputs=(), files={},
    )  # fmt: skip
    backend = OpenvinoBackend.load(manifest, variant.onnx_bytes, load_profile(profile_name), threads=1)
    first = backend.outputs[0].name
    return lambda feed: backend.run(feed)[first]


def ours(task: bc.Task, profile: str, workdir: Path) -> Variant:
    """Our compressor's artifact for the profile, or why it made none."""
    candidate = bc.ours(task, profile, workdir, lambda _line: None)
    if candidate.model_bytes is None:
        return Variant("ours int8", failure=candidate.failure)
    return Variant("ours int8", candidate.model_bytes, candidate.session_config, seconds=candidate.seconds)


def ort_static(task: bc.Task, workdir: Path) -> Variant:
    """ONNX Runtime's pre_process + quantize_static (int8 QDQ)."""
    candidate = bc.ort_defaults(task, workdir, preprocess=True)
    name = "ORT pre_process + quantize_static"
    if candidate.model_bytes is None:
        return Variant(name, failure=candidate.failure)
    return Variant(name, candidate.model_bytes, candidate.session_config)


def nncf_variants(task: bc.Task) -> list[Variant]:
    """NNCF post-training quantization: ONNX in (QDQ ONNX out), and on OpenVINO's own model."""
    try:
        import nncf
        import onnx
        import openvino as ov
    except ImportError as exc:
        return [Variant("NNCF", failure=f"not available: {exc}")]
    nncf.set_log_level(logging.ERROR)
    dataset = nncf.Dataset(task.calibration)
    out: list[Variant] = []
    started = time.perf_counter()
    try:
        quantized = nncf.quantize(onnx.load(str(task.model_path)), dataset, subset_size=len(task.calibration))
        out.append(Variant("NNCF PTQ (ONNX in, QDQ out)", quantized.SerializeToString(),
                           seconds=time.perf_counter() - started))  # fmt: skip
    except Exception as exc:  # a tool failing on a real model is a result
        out.append(Variant("NNCF PTQ (ONNX in, QDQ out)", failure=f"fails: {bc._short(exc)}"))
    started = time.perf_counter()
    try:
        model = ov.Core().read_model(str(task.model_path))
        quantized_ov = nncf.quantize(model, dataset, subset_size=len(task.calibration))
        out.append(Variant("NNCF PTQ on OpenVINO's model", ov_model=quantized_ov,
                           seconds=time.perf_counter() - started))  # fmt: skip
    except Exception as exc:
        out.append(Variant("NNCF PTQ on OpenVINO's model", failure=f"fails: {bc._short(exc)}"))
    return out


def runners(variants: list[Variant], profile: str) -> tuple[list[Runner], list[tuple[str, str, str]]]:
    """Each variant in each engine that can run it; (variant, engine, reason) for those that failed."""
    loaded: list[Runner] = []
    failed: list[tuple[str, str, str]] = []
    for variant in variants:
        if variant.failure:
            failed.append((variant.name, "-", variant.failure))
            continue
        makers: list[tuple[str, Callable[[], Run]]] = []
        if variant.onnx_bytes is not None:
            makers.append(("onnxruntime", lambda v=variant: ort_runner(v)))
        makers.append(("openvino", lambda v=variant: openvino_runner(v, profile)))
        for engine, make in makers:
            try:
                loaded.append(Runner(variant.name, engine, make()))
            except Exception as exc:  # an engine that cannot load an artifact is a result
                failed.append((variant.name, engine, f"fails to load: {bc._short(exc)}"))
    return loaded, failed


def interleaved_ms(loaded: list[Runner], feed: Feed, runs: int) -> list[float]:
    """Median ms of each runner, timed in blocks of runs back to back that take turns
    (`bench_compress.blocked_medians`)."""
    return bc.blocked_medians([functools.partial(runner.run, feed) for runner in loaded], runs)


def benchmark_model(task: bc.Task, args: argparse.Namespace, workdir: Path) -> list[tuple[str, ...]]:
    """Every variant of one model in each engine, as table rows."""
    fp32 = Variant("fp32", task.model_path.read_bytes())
    variants = [fp32]
    if not args.no_ours:
        variants.append(ours(task, args.profile, workdir))
    variants.append(ort_static(task, workdir))
    if not args.no_nncf:
        variants += nncf_variants(task)
    loaded, failed = runners(variants, args.profile)
    reference = [loaded[0].run(feed) for feed in task.evaluation]
    runs = args.runs or (30 if args.quick else 100 if task.name == "cls" else 60)
    medians = interleaved_ms(loaded, task.evaluation[0], runs)
    base = medians[0]
    rows = []
    for runner, ms in zip(loaded, medians, strict=True):
        outputs = [runner.run(feed) for feed in task.evaluation]
        metric, agreement = bc.quality(task, reference, outputs)
        rows.append(
            (task.name, runner.variant, runner.engine, f"{ms / base:.2f}x ({ms:.3g} ms)", metric, agreement)
        )
    rows += [(task.name, name, engine, reason, "", "") for name, engine, reason in failed]
    return rows


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of cls,det,rec")
    parser.add_argument("--quick", action="store_true", help="fewer samples and timing runs")
    parser.add_argument("--profile", default="x86-avx2-gateway", help="device profile for our compressor")
    parser.add_argument("--runs", type=int, default=0, help="interleaved timing runs (default 100/60)")
    parser.add_argument("--no-ours", action="store_true", help="skip our compressor (minutes per model)")
    parser.add_argument("--no-nncf", action="store_true", help="skip NNCF")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the markdown table."""
    import openvino as ov

    args = _parse(argv)
    command = "python -m tools.bench_openvino " + shlex.join(sys.argv[1:] if argv is None else argv)
    started_load = load_average()
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory(prefix="bench-openvino-") as tmp:
        for name in args.models:
            print(f"[{name}] preparing data, compressing, timing...", file=sys.stderr, flush=True)
            workdir = Path(tmp) / name
            workdir.mkdir()
            rows += benchmark_model(bc.build_task(name, args.quick, workdir), args, workdir)
    print(
        f"host: {bc.host_description()}; onnxruntime {ort.__version__}; openvino {ov.__version__.split('-')[0]}"
    )
    print(f"{started_load} at the start, {load_average()} at the end (2 cores, shared)")
    print("latency: median of interleaved runs, batch 1, one thread each, vs ONNX Runtime on fp32\n")
    head = (
        "model",
        "variant",
        "engine",
        "latency vs ORT fp32 (ms)",
        "task metric",
        "agreement with ORT fp32",
    )
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\ncommand: {command.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
