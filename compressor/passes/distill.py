"""Knowledge distillation: train a smaller PyTorch student on an ONNX teacher's soft targets.

The teacher is any ONNX model, run by ONNX Runtime on the transfer set (`ctx.calibration`,
unlabeled is fine). The student is either supplied by the user (a `torch.nn.Module` taking the
teacher's inputs in graph order) or derived from the teacher: converted with onnx2torch, then
slimmed channel-wise by torch-pruning, keeping the surviving weights as its starting point.
Training runs on the CPU, seeded; a held-out slice of the transfer set decides early stopping, so
`ctx.validation` is only ever measured. The best student is exported back to ONNX.

Loss per output: classifier logits (2-D, more than one column) use the temperature-scaled KL
divergence to the teacher (times T^2); other outputs use mean squared error. With transfer labels,
`alpha * KD + (1 - alpha) * cross-entropy` on the first output.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from compressor.passes._metrics import compare_models, run_onnx, stack_outputs, timed
from compressor.passes.base import CompressionContext, PassResult
from compressor.torch_bridge import (
    export_onnx,
    onnx_to_torch,
    require_torch,
    slim,
    stack_inputs,
    torch_threads,
    unsupported_ops,
)
from edge_runtime.core.errors import CompressionError, DataError

if TYPE_CHECKING:
    import torch

__all__ = ["DistillOptions", "DistillPass", "derive_student", "distill_model", "train_student"]


@dataclass(frozen=True)
class DistillOptions:
    """How to build and train the student."""

    student: Any = None
    """A `torch.nn.Module` to train (copied, never mutated); None derives one from the teacher."""
    width: float = 0.5
    """Fraction of channels a derived student keeps in every prunable layer group."""
    round_to: int | None = None
    """Keep channel counts of a derived student multiples of this (SIMD-friendly), if set."""
    reinit: bool = False
    """Start a derived student from random weights instead of the teacher's surviving ones."""
    temperature: float = 4.0
    """Softmax temperature of the KD loss on logits."""
    alpha: float = 0.7
    """Weight of the KD loss against label cross-entropy (used only with transfer labels)."""
    transfer_labels: np.ndarray | None = None
    """Class ids of the transfer samples (`ctx.calibration`), when known."""
    epochs: int = 30
    patience: int = 6
    """Stop after this many epochs without a better held-out fidelity."""
    batch_size: int = 64
    learning_rate: float = 3e-3
    holdout_fraction: float = 0.15
    """Share of the transfer set held out to pick the best epoch."""
    threads: int = 1
    """Torch intra-op threads while training (1 is fastest for small models)."""
    opset: int = 17


@dataclass(frozen=True)
class _Data:
    """Transfer set as arrays: inputs, teacher targets and labels, already split."""

    inputs: list[np.ndarray]
    targets: list[np.ndarray]
    labels: np.ndarray | None
    train: np.ndarray
    holdout: np.ndarray
    probabilities: tuple[bool, ...]
    """Per output: the teacher emits probabilities (softmax applied), not logits."""


def _input_names(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that are real feeds (not initializers)."""
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _transfer_data(teacher: onnx.ModelProto, ctx: CompressionContext, options: DistillOptions) -> _Data:
    """Teacher soft targets on the transfer set, with a seeded train / held-out split."""
    if len(ctx.calibration) < 4:
        raise DataError(
            f"distillation needs a transfer set of at least 4 samples, got {len(ctx.calibration)}"
        )
    inputs = stack_inputs(ctx.calibration, _input_names(teacher))
    targets = [t.astype(np.float32) for t in stack_outputs(run_onnx(teacher, ctx.calibration, ctx.profile))]
    labels = options.transfer_labels
    if labels is not None and len(labels) != len(inputs[0]):
        raise DataError(f"{len(labels)} transfer labels for {len(inputs[0])} transfer samples")
    order = np.random.default_rng(ctx.seed).permutation(len(inputs[0]))
    cut = max(1, round(len(order) * options.holdout_fraction))
    flags = tuple(
        bool(_is_logits(t) and t.min() >= 0 and np.allclose(t.sum(1), 1, atol=1e-3)) for t in targets
    )
    return _Data(inputs, targets, labels, train=order[cut:], holdout=order[:cut], probabilities=flags)


def derive_student(
    teacher: onnx.ModelProto, example: list[torch.Tensor], width: float, *, round_to: int | None = None
) -> torch.nn.Module:
    """The teacher converted to torch with `1 - width` of its channels pruned away."""
    module = onnx_to_torch(teacher, example)
    if not 0.0 < width <= 1.0:
        raise CompressionError(f"student width must be in (0, 1], got {width}")
    return module if width == 1.0 else slim(module, example, 1.0 - width, round_to=round_to)


def _reinit(module: torch.nn.Module) -> None:
    """Reset every layer that knows how to (fresh random weights, same shapes)."""
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if sub is not module and callable(reset):
            reset()


def _as_list(outputs: Any) -> list[torch.Tensor]:
    """A module's output(s) as a list."""
    return list(outputs) if isinstance(outputs, list | tuple) else [outputs]


def _is_logits(array: np.ndarray | torch.Tensor) -> bool:
    """Whether an output looks like classifier logits: [batch, classes>1]."""
    return array.ndim == 2 and array.shape[1] > 1


def _loss(
    outputs: list[torch.Tensor], targets: list[torch.Tensor], labels: Any, data: _Data, o: DistillOptions
) -> Any:
    """KD loss over all outputs, mixed with label cross-entropy when labels are given."""
    torch = require_torch("distillation")
    f = torch.nn.functional
    total, first = 0.0, None
    for out, target, is_prob in zip(outputs, targets, data.probabilities, strict=True):
        if _is_logits(target):
            # probabilities become logits up to a per-row constant, which softmax ignores
            out, target = (
                (out.clamp_min(1e-8).log(), target.clamp_min(1e-8).log()) if is_prob else (out, target)
            )
            first = out if first is None else first
            t = o.temperature
            soft = f.log_softmax(out / t, dim=1)
            kd = f.kl_div(soft, f.log_softmax(target / t, dim=1), log_target=True, reduction="batchmean")
            total = total + kd * t * t
        else:
            total = total + f.mse_loss(out.reshape(target.shape), target)
    if labels is None or first is None:
        return total
    return o.alpha * total + (1.0 - o.alpha) * f.cross_entropy(first, labels)


def _score(
    student: torch.nn.Module, data: _Data, rows: np.ndarray, options: DistillOptions
) -> tuple[float, float]:
    """Held-out (fidelity, -KD loss): fidelity is top-1 agreement for logits, else cosine; loss breaks ties."""
    torch = require_torch("distillation")
    student.eval()
    with torch.no_grad():
        outs = _as_list(student(*[torch.from_numpy(x[rows]) for x in data.inputs]))
        targets = [torch.from_numpy(t[rows]) for t in data.targets]
        loss = -float(_loss(outs, targets, None, data, options))
    return _fidelity(data.targets[0][rows], outs[0].numpy()), loss


def _fidelity(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Top-1 agreement for logits, else mean cosine similarity."""
    candidate = candidate.reshape(reference.shape)
    if _is_logits(reference):
        return float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    ref, cand = reference.reshape(len(reference), -1), candidate.reshape(len(reference), -1)
    norms = np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-12)
    return float(np.mean(np.sum(ref * cand, axis=1) / norms))


def _epoch(student: Any, optimizer: Any, data: _Data, options: DistillOptions, generator: Any) -> float:
    """One pass over the training rows; returns the mean loss."""
    torch = require_torch("distillation")
    student.train()
    rows = torch.from_numpy(data.train)[torch.randperm(len(data.train), generator=generator)]
    losses = []
    for batch in rows.split(options.batch_size):
        idx = batch.numpy()
        outputs = _as_list(student(*[torch.from_numpy(x[idx]) for x in data.inputs]))
        targets = [torch.from_numpy(t[idx]) for t in data.targets]
        labels = None if data.labels is None else torch.from_numpy(np.asarray(data.labels)[idx]).long()
        loss = _loss(outputs, targets, labels, data, options)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def train_student(
    student: torch.nn.Module, data: _Data, options: DistillOptions, *, seed: int, log: Any
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Distill into `student` (trained in place) with early stopping; returns it at its best epoch."""
    torch = require_torch("distillation")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(student.parameters(), lr=options.learning_rate)
    start = best = _score(student, data, data.holdout, options)
    best_state, best_epoch, stale, history = copy.deepcopy(student.state_dict()), 0, 0, []
    for epoch in range(1, options.epochs + 1):
        loss = _epoch(student, optimizer, data, options, generator)
        score = _score(student, data, data.holdout, options)
        history.append({"epoch": epoch, "loss": round(loss, 6), "holdout_fidelity": round(score[0], 6)})
        log(
            f"distill epoch {epoch}/{options.epochs}  loss {loss:.4f}  "
            f"held-out fidelity {score[0]:.4f}  held-out KD loss {-score[1]:.4f}"
        )
        if score > best or best_epoch == 0:
            best, best_state, best_epoch, stale = score, copy.deepcopy(student.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= options.patience and epoch < options.epochs:
                log(f"distill: early stop after epoch {epoch}, best epoch {best_epoch}")
                break
    student.load_state_dict(best_state)
    summary = {
        "holdout_fidelity_start": start[0],
        "holdout_fidelity": best[0],
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "history": history,
    }
    return student.eval(), summary


def _student_for(teacher: onnx.ModelProto, data: _Data, options: DistillOptions) -> tuple[Any, str]:
    """The student to train and a short description of where it came from."""
    torch = require_torch("distillation")
    if options.student is not None:
        return copy.deepcopy(options.student).float(), type(options.student).__name__
    example = [torch.from_numpy(x[:1]) for x in data.inputs]
    student = derive_student(teacher, example, options.width, round_to=options.round_to)
    if options.reinit:
        _reinit(student)
    return student, f"derived from teacher (width {options.width:g}{', reinit' if options.reinit else ''})"


def distill_model(
    teacher: onnx.ModelProto, ctx: CompressionContext, options: DistillOptions
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Distill `teacher` into a student per `options`; returns the student as ONNX and the training report."""
    torch = require_torch("distillation")
    data = _transfer_data(teacher, ctx, options)
    with torch_threads(options.threads):
        student, origin = _student_for(teacher, data, options)
        (student, summary), seconds = timed(
            lambda: train_student(student, data, options, seed=ctx.seed, log=ctx.log)
        )
        example = [torch.from_numpy(x[:1]) for x in data.inputs]
        names = [o.name for o in teacher.graph.output]
        exported = export_onnx(student, example, _input_names(teacher), names, options.opset)
    return exported, {"student": origin, "train_seconds": round(seconds, 2), **summary}


@dataclass(frozen=True)
class DistillPass:
    """Replace the model by a distilled student (derived from it, or user-supplied)."""

    options: DistillOptions = DistillOptions()
    name: str = "distill"

    def supports(self, model: onnx.ModelProto) -> bool:
        """True when torch is installed and either a student is given or the teacher converts."""
        try:
            require_torch("distillation")
            return self.options.student is not None or not unsupported_ops(model)
        except CompressionError:
            return False

    def run(self, model: onnx.ModelProto, ctx: CompressionContext) -> PassResult:
        """Train a student on `model`'s soft targets and return it as ONNX with the numbers."""
        student, training = distill_model(model, ctx, self.options)
        report = {"pass": self.name, **training, **compare_models(model, student, ctx)}
        ctx.log(_summary_line(report))
        return PassResult(student, report)


def _summary_line(report: dict[str, Any]) -> str:
    """One line summarizing a distillation (or structured pruning) report."""
    fid = report.get("fidelity", {})
    agreement = fid.get("top1_agreement") or fid.get("cosine", float("nan"))
    return (
        f"{report['pass']}: params {report.get('params_before')} -> {report.get('params_after')}, "
        f"MACs {report.get('macs_before')} -> {report.get('macs_after')}, "
        f"bytes {report['bytes_before']} -> {report['bytes_after']}, fidelity {agreement:.4f}"
    )
