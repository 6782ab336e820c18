"""Benchmark: fp32 vs ONNX Runtime `quantize_static` defaults vs our compressor, on real models.

Run from the repository root:  python -m tools.bench_compress [--quick] [--models digits,cls,det,rec,vad,minilm,layout]
                                   [--engines onnxruntime,openvino]

Every candidate is timed interleaved with its fp32 model in ONNX Runtime in this process (batch 1, one
thread; blocks of BLOCK runs back to back, the blocks alternating) and judged on held-out samples the
compressor never saw (it gets a separate tuning split). With OpenVINO installed, the fp32 model also
runs through our OpenVINO engine (f32, and bf16 where the CPU has it), NNCF's post-training int8 of
OpenVINO's own model runs beside it (what OpenVINO + NNCF reach on their own), and our compressor's
artifact runs through the engine it chose, with the options it chose.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from compressor.tasks import TaskKind, TaskSpec, score_output
from tools import zoo

__all__ = ["MODELS", "Candidate", "Row", "Task", "build_task", "host_description", "main"]

Feed = dict[str, np.ndarray]
MODELS = ("digits", "cls", "det", "rec", "vad", "minilm", "layout")
ENGINES = ("onnxruntime", "openvino")
DET_THRESHOLD = 0.3
BLOCK = 10
"""Runs of one model back to back before the other's turn. A device serving a model runs it back to
back, its weights warm in the cache; alternating every call timed each model just after the other had
evicted them (the MiniLM int8 graph, 23 MB, right after the 90 MB fp32 one: 3.0-3.2 ms, after itself
2.3-2.4 ms, AMD EPYC). The first run of a block pays that, the median does not."""
LAYOUT_PAGE_MS = 400.0
"""The layout detector reads a whole 800x608 document page (fp32: about 140 ms on one Xeon thread):
it is held to a page budget, not the x86 profile's 100 ms per-frame target."""
# (calibration, tuning, evaluation) sample counts, full and --quick.
_SPLITS = {
    "cls": ((128, 300, 600), (32, 100, 200)),
    "det": ((32, 40, 60), (8, 12, 20)),
    "rec": ((64, 400, 300), (16, 40, 80)),
    "vad": ((240, 240, 600), (120, 120, 300)),
    "minilm": ((64, 100, 200), (16, 40, 80)),
    "layout": ((32, 40, 60), (8, 16, 20)),
}


class Kind(StrEnum):
    """How a model's outputs are judged."""

    CLASSIFIER = "classifier"
    DETECTOR = "detector"
    RECOGNIZER = "recognizer"
    DECISION = "decision"
    ENCODER = "encoder"
    LAYOUT = "layout"
    """A split dense detection head (several outputs), judged by tools/zoo_layout.py."""


@dataclass(frozen=True, eq=False)
class Task:
    """A model with calibration, tuning (given to the compressor) and evaluation data."""

    name: str
    model_path: Path
    kind: Kind
    calibration: list[Feed]
    tuning: list[Feed]
    evaluation: list[Feed]
    tuning_labels: np.ndarray | None = None
    labels: np.ndarray | None = None
    texts: list[str] | None = None
    tasks: tuple[str, ...] = ()
    """--task options for our compressor (OUTPUT=KIND[:MIN])."""
    latency_target_ms: float | None = None
    """The latency budget ours is held to instead of the profile's (a model heavier than its frames)."""


@dataclass(frozen=True)
class Candidate:
    """One way of compressing a model: its bytes and load options, or why there are none."""

    variant: str
    model_bytes: bytes | None
    session_config: dict[str, str] = field(default_factory=dict)
    failure: str = ""
    seconds: float = 0.0
    engine: str = "onnxruntime"
    engine_options: dict[str, str] = field(default_factory=dict)
    """What our engine reads from the bundle (OpenVINO: precision hint, static input shape)."""
    openvino_model: Any = None
    """An OpenVINO model (not ONNX; `model_bytes` then holds its weights file), compiled as is."""


@dataclass(frozen=True)
class Row:
    """One line of the result table."""

    model: str
    variant: str
    size: str
    smaller: str
    latency: str
    task_metric: str
    agreement: str


# ---------------------------------------------------------------- tasks


def _split_calls(name: str, quick: bool) -> tuple[int, int, int]:
    return _SPLITS[name][1 if quick else 0]


def build_task(name: str, quick: bool, workdir: Path) -> Task:
    """Model and data for one benchmark model (`digits`, `cls`, `det` or `rec`)."""
    if name == "digits":
        digits = zoo.digits_task()
        path = workdir / "digits.onnx"
        path.write_bytes(digits.model)
        return Task(
            name,
            path,
            Kind.CLASSIFIER,
            digits.calibration,
            digits.tuning,
            digits.validation,
            digits.tuning_labels,
            digits.labels,
        )
    n_cal, n_tune, n_eval = _split_calls(name, quick)
    if name == "cls":
        calibration, _ = zoo.text_direction_dataset(n_cal, seed=101)
        tuning, tuning_labels = zoo.text_direction_dataset(n_tune, seed=102)
        evaluation, labels = zoo.text_direction_dataset(n_eval, seed=103)
        return Task(
            name,
            zoo.ppocr_model("cls"),
            Kind.CLASSIFIER,
            calibration,
            tuning,
            evaluation,
            tuning_labels,
            labels,
        )
    if name == "det":
        return Task(
            name,
            zoo.ppocr_model("det"),
            Kind.DETECTOR,
            zoo.detection_dataset(n_cal, seed=201),
            zoo.detection_dataset(n_tune, seed=202),
            zoo.detection_dataset(n_eval, seed=203),
        )
    if name == "rec":
        evaluation, texts = zoo.recognition_lines(n_eval, seed=303)
        return Task(
            name,
            zoo.ppocr_model("rec"),
            Kind.RECOGNIZER,
            zoo.recognition_dataset(n_cal, seed=301),
            zoo.recognition_dataset(n_tune, seed=302),
            evaluation,
            texts=texts,
            tasks=("softmax_11.tmp_0=ctc:0.98",),  # the bar: >= 98% of lines read as fp32 reads them
        )
    if name == "vad":
        from tools.zoo_vad import vad_feeds, vad_model

        evaluation, voiced = vad_feeds(n_eval, seed=403)
        return Task(
            name,
            vad_model(),
            Kind.DECISION,
            vad_feeds(n_cal, seed=401)[0],
            vad_feeds(n_tune, seed=402)[0],
            evaluation,
            labels=voiced,
            tasks=("output=decision:0.98",),
        )
    if name == "minilm":
        from tools.zoo_minilm import minilm_feeds, minilm_model

        return Task(
            name,
            minilm_model(),
            Kind.ENCODER,
            minilm_feeds(n_cal, seed=501),
            minilm_feeds(n_tune, seed=502),
            minilm_feeds(n_eval, seed=503),
        )
    if name == "layout":
        from tools.zoo_layout import LAYOUT_TASK, layout_feeds, layout_model

        return Task(
            name,
            layout_model(),
            Kind.LAYOUT,
            layout_feeds(n_cal, seed=601),
            layout_feeds(n_tune, seed=602),
            layout_feeds(n_eval, seed=603),
            tasks=(LAYOUT_TASK,),
            latency_target_ms=LAYOUT_PAGE_MS,
        )
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


# ---------------------------------------------------------------- candidates


class _Reader:
    """ONNX Runtime CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self._feeds = list(feeds)
        self._next = 0

    def get_next(self) -> Feed | None:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def rewind(self) -> None:
        self._next = 0


def _short(exc: BaseException, limit: int = 110) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if lines:
        text = f"{type(exc).__name__}: {lines[-1]}"
    else:  # a bare assert: name where it fired
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        text = f"{type(exc).__name__} in {Path(frame.filename).name}:{frame.name}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pre_process(source: Path, out: Path) -> str:
    """`quant_pre_process` with defaults; if its symbolic shape inference breaks, retry without it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(out))
        return "ORT pre_process + quantize_static"
    except Exception:  # symbolic shape inference asserts on graphs it does not understand
        quant_pre_process(str(source), str(out), skip_symbolic_shape=True)
        return "ORT pre_process(skip_symbolic_shape) + quantize_static"


def ort_defaults(task: Task, workdir: Path, *, preprocess: bool) -> Candidate:
    """`quantize_static(model, out, reader)` with every default, optionally after `quant_pre_process`."""
    from onnxruntime.quantization import quantize_static

    variant = "ORT pre_process + quantize_static" if preprocess else "ORT quantize_static defaults"
    source, started = task.model_path, time.perf_counter()
    out = workdir / f"{task.name}.{'pre.' if preprocess else ''}ort.onnx"
    try:
        with contextlib.chdir(workdir):  # symbolic shape inference drops temp files into the cwd
            if preprocess:
                source = workdir / f"{task.name}.pre.onnx"
                variant = _pre_process(task.model_path, source)
            quantize_static(str(source), str(out), _Reader(task.calibration))
    except Exception as exc:  # ORT raises many unrelated types; the reason is what we report
        return Candidate(variant, None, failure=f"fails: {_short(exc)}")
    return Candidate(variant, out.read_bytes(), seconds=time.perf_counter() - started)


def ort_dynamic(task: Task, workdir: Path, *, by_hand: bool = False) -> Candidate:
    """`quantize_dynamic(model, out, per_channel=True)`: ORT's int8 for transformers and RNNs. `by_hand`
    first moves Constant-node weights to initializers, as a user who read the warnings would (the
    MEASURED.md anchor for encoders), since ORT's quantizer only quantizes initializers."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    variant = "ORT quantize_dynamic per-channel" + (", weights moved to initializers" if by_hand else "")
    source, out, started = task.model_path, workdir / f"{task.name}.dyn.onnx", time.perf_counter()
    try:
        if by_hand:
            import onnx

            from compressor.onnx_model import constants_to_initializers

            source = workdir / f"{task.name}.init.onnx"
            onnx.save_model(constants_to_initializers(onnx.load(str(task.model_path))), str(source))
        with contextlib.chdir(workdir):
            quantize_dynamic(str(source), str(out), per_channel=True, weight_type=QuantType.QInt8)
    except Exception as exc:  # ORT raises many unrelated types; the reason is what we report
        return Candidate(variant, None, failure=f"fails: {_short(exc)}")
    return Candidate(variant, out.read_bytes(), seconds=time.perf_counter() - started)


def _weights_in_constants(path: Path) -> bool:
    """True for graphs that hold their weights in Constant nodes (no initializers), as Paddle exports do."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return not model.graph.initializer and any(n.op_type == "Constant" for n in model.graph.node)


def ours(
    task: Task,
    profile_name: str,
    workdir: Path,
    log: Callable[[str], object],
    engines: Sequence[str] = ENGINES,
) -> Candidate:
    """Our compressor (`compressor.pipeline.compress`) with the profile's engines limited to
    `engines`, or why it produced nothing."""
    started = time.perf_counter()
    try:
        from compressor.pipeline import compress
        from compressor.tasks import TaskConfig, parse_task_option
        from edge_runtime.config.profiles import load_profile
        from edge_runtime.core.errors import EdgeError
    except ImportError as exc:
        return Candidate("ours", None, failure=f"not available: {_short(exc)}")
    profile = load_profile(profile_name)
    kept = tuple(engine for engine in profile.runtime.engines if engine in engines) or (
        profile.runtime.engine,
    )
    budgets = profile.budgets
    if task.latency_target_ms is not None:
        budgets = dataclasses.replace(budgets, latency_target_ms=task.latency_target_ms)
    profile = dataclasses.replace(
        profile,
        runtime=dataclasses.replace(profile.runtime, engine=kept[0], engines=kept),
        budgets=budgets,
    )
    try:
        result = compress(
            task.model_path,
            profile,
            task.calibration,
            validation=task.tuning,
            labels=task.tuning_labels,
            tasks=TaskConfig(specs=dict(parse_task_option(text) for text in task.tasks)),
            workdir=workdir,
            log=log,
        )
    except EdgeError as exc:
        return Candidate("ours", None, failure=f"refused: {_short(exc, 200)}")
    options = dict(result.engine_options)
    engine = result.engine or str(profile.runtime.engine)  # empty: the profile's preferred engine
    variant = "ours" if engine == "onnxruntime" else f"ours ({_engine_label(engine, options)})"
    return Candidate(variant, result.model_bytes, dict(result.session_config),
                     seconds=time.perf_counter() - started, engine=engine,
                     engine_options=options)  # fmt: skip


def _engine_label(engine: str, options: dict[str, str]) -> str:
    """`OpenVINO bf16, static shape` for a table cell."""
    name = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}.get(engine, engine)
    parts = [options["inference_precision"]] if "inference_precision" in options else []
    return " ".join(
        [name, ", ".join([*parts, *(["static shape"] if "static_shape" in options else [])])]
    ).strip()


def openvino_fp32(task: Task) -> list[Candidate]:
    """The fp32 model through our OpenVINO engine: f32, and bf16 where OpenVINO reports BF16 here."""
    model = task.model_path.read_bytes()
    return [
        Candidate(f"fp32 (OpenVINO {p})", model, engine="openvino", engine_options={"inference_precision": p})
        for p in _openvino_precisions()
    ]


def _openvino_precisions() -> list[str]:
    """f32, and bf16 where OpenVINO reports BF16 on this CPU."""
    import openvino as ov

    return ["f32"] + (
        ["bf16"] if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else []
    )


def openvino_nncf(task: Task) -> list[Candidate]:
    """What OpenVINO + NNCF reach on their own: NNCF's post-training int8 of OpenVINO's own model
    (model type transformer for an encoder, as NNCF's guide has it), at f32 and at bf16 where the CPU
    has it. Not a file a bundle carries (an OpenVINO model; its bytes are the IR weights file)."""
    import logging

    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    transformer = task.kind is Kind.ENCODER
    name = "OpenVINO + NNCF alone: NNCF int8" + (", model type transformer" if transformer else "")
    try:
        model = ov.Core().read_model(str(task.model_path))
        quantized = nncf.quantize(
            model, nncf.Dataset(task.calibration), subset_size=len(task.calibration),
            model_type=nncf.ModelType.TRANSFORMER if transformer else None,
        )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="bench-nncf-") as folder:
            ov.save_model(quantized, f"{folder}/model.xml", compress_to_fp16=False)
            weights = Path(f"{folder}/model.bin").read_bytes()
    except Exception as exc:  # a tool failing on a real model is a result
        return [Candidate(f"{name} (OpenVINO)", None, failure=f"fails: {_short(exc)}")]
    return [
        Candidate(
            f"{name} (OpenVINO {p})",
            weights,
            engine="openvino",
            engine_options={"inference_precision": p},
            openvino_model=quantized,
        )
        for p in _openvino_precisions()
    ]


# ---------------------------------------------------------------- measuring


def session(model: bytes | Path, config: dict[str, str] | None = None) -> ort.InferenceSession:
    """A CPU session as a device loads the model: one intra-op thread, sequential."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def blocked_medians(calls: Sequence[Callable[[], object]], runs: int) -> list[float]:
    """Median ms of each call over `runs` timed runs, in blocks of BLOCK back to back; the blocks take
    turns in an order that rotates, and reverses, every round, so the machine's load falls on each alike."""
    for _ in range(max(3, runs // 10)):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for index in range(max(1, runs // BLOCK)):
        shift = index % len(calls)
        order = [*range(shift, len(calls)), *range(shift)]
        for which in reversed(order) if index % 2 else order:
            for _ in range(BLOCK):
                started = time.perf_counter()
                calls[which]()
                times[which].append(time.perf_counter() - started)
    return [float(np.median(t) * 1e3) for t in times]


def latency_ratio(
    reference: ort.InferenceSession, candidate: Any, feed: Feed, runs: int
) -> tuple[float, float]:
    """Median ms of the reference and the candidate, timed in alternating blocks (`blocked_medians`)."""
    base_ms, cand_ms = blocked_medians(
        [lambda: reference.run(None, feed), lambda: candidate.run(None, feed)], runs
    )
    return base_ms, cand_ms


class OpenvinoModelRunner:
    """An OpenVINO model compiled as our engine compiles ONNX (threads, precision hint, latency), fed as
    our engine feeds it (input tensors set, a bare `infer()`), behind `run(None, feed) -> list`."""

    def __init__(self, model: Any, options: dict[str, str], threads: int) -> None:
        import openvino as ov

        from edge_runtime.engines.openvino import compile_config

        core = ov.Core()
        capabilities = tuple(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        config, _ = compile_config(options.get("inference_precision", "f32"), threads, capabilities)
        compiled = core.compile_model(model, "CPU", config)
        self._inputs = [port.any_name for port in compiled.inputs]
        self._outputs = len(compiled.outputs)
        self._request = compiled.create_infer_request()
        self._tensor = ov.Tensor

    def run(self, _names: object, feed: Feed) -> list[np.ndarray]:
        """Outputs in the model's order."""
        for index, name in enumerate(self._inputs):
            self._request.set_input_tensor(index, self._tensor(np.ascontiguousarray(feed[name])))
        self._request.infer()
        return [self._request.get_output_tensor(index).data.copy() for index in range(self._outputs)]


def runner(candidate: Candidate, profile_name: str) -> Any:
    """The candidate loaded as a device loads it: an ORT session, or our OpenVINO engine with the
    candidate's options and the profile's threads (`run(None, feed) -> list` either way)."""
    assert candidate.model_bytes is not None
    if candidate.engine == "onnxruntime":
        return session(candidate.model_bytes, candidate.session_config)
    from compressor.openvino_target import OpenvinoSession
    from edge_runtime.config.profiles import load_profile

    profile = load_profile(profile_name)
    if candidate.openvino_model is not None:
        threads = profile.runtime.intra_op_threads
        return OpenvinoModelRunner(candidate.openvino_model, candidate.engine_options, threads)
    return OpenvinoSession(candidate.model_bytes, candidate.engine_options, profile)


def _outputs(s: Any, feeds: Sequence[Feed], every: bool = False) -> list:
    """The first output per feed (every output, as a list per feed, when `every`)."""
    return [s.run(None, feed) if every else s.run(None, feed)[0] for feed in feeds]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norm = np.linalg.norm(a64) * np.linalg.norm(b64)
    return float(a64 @ b64 / norm) if norm else float(np.array_equal(a64, b64))


def quality(task: Task, reference: list[np.ndarray], outputs: list[np.ndarray]) -> tuple[str, str]:
    """(task metric, agreement with fp32) as table cells."""
    if task.kind is Kind.LAYOUT:
        from tools.zoo_layout import layout_quality

        return layout_quality(reference, outputs)
    if task.kind is Kind.CLASSIFIER:
        predicted = np.array([o.reshape(-1).argmax() for o in outputs])
        agree = np.mean(predicted == np.array([o.reshape(-1).argmax() for o in reference]))
        return f"accuracy {np.mean(predicted == task.labels):.2%}", f"top-1 {agree:.2%}"
    if task.kind is Kind.DETECTOR:
        cosine = np.mean([_cosine(r, o) for r, o in zip(reference, outputs, strict=True)])
        ref_mask = np.stack(reference) > DET_THRESHOLD
        mask = np.stack(outputs) > DET_THRESHOLD
        iou = np.sum(ref_mask & mask) / max(1, np.sum(ref_mask | mask))
        boxes = score_output("map", reference, outputs, TaskSpec(TaskKind.BOXES)).value
        return "-", f"map cosine {cosine:.4f}, mask IoU@{DET_THRESHOLD} {iou:.3f}, boxes matched {boxes:.1%}"
    if task.kind is Kind.ENCODER:  # sentence embedding: mean over the unmasked tokens
        masks = [feed["attention_mask"][0].astype(bool) for feed in task.evaluation]
        pooled = lambda outs: [o[0][m].mean(0) for o, m in zip(outs, masks, strict=True)]  # noqa: E731
        cosine = np.mean([_cosine(r, o) for r, o in zip(pooled(reference), pooled(outputs), strict=True)])
        return "-", f"sentence embedding cosine {cosine:.4f}"
    if task.kind is Kind.DECISION:
        decided = np.array([o.item() > 0.5 for o in outputs])
        same = np.mean(decided == np.array([r.item() > 0.5 for r in reference]))
        return f"voiced chunks found {np.mean(decided == task.labels):.1%}", f"decisions {same:.1%}"
    lines = [zoo.ctc_greedy_decode(o)[0] for o in outputs]
    ref_lines = [zoo.ctc_greedy_decode(r)[0] for r in reference]
    read = np.mean([line.strip() == text for line, text in zip(lines, task.texts or [], strict=True)])
    same = np.mean([a == b for a, b in zip(lines, ref_lines, strict=True)])
    steps = np.mean(
        np.concatenate(
            [(r.argmax(-1) == o.argmax(-1)).ravel() for r, o in zip(reference, outputs, strict=True)]
        )
    )
    return f"read {read:.1%}", f"lines {same:.1%}, steps {steps:.2%}"


def measure(
    task: Task, candidate: Candidate, fp32: ort.InferenceSession, reference: list[np.ndarray], runs: int,
    profile_name: str = "x86-vnni-gateway",
) -> Row:  # fmt: skip
    """Size, latency ratio and quality of one candidate, as a table row."""
    fp32_bytes = task.model_path.stat().st_size
    if candidate.model_bytes is None:
        return Row(task.name, candidate.variant, candidate.failure, "", "", "", "")
    try:
        s = runner(candidate, profile_name)
        outputs = _outputs(s, task.evaluation, every=task.kind is Kind.LAYOUT)
    except Exception as exc:  # a written model an engine cannot load or run is a result too
        return Row(task.name, candidate.variant, f"fails to load/run: {_short(exc)}", "", "", "", "")
    base_ms, cand_ms = latency_ratio(fp32, s, task.evaluation[0], runs)
    metric, agreement = quality(task, reference, outputs)
    size = len(candidate.model_bytes)
    return Row(
        task.name,
        candidate.variant,
        f"{size:,}",
        f"{fp32_bytes / size:.2f}x",
        f"{cand_ms / base_ms:.2f}x ({cand_ms:.3g} / {base_ms:.3g} ms)",
        metric,
        agreement,
    )


def benchmark_model(task: Task, args: argparse.Namespace, workdir: Path) -> list[Row]:
    """Every candidate of one model, measured against its fp32 model."""
    log = print if args.verbose else (lambda _line: None)
    fp32 = session(task.model_path)
    reference = _outputs(fp32, task.evaluation, every=task.kind is Kind.LAYOUT)
    fp32_candidate = Candidate("fp32", task.model_path.read_bytes())
    candidates = [fp32_candidate]
    if "openvino" in args.engines:
        candidates += openvino_fp32(task) + openvino_nncf(task)
    candidates.append(ort_defaults(task, workdir, preprocess=False))
    if candidates[-1].model_bytes is None or _weights_in_constants(task.model_path):
        candidates.append(ort_defaults(task, workdir, preprocess=True))
    if task.kind in (Kind.RECOGNIZER, Kind.DECISION, Kind.ENCODER):  # ORT's dynamic int8 too
        candidates.append(ort_dynamic(task, workdir))
        if task.kind is Kind.ENCODER and _weights_in_constants(task.model_path):
            candidates.append(ort_dynamic(task, workdir, by_hand=True))
    if not args.baseline_only:
        candidates.append(ours(task, args.profile, workdir, log, args.engines))
    runs = args.runs or (60 if args.quick else 300 if task.name in ("digits", "cls") else 200)
    return [measure(task, c, fp32, reference, runs, args.profile) for c in candidates]


# ---------------------------------------------------------------- output


def host_description() -> str:
    """CPU model name and the int8-relevant instruction sets from /proc/cpuinfo."""
    name, flags = platform.processor() or platform.machine(), set[str]()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    wanted = ("avx2", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    marks = [f"{flag} {'yes' if flag in flags else 'no'}" for flag in wanted]
    return f"{name}; {', '.join(marks)}"


def _versions(engines: Sequence[str]) -> str:
    """`onnxruntime 1.32.0, openvino 2026.4.1` for the engines in use."""
    versions = [f"onnxruntime {ort.__version__}"]
    if "openvino" in engines:
        import openvino as ov

        versions.append(f"openvino {ov.__version__.split('-')[0]}")
    return ", ".join(versions)


def _table(rows: list[Row]) -> str:
    head = (
        "model",
        "variant",
        "bytes",
        "x smaller",
        "latency vs fp32 (candidate / fp32 ms)",
        "task metric",
        "agreement with fp32",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(getattr(r, f) for f in Row.__dataclass_fields__) + " |" for r in rows]
    return "\n".join(lines)


def _default_engines() -> list[str]:
    """ONNX Runtime, and OpenVINO when it is installed."""
    import importlib.util

    return ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS)
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples and timing runs")
    parser.add_argument("--baseline-only", action="store_true", help="fp32 and ORT defaults only")
    parser.add_argument("--profile", default="x86-vnni-gateway", help="device profile for our compressor")
    parser.add_argument("--runs", type=int, default=0, help="timing runs per candidate (default 300/200)")
    parser.add_argument("--verbose", action="store_true", help="show the compressor's log")
    parser.add_argument(
        "--engines", default=",".join(_default_engines()),
        help="engines the fp32 rows run in and our compressor may choose (onnxruntime, openvino); "
        "default: both when openvino is installed",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not set(args.engines) <= set(ENGINES) or "onnxruntime" not in args.engines:
        parser.error(f"--engines: onnxruntime and optionally openvino (got {', '.join(args.engines)})")
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the markdown table."""
    args = _parse(argv)
    command = "python -m tools.bench_compress " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows: list[Row] = []
    counts = []
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        for name in args.models:
            print(f"[{name}] preparing data and compressing...", file=sys.stderr, flush=True)
            workdir = Path(tmp) / name
            workdir.mkdir()
            task = build_task(name, args.quick, workdir)
            counts.append(f"{name} {len(task.calibration)}/{len(task.tuning)}/{len(task.evaluation)}")
            rows += benchmark_model(task, args, workdir)
    print(f"host: {host_description()}; {_versions(args.engines)}; profile {args.profile}")
    one, five, fifteen = os.getloadavg()
    print(f"load average at the end: {one:.2f}, {five:.2f}, {fifteen:.2f}")
    print(
        f"latency: median against ORT fp32 in alternating blocks of {BLOCK} runs, batch 1, 1 thread; "
        "quality on held-out samples\n"
    )
    print(_table(rows))
    print(f"\nsamples (calibration / tuning, given to ours / evaluation): {'; '.join(counts)}")
    print(f"\ncommand: {command.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
