"""Compression passes and their registry: a plain dict from pass name to a factory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from compressor.passes.base import CompressionContext, Pass, PassResult
from edge_runtime.core.errors import UsageError

__all__ = ["DEFAULT_RECIPE", "REGISTRY", "CompressionContext", "Pass", "PassResult", "create_pass"]


def _prepare() -> Pass:
    from compressor.passes.prepare import Prepare

    return Prepare()


def _int8(**options: Any) -> Pass:
    from compressor.passes.quantize import Int8Options, Int8Quantization

    return Int8Quantization(Int8Options(**options))


def _prune(**options: Any) -> Pass:
    from compressor.passes.prune import MagnitudePruneOptions, MagnitudePrunePass

    return MagnitudePrunePass(MagnitudePruneOptions(**options))


def _structured_prune(**options: Any) -> Pass:
    from compressor.passes.prune import StructuredPruneOptions, StructuredPrunePass

    return StructuredPrunePass(StructuredPruneOptions(**options))


def _distill(**options: Any) -> Pass:
    from compressor.passes.distill import DistillOptions, DistillPass

    return DistillPass(DistillOptions(**options))


def _tflite(**options: Any) -> Pass:
    from compressor.tflite_export import TFLiteExportPass, TFLiteOptions

    return TFLiteExportPass(TFLiteOptions(**options))


REGISTRY: dict[str, Callable[..., Pass]] = {
    "prepare": _prepare,
    "distill": _distill,
    "structured_prune": _structured_prune,
    "prune": _prune,
    "int8": _int8,
    "tflite": _tflite,
}
"""Pass name -> factory taking the pass's keyword options. Modules load only when a pass is made."""

DEFAULT_RECIPE = ("prepare", "int8")
"""For ONNX Runtime profiles; TFLite profiles end with "tflite" instead of "int8"."""


def create_pass(name: str, **options: Any) -> Pass:
    """Build a registered pass by name."""
    if name not in REGISTRY:
        raise UsageError(f"unknown compression pass '{name}' (known: {', '.join(REGISTRY)})")
    return REGISTRY[name](**options)
