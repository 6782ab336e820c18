"""NNCF's post-training int8 as OpenVINO candidates: ONNX in, a QDQ ONNX graph out, which our
`openvino` engine reads like any other artifact.

A few NNCF settings are built, not one guessed: the engine choice measures each through OpenVINO by
the task metric on the selection split and times it (engine_choice.py). For a transformer (a graph
ONNX Runtime's transformer fusion recognises: transformer_fusion.py) NNCF gets
`model_type=TRANSFORMER`, which keeps the Softmax/LayerNorm/GELU inputs float, with SmoothQuant
(activation outliers moved into the weights) off, and is built with NNCF's default asymmetric
activations for a transformer and with symmetric ones (OpenVINO's fastest int8 form, less exact).
One-off probes on the MiniLM encoder through OpenVINO f32 (AMX Xeon, pooled cosine on held-out sentences,
latency of ONNX Runtime fp32): SmoothQuant on at its default alpha 0.979 (alpha 0.5: 0.988, 0.3:
0.986), off 0.9895 at 0.31x; symmetric 0.975 at 0.29x; leaving each block's second feed-forward
MatMul float 0.995 but 0.55x; NNCF's defaults without `model_type` 0.83. The nodes reading a weight
our own int8 search kept float are NNCF's ignored scope.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import logging
from collections.abc import Callable, Sequence
from typing import Any

import onnx

from compressor.int8_weights import store_small_floats_fp16
from compressor.onnx_model import constants_to_initializers, name_unnamed_nodes
from compressor.passes.base import CompressionContext
from compressor.transformer_fusion import fuse_transformer

__all__ = ["NncfInt8", "nncf_int8"]


@dataclasses.dataclass(frozen=True)
class NncfInt8:
    """One NNCF int8 graph: its bytes, what it was built with, the nodes NNCF was told to leave float."""

    model_bytes: bytes
    label: str
    ignored: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Setting:
    """One NNCF configuration: a label and the keyword arguments beyond data and ignored scope."""

    label: str
    options: Callable[[Any], dict[str, Any]]


def _no_smooth_quant(nncf: Any) -> dict[str, Any]:
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    off = AdvancedSmoothQuantParameters(matmul=-1)
    return {
        "model_type": nncf.ModelType.TRANSFORMER,
        "advanced_parameters": AdvancedQuantizationParameters(smooth_quant_alphas=off),
    }


TRANSFORMER_SETTINGS = (
    _Setting("transformer, SmoothQuant off", _no_smooth_quant),
    _Setting(
        "transformer, SmoothQuant off, symmetric activations",
        lambda nncf: {**_no_smooth_quant(nncf), "preset": nncf.QuantizationPreset.PERFORMANCE},
    ),
)
"""What is built for a transformer, in this order."""
OTHER_SETTINGS = (
    _Setting("performance preset", lambda _nncf: {}),
    _Setting("mixed preset", lambda nncf: {"preset": nncf.QuantizationPreset.MIXED}),
)
"""What is built for any other model: symmetric int8 activations (OpenVINO's fast form), then
asymmetric ones (better on activations such as ReLU6 outputs that are far from centred)."""


def nncf_int8(original: onnx.ModelProto, ctx: CompressionContext, ignored: Sequence[str]) -> list[NncfInt8]:
    """NNCF's int8 of `original` in each setting for its kind of model, `ignored` left float; []
    without `nncf`. A setting NNCF fails on is logged and skipped."""
    if importlib.util.find_spec("nncf") is None:
        return []
    import nncf

    nncf.set_log_level(logging.ERROR)
    model = name_unnamed_nodes(constants_to_initializers(original))  # NNCF reads weights as initializers
    settings = TRANSFORMER_SETTINGS if fuse_transformer(model) is not None else OTHER_SETTINGS
    out: list[NncfInt8] = []
    for setting in settings:
        scope = tuple(dict.fromkeys(ignored))
        try:  # NNCF draws progress bars on stdout: the user's terminal shows our progress only
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                quantized = nncf.quantize(
                    model,
                    nncf.Dataset(list(ctx.calibration)),
                    subset_size=len(ctx.calibration),
                    ignored_scope=nncf.IgnoredScope(names=list(scope), validate=False),
                    **setting.options(nncf),
                )
        except Exception as exc:  # NNCF failing on a real model is a measured outcome, not a crash
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            ctx.log(f"engine choice: NNCF ({setting.label}) cannot quantize this model: {reason}")
            continue
        label = f"NNCF int8 ({setting.label}; {len(scope)} nodes float)"
        stored, _ = store_small_floats_fp16(quantized)  # what NNCF leaves float (biases, ignored nodes)
        out.append(NncfInt8(stored.SerializeToString(), label, scope))
    return out
