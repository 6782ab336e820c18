"""Error-compensating rounding of weights (GPTQ): fewer weights must stay at 16 bits.

Round-to-nearest quantizes each weight on its own. GPTQ (Frantar et al., 2022) quantizes the input
columns of a layer one at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse of the layer's input Hessian H = X^T X measured on calibration
data, so the layer's *output* on data like the calibration's moves as little as possible.

Here X is each Conv's im2col patches (per group) or each MatMul/Gemm's input rows, gathered from the
float model on a few calibration samples (a simple GPTQ: every layer sees float inputs). Weights
with no Hessian (Gather tables, recurrent and transposed-convolution weights, weights read by
several nodes) are rounded to nearest. Scales stay per output channel, as in int8_weights.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from compressor.measure import make_session
from compressor.passes.base import Samples
from edge_runtime.config.profiles import DeviceProfile

__all__ = ["Rounding", "gptq_levels", "layer_hessians", "nearest_levels"]

ROWS_PER_SAMPLE = 2048
"""At most this many input rows (patches) per sample enter a Hessian: bounds memory and time."""
DAMPING = 0.01
"""Share of the Hessian's mean diagonal added to it, so its inverse exists."""
BLOCK = 128
"""Columns rounded together before their errors are pushed onto the rest (one matrix product)."""
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
"""4-bit scales: the row's max-abs times the ratio with the least rounding error is kept."""


def _attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _conv_rows(
    node: onnx.NodeProto, x: np.ndarray, kernel: Sequence[int], rng: np.random.Generator
) -> list[np.ndarray]:
    """im2col patches [rows, Cin/group * kh * kw] of a 2-D Conv's input, one array per group."""
    if (
        x.ndim != 4
        or len(kernel) != 2
        or _attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
    ):
        return []
    groups = int(_attribute(node, "group", 1))  # type: ignore[call-overload]
    pads = list(_attribute(node, "pads", [0, 0, 0, 0]))  # type: ignore[call-overload]
    strides = list(_attribute(node, "strides", [1, 1]))  # type: ignore[call-overload]
    dilations = list(_attribute(node, "dilations", [1, 1]))  # type: ignore[call-overload]
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    windows = sliding_window_view(padded, span, axis=(2, 3))[:, :, :: strides[0], :: strides[1]]
    windows = windows[..., :: dilations[0], :: dilations[1]]  # [N, C, Ho, Wo, kh, kw], a view
    n, channels, out_h, out_w = windows.shape[:4]
    count = n * out_h * out_w
    picked = np.sort(rng.choice(count, ROWS_PER_SAMPLE, replace=False)) if count > ROWS_PER_SAMPLE else None
    where = np.unravel_index(picked if picked is not None else np.arange(count), (n, out_h, out_w))
    patches = windows[where[0], :, where[1], where[2]]  # [rows, C, kh, kw]: only the picked ones copied
    per_group = channels // groups
    return [patches[:, g * per_group : (g + 1) * per_group].reshape(len(patches), -1) for g in range(groups)]


def _matmul_rows(x: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Input rows [rows, K] of a MatMul/Gemm."""
    rows = x.reshape(-1, x.shape[-1])
    if len(rows) > ROWS_PER_SAMPLE:
        rows = rows[np.sort(rng.choice(len(rows), ROWS_PER_SAMPLE, replace=False))]
    return [rows]


@dataclass
class _Layer:
    node: onnx.NodeProto
    weight: str
    kernel: tuple[int, ...]
    hessians: list[np.ndarray] = field(default_factory=list)


def _layers(model: onnx.ModelProto) -> dict[str, _Layer]:
    """Weights that GPTQ can round, by the input tensor whose values make their Hessian."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    layers = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight not in shapes or readers.get(weight) != 1 or node.input[0] in shapes:
            continue
        if node.op_type == "Gemm" and _attribute(node, "transA", 0):
            continue
        if node.op_type == "MatMul" and len(shapes[weight]) != 2:
            continue
        layers[weight] = _Layer(node, weight, shapes[weight][2:])
    return layers


def layer_hessians(
    model: onnx.ModelProto, samples: Samples, profile: DeviceProfile, seed: int = 0
) -> dict[str, list[np.ndarray]]:
    """H = X^T X of every roundable weight's inputs over `samples` (one H per Conv group)."""
    layers = _layers(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {out.name for out in probe.graph.output}
    by_input: dict[str, list[_Layer]] = {}
    for layer in layers.values():
        by_input.setdefault(layer.node.input[0], []).append(layer)
    for name in by_input:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = make_session(probe.SerializeToString(), profile)
    names = [out.name for out in session.get_outputs()]
    rng = np.random.default_rng(seed)
    for feed in samples:
        for name, value in zip(names, session.run(None, dict(feed)), strict=True):
            for layer in by_input.get(name, []):
                x = np.asarray(value, dtype=np.float32)
                rows = (
                    _conv_rows(layer.node, x, layer.kernel, rng)
                    if layer.node.op_type == "Conv"
                    else _matmul_rows(x, rng)
                )
                if not layer.hessians:
                    layer.hessians = [np.zeros((r.shape[1], r.shape[1])) for r in rows]
                for hessian, block in zip(layer.hessians, rows, strict=False):
                    if hessian.shape[0] == block.shape[1]:
                        hessian += (block.T @ block).astype(np.float64)
    return {name: layer.hessians for name, layer in layers.items() if layer.hessians}


def _row_scales(rows: np.ndarray, qmax: int, search: bool) -> np.ndarray:
    """Per-row scale [rows, 1]: max-abs / qmax, or (4-bit) the clipped max-abs that rounds best."""
    max_abs = np.max(np.abs(rows), axis=1, keepdims=True)
    best = np.where(max_abs > 0, max_abs / qmax, 1.0)
    if not search:
        return best
    best_error = np.full(max_abs.shape, np.inf)
    for ratio in CLIP_RATIOS:
        scale = np.where(max_abs > 0, ratio * max_abs / qmax, 1.0)
        error = np.sum(
            (rows - np.clip(np.round(rows / scale), -qmax, qmax) * scale) ** 2, axis=1, keepdims=True
        )
        better = error < best_error
        best, best_error = np.where(better, scale, best), np.where(better, error, best_error)
    return best


def gptq_levels(rows: np.ndarray, hessian: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Integer levels of `rows` [out, K] (scale [out, 1]) rounded column by column, each column's
    error pushed onto the later columns through the inverse Hessian (largest-diagonal columns first)."""
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h += DAMPING * float(np.mean(np.diag(h))) * np.eye(len(h))
    order = np.argsort(-np.diag(h), kind="stable")
    work = rows.astype(np.float64)[:, order].copy()
    h = h[np.ix_(order, order)]
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        return np.clip(np.round(rows / scale), -qmax, qmax)
    levels = np.zeros_like(work)
    for start in range(0, work.shape[1], BLOCK):  # GPTQ's lazy batch: errors leave the block once
        stop = min(start + BLOCK, work.shape[1])
        errors = np.zeros((work.shape[0], stop - start))
        for column in range(start, stop):
            q = np.clip(np.round(work[:, column : column + 1] / scale), -qmax, qmax)
            levels[:, column : column + 1] = q
            error = (work[:, column : column + 1] - q * scale) / upper[column, column]
            work[:, column + 1 : stop] -= error @ upper[column : column + 1, column + 1 : stop]
            errors[:, column - start : column - start + 1] = error
        work[:, stop:] -= errors @ upper[start:stop, stop:]
    restored = np.empty_like(levels)
    restored[:, order] = levels
    return restored


def nearest_levels(rows: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Round-to-nearest integer levels of `rows` [out, K]."""
    return np.clip(np.round(rows / scale), -qmax, qmax)


def _as_rows(weight: np.ndarray, op_type: str, node: onnx.NodeProto) -> tuple[np.ndarray, bool]:
    """The weight as [output channels, K] in its Hessian's column order, and whether it was transposed."""
    if op_type == "Conv":
        return weight.reshape(weight.shape[0], -1), False
    if op_type == "Gemm" and _attribute(node, "transB", 0):
        return weight, False
    return weight.T, True


class Rounding:
    """Quantized weights rounded by GPTQ where a Hessian is known (nearest elsewhere), cached by
    (name, bits) so a search that rebuilds many candidates rounds each weight once."""

    def __init__(self, model: onnx.ModelProto, hessians: dict[str, list[np.ndarray]]) -> None:
        self.hessians = hessians
        self.nodes = {layer.weight: layer.node for layer in _layers(model).values()}
        self._cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def measured(
        cls, model: onnx.ModelProto, samples: Samples, profile: DeviceProfile, seed: int = 0
    ) -> Rounding:
        """Hessians measured on `samples` (a few calibration samples suffice)."""
        return cls(model, layer_hessians(model, samples, profile, seed))

    def quantize(self, name: str, weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(levels shaped like `weight`, per-channel scale [out] ) for a GPTQ-roundable weight, else None."""
        key = (name, bits)
        if key in self._cache:
            return self._cache[key]
        node, hessians = self.nodes.get(name), self.hessians.get(name)
        if node is None or not hessians:
            return None
        qmax = (1 << (bits - 1)) - 1
        rows, transposed = _as_rows(weight, node.op_type, node)
        scale = _row_scales(rows.astype(np.float64), qmax, search=bits < 8)
        per_group = rows.shape[0] // len(hessians)
        levels = np.concatenate(
            [
                gptq_levels(
                    rows[g * per_group : (g + 1) * per_group],
                    h,
                    scale[g * per_group : (g + 1) * per_group],
                    qmax,
                )
                for g, h in enumerate(hessians)
            ]
        )
        shaped = (levels.T if transposed else levels).reshape(weight.shape)
        result = (shaped, scale.ravel().astype(np.float32))
        self._cache[key] = result
        return result
