"""Pruning passes: unstructured magnitude pruning (ONNX + numpy) and structured channel pruning (torch).

* `MagnitudePrunePass` zeroes the smallest-magnitude weights of Conv/Gemm/MatMul to a target
  sparsity, globally (one threshold across layers) or per layer. The tensors stay dense, so
  inference is not faster, but the bundle's deflate stores runs of zeros in few bytes: the report
  gives both the raw and the deflated size. At sparsity 0 the model is returned unchanged.
* `StructuredPrunePass` removes whole channels/neurons consistently across dependent layers, so the
  model really does less work: ONNX -> torch (onnx2torch) -> torch-pruning (group L2 magnitude,
  output layers kept) -> fine-tuned by distillation from the unpruned model -> ONNX. It needs the
  `distill` extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.passes._metrics import compare_models, has_weights
from compressor.passes.base import CompressionContext, PassResult
from compressor.passes.distill import DistillOptions, distill_model
from compressor.torch_bridge import require_torch, unsupported_ops
from edge_runtime.core.errors import CompressionError, UsageError

__all__ = [
    "MagnitudePruneOptions",
    "MagnitudePrunePass",
    "PruneScope",
    "StructuredPruneOptions",
    "StructuredPrunePass",
    "magnitude_prune",
    "prunable_weights",
    "weight_sparsity",
]


class PruneScope(StrEnum):
    """How the sparsity target is spread over layers."""

    GLOBAL = "global"
    """One magnitude threshold across all layers: big layers give up more."""
    PER_LAYER = "per_layer"
    """Every layer reaches the target on its own."""


@dataclass(frozen=True)
class MagnitudePruneOptions:
    """Unstructured magnitude pruning settings."""

    sparsity: float = 0.5
    """Fraction of prunable weights set to zero."""
    scope: PruneScope = PruneScope.GLOBAL
    layer_sparsity: Mapping[str, float] = field(default_factory=dict)
    """Per-tensor overrides (weight tensor name -> sparsity); these tensors leave the global pool."""
    min_size: int = 64
    """Tensors with fewer elements are left dense (tiny layers are cheap and sensitive)."""


def _check_fraction(value: float, what: str) -> None:
    """Refuse a sparsity outside [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise UsageError(f"{what} must be in [0, 1), got {value}")


def _weight_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The model's stored float tensors (initializers and Constant-node values), by tensor name."""
    tensors = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t
    return tensors


def prunable_weights(model: onnx.ModelProto, min_size: int = 0) -> dict[str, onnx.TensorProto]:
    """Weight tensors of Conv/Gemm (input 1) and stored MatMul operands with >= `min_size` elements."""
    stored = _weight_tensors(model)
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 1:
            names.append(node.input[1])
        elif node.op_type == "MatMul":
            names.extend(name for name in node.input if name in stored)
    out = {}
    for name in dict.fromkeys(names):
        tensor = stored.get(name)
        if tensor is not None and tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            dims = list(tensor.dims)
            if len(dims) >= 2 and int(np.prod(dims)) >= min_size:
                out[name] = tensor
    return out


def _smallest_mask(values: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the round(fraction * n) smallest entries of `values` (ties broken by position)."""
    count = round(fraction * values.size)
    mask = np.zeros(values.size, dtype=bool)
    if count > 0:
        mask[np.argpartition(values.ravel(), count - 1, kind="introselect")[:count]] = True
    return mask.reshape(values.shape)


def _masks(arrays: dict[str, np.ndarray], options: MagnitudePruneOptions) -> dict[str, np.ndarray]:
    """Which entries of each weight array to zero."""
    masks = {
        name: _smallest_mask(np.abs(a), options.layer_sparsity[name])
        for name, a in arrays.items()
        if name in options.layer_sparsity
    }
    pool = {name: a for name, a in arrays.items() if name not in masks}
    if options.scope is PruneScope.PER_LAYER:
        masks |= {name: _smallest_mask(np.abs(a), options.sparsity) for name, a in pool.items()}
    elif pool:
        flat = np.concatenate([np.abs(a).ravel() for a in pool.values()])
        chosen = _smallest_mask(flat, options.sparsity)
        offset = 0
        for name, array in pool.items():
            masks[name] = chosen[offset : offset + array.size].reshape(array.shape)
            offset += array.size
    return masks


def magnitude_prune(model: onnx.ModelProto, options: MagnitudePruneOptions) -> onnx.ModelProto:
    """A copy of `model` with its smallest-magnitude Conv/Gemm/MatMul weights set to zero."""
    _check_fraction(options.sparsity, "sparsity")
    for name, value in options.layer_sparsity.items():
        _check_fraction(value, f"sparsity of {name}")
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    tensors = prunable_weights(pruned, options.min_size)
    unknown = sorted(set(options.layer_sparsity) - set(tensors))
    if unknown:
        raise UsageError(f"layer_sparsity names tensors that are not prunable weights: {', '.join(unknown)}")
    arrays = {name: numpy_helper.to_array(t) for name, t in tensors.items()}
    for name, mask in _masks(arrays, options).items():
        if mask.any():
            array = arrays[name].copy()
            array[mask] = 0
            tensors[name].CopyFrom(numpy_helper.from_array(array, tensors[name].name))
    return pruned


def weight_sparsity(model: onnx.ModelProto, min_size: int = 0) -> dict[str, float]:
    """Fraction of exact zeros in each prunable weight tensor, plus their overall fraction under 'total'."""
    arrays = {n: numpy_helper.to_array(t) for n, t in prunable_weights(model, min_size).items()}
    out = {name: float(np.mean(a == 0)) for name, a in arrays.items()}
    total = sum(a.size for a in arrays.values())
    out["total"] = float(sum(np.sum(a == 0) for a in arrays.values()) / total) if total else 0.0
    return out


@dataclass(frozen=True)
class MagnitudePrunePass:
    """Unstructured magnitude pruning of Conv/Gemm/MatMul weights (storage gets smaller after deflate)."""

    options: MagnitudePruneOptions = MagnitudePruneOptions()
    name: str = "prune"

    def supports(self, model: onnx.ModelProto) -> bool:
        """True when `model` has weight tensors big enough to prune."""
        return bool(prunable_weights(model, self.options.min_size))

    def run(self, model: onnx.ModelProto, ctx: CompressionContext) -> PassResult:
        """Prune a copy of `model` and report sparsity, raw and deflated bytes, and fidelity."""
        pruned = magnitude_prune(model, self.options)
        sparsity = weight_sparsity(pruned, self.options.min_size)
        report: dict[str, Any] = {
            "pass": self.name,
            "target_sparsity": self.options.sparsity,
            "scope": str(self.options.scope),
            "sparsity": sparsity.pop("total"),
            "layer_sparsity": sparsity,
            **compare_models(model, pruned, ctx),
        }
        ctx.log(
            f"prune: sparsity {report['sparsity']:.3f}, deflated bytes "
            f"{report['deflated_bytes_before']} -> {report['deflated_bytes_after']}"
        )
        return PassResult(pruned, report)


@dataclass(frozen=True)
class StructuredPruneOptions:
    """Structured (channel) pruning settings."""

    ratio: float = 0.5
    """Fraction of channels removed from every prunable layer group (output layers are kept)."""
    round_to: int | None = None
    """Keep channel counts multiples of this (e.g. 8 or 16 for SIMD kernels), if set."""
    finetune: DistillOptions = field(default_factory=lambda: DistillOptions(epochs=10, patience=4))
    """Distillation from the unpruned model that recovers accuracy; epochs=0 skips it."""


@dataclass(frozen=True)
class StructuredPrunePass:
    """Remove whole channels/neurons across dependent layers, then fine-tune by distillation."""

    options: StructuredPruneOptions = StructuredPruneOptions()
    name: str = "structured_prune"

    def supports(self, model: onnx.ModelProto) -> bool:
        """True when torch is installed, the model converts to torch and has layers to slim."""
        try:
            require_torch("structured pruning")
            return has_weights(model) and not unsupported_ops(model)
        except CompressionError:
            return False

    def run(self, model: onnx.ModelProto, ctx: CompressionContext) -> PassResult:
        """Slim a copy of `model` by `ratio` of its channels and fine-tune it against the original."""
        _check_fraction(self.options.ratio, "ratio")
        train = replace(
            self.options.finetune,
            student=None,
            width=1.0 - self.options.ratio,
            round_to=self.options.round_to,
            reinit=False,
        )
        pruned, training = distill_model(model, ctx, train)
        report = {
            "pass": self.name,
            "ratio": self.options.ratio,
            **training,
            **compare_models(model, pruned, ctx),
        }
        ctx.log(
            f"structured_prune: params {report.get('params_before')} -> {report.get('params_after')}, "
            f"MACs {report.get('macs_before')} -> {report.get('macs_after')}"
        )
        return PassResult(pruned, report)
