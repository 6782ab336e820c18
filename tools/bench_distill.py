"""Benchmark: the digits CNN teacher compressed by distill -> structured prune -> int8, plus TFLite.

Run from the repository root:  python -m tools.bench_distill [--quick] [--seed 0]

The teacher is trained here on scikit-learn's digits. Data splits: the passes fit on the first part
of the training split (transfer / calibration), decide on its last 300 images (validation), and
every row's accuracy is measured on the held-out test split none of them saw. Each ONNX stage is
timed interleaved with the fp32 teacher in this process (batch 1, one intra-op thread); the TFLite
row is the pruned student converted to a full-integer int8 `.tflite` and run by the LiteRT
interpreter (one thread), timed in the same interleaved loop.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from compressor.passes._metrics import deflated_bytes, model_cost
from compressor.passes.base import CompressionContext
from compressor.passes.distill import DistillOptions, DistillPass
from compressor.passes.prune import StructuredPruneOptions, StructuredPrunePass
from compressor.passes.quantize import Int8Quantization
from compressor.teachers import DigitsData, as_samples, digits_data, train_digits_cnn
from compressor.tflite_export import TFLiteExportPass
from edge_runtime.config.profiles import load_profile

__all__ = ["Stage", "main"]

VALIDATION = 300


@dataclass(frozen=True)
class Stage:
    """One row of the table: a model (ONNX bytes or a .tflite) and how it was made."""

    name: str
    data: bytes
    tflite: bool = False


class _TFLiteSession:
    """A LiteRT interpreter behind the `session.run(None, feed)` call the timing loop uses."""

    def __init__(self, data: bytes) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=data, num_threads=1)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]

    def run(self, _names: Any, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Invoke on the single input of `feed`."""
        self.interpreter.set_tensor(self.input, next(iter(feed.values())).astype(np.float32))
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(self.output)]


def _session(stage: Stage) -> Any:
    """A one-thread runner for a stage."""
    if stage.tflite:
        return _TFLiteSession(stage.data)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(stage.data, options, providers=["CPUExecutionProvider"])


def _accuracy(session: Any, data: DigitsData) -> float:
    """Top-1 accuracy on the held-out test split."""
    predictions = [int(np.argmax(session.run(None, feed)[0])) for feed in as_samples(data.x_test)]
    return float(np.mean(np.array(predictions) == data.y_test))


def _interleaved(
    sessions: Mapping[str, Any], feed: Mapping[str, np.ndarray], rounds: int
) -> dict[str, float]:
    """Median latency (ms) of each runner, timed round-robin so they share the machine's noise."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, feed)
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values) * 1e3) for name, values in times.items()}


def _stages(data: DigitsData, args: argparse.Namespace, log: Callable[[str], None]) -> list[Stage]:
    """Train the teacher and run every compression stage."""
    fit, hold = data.x_train[:-VALIDATION], data.x_train[-VALIDATION:]
    teacher = train_digits_cnn(data, seed=args.seed, epochs=args.teacher_epochs)
    with tempfile.TemporaryDirectory() as workdir:
        ctx = CompressionContext(
            load_profile("x86-vnni-gateway"),
            as_samples(fit),
            as_samples(hold),
            Path(workdir),
            labels=data.y_train[-VALIDATION:],
            seed=args.seed,
            log=log,
        )
        labels = data.y_train[:-VALIDATION]
        distilled = (
            DistillPass(DistillOptions(width=args.width, epochs=args.epochs, transfer_labels=labels))
            .run(teacher, ctx)
            .model
        )
        finetune = DistillOptions(epochs=args.epochs, transfer_labels=labels)
        pruned = (
            StructuredPrunePass(StructuredPruneOptions(ratio=args.prune, finetune=finetune))
            .run(distilled, ctx)
            .model
        )
        int8 = Int8Quantization().run(pruned, ctx).model
        tflite_ctx = CompressionContext(
            load_profile("raspberry-pi-zero-2w"), as_samples(fit), as_samples(hold), Path(workdir), log=log
        )
        tflite = Path(TFLiteExportPass().run(pruned, tflite_ctx).report["artifact"]).read_bytes()
    return [
        Stage("fp32 teacher", teacher.SerializeToString()),
        Stage(f"distilled (width {args.width:g})", distilled.SerializeToString()),
        Stage(f"+ structured prune ({args.prune:.0%} channels)", pruned.SerializeToString()),
        Stage("+ int8 (compressor.passes.quantize)", int8.SerializeToString()),
        Stage("pruned student as int8 .tflite (LiteRT)", tflite, tflite=True),
    ]


def _table(stages: list[Stage], data: DigitsData, rounds: int) -> list[str]:
    """The markdown table: size, MACs, latency ratio and accuracy per stage."""
    sessions = {s.name: _session(s) for s in stages}
    feed = as_samples(data.x_test)[0]
    latency = _interleaved(sessions, feed, rounds)
    base = stages[0]
    base_acc, base_ms = _accuracy(sessions[base.name], data), latency[base.name]
    rows = [
        "| stage | bytes | x smaller | deflated bytes | MACs | latency ms | latency ratio | accuracy | drop pp |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage in stages:
        acc = _accuracy(sessions[stage.name], data)
        macs = "" if stage.tflite else model_cost(onnx.load_from_string(stage.data), feed)["macs"]
        rows.append(
            f"| {stage.name} | {len(stage.data):,} | {len(base.data) / len(stage.data):.1f} | "
            f"{deflated_bytes(stage.data):,} | {macs} | {latency[stage.name]:.4f} | "
            f"{latency[stage.name] / base_ms:.2f} | {acc:.2%} | {100 * (base_acc - acc):+.2f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and timing rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=float, default=0.5, help="distilled student's channel fraction")
    parser.add_argument("--prune", type=float, default=0.5, help="structured pruning ratio")
    parser.add_argument("--verbose", action="store_true", help="print the passes' progress lines")
    args = parser.parse_args(argv)
    args.teacher_epochs, args.epochs = (10, 8) if args.quick else (30, 30)
    log = print if args.verbose else (lambda line: None)
    started = time.perf_counter()
    data = digits_data(args.seed)
    stages = _stages(data, args, log)
    rows = _table(stages, data, rounds=300 if args.quick else 2000)
    command = "python -m tools.bench_distill " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(
        f"\n`{command.strip()}`  ({time.perf_counter() - started:.0f} s; digits test split, "
        f"{len(data.y_test)} images; batch 1, 1 thread)\n"
    )
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
