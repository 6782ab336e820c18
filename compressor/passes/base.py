"""What every compression pass looks like, and the context a pass runs in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from compressor.tasks import TaskConfig
from edge_runtime.config.profiles import DeviceProfile

if TYPE_CHECKING:
    import onnx

    from compressor.measure import Fidelity

__all__ = ["CompressionContext", "Pass", "PassResult", "Samples"]

Samples = Sequence[Mapping[str, np.ndarray]]
"""Model feeds: one dict of input name -> array per sample (batch dimension included)."""


@dataclass(frozen=True)
class CompressionContext:
    """Everything a pass may read besides the model: device, data, scratch folder, progress."""

    profile: DeviceProfile
    calibration: Samples
    """Samples the pass may fit to (calibration for int8, transfer set for distillation)."""
    validation: Samples
    """The selection split: every measured choice is made on it; never used to fit, never reported."""
    workdir: Path
    labels: np.ndarray | None = None
    """Task labels for `validation` (class ids), when the user has them."""
    seed: int = 0
    log: Any = print
    """Callable taking one line of progress text."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Per-pass options by pass name, from the CLI or the profile recipe."""
    tasks: TaskConfig = field(default_factory=TaskConfig)
    """How each output is judged (named by the user or guessed) and the user's own metric."""
    output_names: tuple[str, ...] | None = None
    """The model's output names, in order, for the task of each output."""

    def fidelity(
        self, reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]], *, labels: bool = True
    ) -> Fidelity:
        """Candidate vs reference outputs on `validation`, judged by each output's task."""
        from compressor.measure import fidelity

        return fidelity(
            reference,
            candidate,
            self.labels if labels else None,
            names=self.output_names,
            tasks=self.tasks,
        )


@dataclass(frozen=True)
class PassResult:
    """A pass's output: a new model (the input is never mutated) and the numbers it measured."""

    model: onnx.ModelProto
    report: dict[str, Any]
    artifact: bytes | None = None
    """A finished artifact in another format (e.g. .tflite), when the pass produced one."""
    artifact_format: str = "onnx"
    """Format of `artifact`: "tflite"; "onnx" when the artifact is `model` itself."""


class Pass(Protocol):
    """One compression step (fold, prune, distill, quantize...)."""

    @property
    def name(self) -> str:
        """The pass's registry name."""
        ...

    def supports(self, model: onnx.ModelProto) -> bool:
        """Whether this pass can do anything useful on `model`."""
        ...

    def run(self, model: onnx.ModelProto, ctx: CompressionContext) -> PassResult:
        """Return a transformed copy of `model` and a report; never mutate `model`."""
        ...
