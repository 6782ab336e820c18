"""Compression passes and their registry: a plain dict from pass name to a factory."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from typing import Any

from compressor.passes.base import CompressionContext, Pass, PassResult
from edge_runtime.core.errors import UsageError

__all__ = [
    "DEFAULT_RECIPE",
    "REGISTRY",
    "REQUIRES",
    "CompressionContext",
    "Pass",
    "PassResult",
    "check_recipe",
    "create_pass",
    "missing_modules",
]


def _prepare() -> Pass:
    from compressor.passes.prepare import Prepare

    return Prepare()


def _simplify() -> Pass:
    from compressor.passes.simplify import Simplify

    return Simplify()


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
    "simplify": _simplify,
    "distill": _distill,
    "structured_prune": _structured_prune,
    "prune": _prune,
    "int8": _int8,
    "tflite": _tflite,
}
"""Pass name -> factory taking the pass's keyword options. Modules load only when a pass is made."""

DEFAULT_RECIPE = ("prepare", "int8")
"""For ONNX Runtime profiles; TFLite profiles run prepare, simplify, tflite."""


_TORCH = ("torch", "torch_pruning", "onnx2torch")
REQUIRES: dict[str, tuple[tuple[str, ...], str]] = {
    "distill": (_TORCH, "pip install 'edge-runtime[distill]' && pip install --no-deps onnx2torch==1.5.15"),
    "structured_prune": (
        _TORCH,
        "pip install 'edge-runtime[distill]' && pip install --no-deps onnx2torch==1.5.15",
    ),
    "tflite": (("tensorflow",), "pip install 'edge-runtime[tflite-export]'"),
    "simplify": (("onnxslim",), "pip install 'edge-runtime[tflite-export]'"),
}
"""Pass name -> (modules it imports, how to install them), checked before any work starts."""


def missing_modules(modules: Sequence[str]) -> list[str]:
    """Those of `modules` that cannot be imported here (without importing them)."""
    missing = []
    for name in modules:
        if name in sys.modules:
            if sys.modules[name] is None:  # blocked on purpose
                missing.append(name)
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def check_recipe(names: Sequence[str]) -> None:
    """Refuse, before any work, a recipe with an unknown pass or a pass whose libraries are missing."""
    if not names:
        raise UsageError("the recipe names no pass (known: " + ", ".join(REGISTRY) + ")")
    for name in names:
        if name not in REGISTRY:
            raise UsageError(f"unknown compression pass '{name}' (known: {', '.join(REGISTRY)})")
        modules, hint = REQUIRES.get(name, ((), ""))
        missing = missing_modules(modules)
        if missing:
            raise UsageError(f"pass '{name}' needs {', '.join(missing)}, which is not installed ({hint})")


def create_pass(name: str, **options: Any) -> Pass:
    """Build a registered pass by name."""
    if name not in REGISTRY:
        raise UsageError(f"unknown compression pass '{name}' (known: {', '.join(REGISTRY)})")
    return REGISTRY[name](**options)
