"""ONNX <-> PyTorch for the passes that train: conversion, channel slimming, export.

PyTorch and its helpers are an optional extra, imported only inside these functions:

* ONNX -> torch: `onnx2torch` (an fx.GraphModule per model, initializers become trainable
  parameters). It imports torchvision for its NMS/RoiAlign converters only; PyPI's torchvision does
  not load beside the CPU torch build we pin, so when torchvision is missing a stand-in module lets
  onnx2torch import, and those two ops are reported as unsupported.
* Structured pruning: `torch-pruning` (dependency graph across layers, group magnitude importance).
* torch -> ONNX: the TorchScript exporter, `torch.onnx.export(..., dynamo=False)`. It needs nothing
  beyond torch; the dynamo exporter needs onnxscript and writes opset 18+ graphs with functions,
  which buys nothing for the small fixed-shape students trained here.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import sys
import types
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.passes.base import Samples
from edge_runtime.core.errors import CompressionError

if TYPE_CHECKING:
    import torch

__all__ = [
    "export_onnx",
    "onnx_to_torch",
    "output_layers",
    "require_torch",
    "slim",
    "stack_inputs",
    "torch_threads",
    "unsupported_ops",
]

INSTALL_HINT = "pip install torch==2.13.0 && pip install --no-deps torch-pruning==1.6.1 onnx2torch==1.5.15"
_NEEDS_TORCHVISION = ("NonMaxSuppression", "RoiAlign")
_NO_GRADIENT = frozenset(
    {"ArgMax", "ArgMin", "Ceil", "Floor", "Round", "Sign", "NonZero", "TopK", "Cast", "Equal", "Where"}
)
"""Ops whose outputs carry no gradient: the usual reason a converted model cannot be trained."""


def require_torch(feature: str) -> Any:
    """Import torch, or explain which extra `feature` needs."""
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise CompressionError(f"{feature} needs PyTorch, which is not installed: {INSTALL_HINT}") from exc


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the body with torch limited to `threads` intra-op threads (small models train faster so)."""
    torch = require_torch("training")
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _import_onnx2torch() -> Any:
    """Import onnx2torch, lending it a torchvision stand-in when torchvision is absent."""
    require_torch("converting ONNX to PyTorch")
    try:
        importlib.import_module("torchvision")
        stubbed = False
    except ImportError:
        stub = types.ModuleType("torchvision")
        stub.ops = types.ModuleType("torchvision.ops")  # type: ignore[attr-defined]
        stub.ops.roi_align = None  # type: ignore[attr-defined]
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, stub.ops  # type: ignore[attr-defined]
        stubbed = True
    try:
        return importlib.import_module("onnx2torch")
    except ImportError as exc:
        raise CompressionError(f"onnx2torch is not installed: {INSTALL_HINT}") from exc
    finally:
        if stubbed:
            sys.modules.pop("torchvision", None)
            sys.modules.pop("torchvision.ops", None)


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types in `model` that onnx2torch cannot convert (sorted, unique)."""
    _import_onnx2torch()
    from onnx2torch.node_converters.registry import get_converter

    have_torchvision = importlib.util.find_spec("torchvision") is not None
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    missing = set()
    for node in model.graph.node:
        domain = node.domain or "ai.onnx"
        try:
            get_converter(node.op_type, opsets.get(domain, 1), "" if domain == "ai.onnx" else domain)
        except NotImplementedError:
            missing.add(node.op_type)
        if node.op_type in _NEEDS_TORCHVISION and not have_torchvision:
            missing.add(node.op_type)
    return sorted(missing)


def _constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with float Constant-node tensors moved to initializers, so they train."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = []
    for node in out.graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attr is not None and attr.name == "value" and numpy_helper.to_array(attr.t).dtype.kind == "f":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
            out.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return out


def _advice(ops: Sequence[str]) -> str:
    """The error text for ops that cannot be trained through."""
    names = ", ".join(ops)
    return (
        f"cannot derive a trainable PyTorch student from this ONNX model: op(s) {names} cannot be "
        "converted or trained through; pass a user-supplied student architecture instead "
        "(DistillOptions(student=...))"
    )


def onnx_to_torch(model: onnx.ModelProto, example: Sequence[torch.Tensor]) -> torch.nn.Module:
    """Convert `model` to a trainable torch module; CompressionError names ops it cannot train through."""
    onnx2torch = _import_onnx2torch()
    torch = require_torch("converting ONNX to PyTorch")
    missing = unsupported_ops(model)
    if missing:
        raise CompressionError(_advice(missing))
    try:
        module = onnx2torch.convert(_constants_to_initializers(model))
        module.train()
        outputs = module(*example)
    except Exception as exc:
        raise CompressionError(f"onnx2torch could not convert the teacher: {exc}") from exc
    outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
    floats = [o for o in outputs if torch.is_tensor(o) and o.is_floating_point() and o.requires_grad]
    if not floats:
        blockers = sorted({n.op_type for n in model.graph.node if n.op_type in _NO_GRADIENT}) or ["(unknown)"]
        raise CompressionError(_advice(blockers))
    return module


def stack_inputs(samples: Samples, names: Sequence[str]) -> list[np.ndarray]:
    """Concatenate the samples' feeds per input name, in `names` order (float32)."""
    return [np.concatenate([np.asarray(s[n]) for s in samples]).astype(np.float32) for n in names]


def output_layers(module: torch.nn.Module, example: Sequence[torch.Tensor]) -> list[torch.nn.Module]:
    """The Conv/Linear layers that produce the model's outputs (their width must not change)."""
    torch = require_torch("structured pruning")
    order: list[Any] = []  # of torch.nn.Module: the local `torch` shadows the typing-only import
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
        for m in module.modules()
        if isinstance(m, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Linear)
    ]
    try:
        with torch.no_grad():
            module(*example)
    finally:
        for hook in hooks:
            hook.remove()
    if isinstance(module, torch.fx.GraphModule):
        found = _fx_output_layers(module)
        if found:
            return found
    return order[-1:]


def _fx_output_layers(module: torch.fx.GraphModule) -> list[torch.nn.Module]:
    """Walk an fx graph back from its outputs to the first weighted layer on each path."""
    found: list[Any] = []
    seen: set[str] = set()
    stack = [n for n in module.graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.op == "call_module":
            sub = module.get_submodule(node.target)
            weight = getattr(sub, "weight", None)
            if weight is not None and getattr(weight, "ndim", 0) >= 2:
                found.append(sub)
                continue
        stack.extend(n for n in node.all_input_nodes)
    return found


def slim(
    module: torch.nn.Module,
    example: Sequence[torch.Tensor],
    ratio: float,
    *,
    round_to: int | None = None,
    keep: Sequence[torch.nn.Module] = (),
) -> torch.nn.Module:
    """A copy of `module` with `ratio` of the channels of every prunable group removed (torch-pruning)."""
    torch = require_torch("structured pruning")
    try:
        tp = importlib.import_module("torch_pruning")
    except ImportError as exc:
        raise CompressionError(f"structured pruning needs torch-pruning: {INSTALL_HINT}") from exc
    pruned = copy.deepcopy(module)
    ignored = [*output_layers(pruned, example)]
    ids = {id(m) for m in keep}
    ignored += [m for m, orig in zip(pruned.modules(), module.modules(), strict=True) if id(orig) in ids]
    pruner = tp.pruner.MetaPruner(
        pruned,
        tuple(example) if len(example) > 1 else example[0],
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        round_to=round_to,
    )
    pruner.step()
    try:
        with torch.no_grad():
            pruned.eval()(*example)
    except RuntimeError as exc:
        raise CompressionError(
            "structured pruning left this model inconsistent (torch-pruning cannot follow channels "
            "through tensors that are not layer parameters, e.g. a bias added from a stored constant): "
            f"{str(exc).splitlines()[0]}; use a user-supplied student, or width 1.0"
        ) from exc
    return pruned.train()


def export_onnx(
    module: torch.nn.Module,
    example: Sequence[torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int = 17,
) -> onnx.ModelProto:
    """Export `module` to ONNX (TorchScript exporter) with a dynamic batch axis on every input/output."""
    torch = require_torch("exporting to ONNX")
    module = module.eval()
    axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(example),
            buffer,
            dynamo=False,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
        )
    exported = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(exported)
    return exported
