"""TFLite rebuilds of the upsampling ops a DB text detector (PP-OCR det) or an FPN neck uses:
ConvTranspose (TRANSPOSE_CONV) and nearest-neighbour Resize by integer factors (RESIZE_NEAREST_NEIGHBOR),
both with int8 kernels in LiteRT."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from compressor.tflite_export import _attrs, _Graph, _Value
from edge_runtime.core.errors import CompressionError

__all__ = ["UPSAMPLING_HANDLERS"]


def _conv_transpose(g: _Graph, node: onnx.NodeProto) -> _Value:
    """ConvTranspose 2-D, group 1: a VALID transposed convolution cropped by the ONNX pads."""
    a = _attrs(node)
    w = g.const(node, 1).astype(np.float32)  # [Cin, Cout, kh, kw]
    if w.ndim != 4 or a.get("group", 1) != 1 or list(a.get("dilations", [1, 1])) != [1, 1]:
        raise CompressionError("TFLite export: only 2-D, ungrouped, undilated ConvTranspose is supported")
    if a.get("output_shape") or any(a.get("output_padding", [0, 0])):
        raise CompressionError("TFLite export: ConvTranspose output_shape/output_padding is not supported")
    strides = list(a.get("strides", [1, 1]))
    top, left, bottom, right = list(a.get("pads", [0, 0, 0, 0]))
    x = g.values[node.input[0]].tensor
    batch, height, width = (int(d) for d in x.shape[:3])
    full = ((height - 1) * strides[0] + w.shape[2], (width - 1) * strides[1] + w.shape[3])
    y = g.tf.nn.conv2d_transpose(
        x, w.transpose(2, 3, 1, 0), [batch, *full, w.shape[1]], [1, *strides, 1], "VALID"
    )
    y = y[:, top : full[0] - bottom, left : full[1] - right, :]
    if len(node.input) > 2 and node.input[2]:
        y = y + g.const(node, 2).astype(np.float32)
    return _Value(y, nhwc=True)


def _resize(g: _Graph, node: onnx.NodeProto) -> _Value:
    """Resize of a 4-D activation, nearest mode, by constant integer spatial factors (scales or sizes)."""
    a = _attrs(node)
    mode = a.get("mode", b"nearest")
    value = g.values[node.input[0]]
    if mode not in (b"nearest", "nearest") or not value.nhwc:
        raise CompressionError(f"TFLite export: Resize mode {mode!r} is not supported (nearest only)")
    height, width = (int(d) for d in value.tensor.shape[1:3])
    scales = g.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scales is not None and scales.size == 4:
        size = (round(height * float(scales[2])), round(width * float(scales[3])))
    elif len(node.input) > 3 and node.input[3] in g.consts:
        sizes = g.consts[node.input[3]]
        size = (int(sizes[2]), int(sizes[3]))
    else:
        raise CompressionError("TFLite export: Resize needs constant scales or sizes")
    if size[0] % height or size[1] % width:
        raise CompressionError(f"TFLite export: Resize by a non-integer factor ({height}x{width} -> {size})")
    resized = g.tf.compat.v1.image.resize_nearest_neighbor(
        value.tensor, list(size), align_corners=False, half_pixel_centers=False
    )
    return _Value(resized, nhwc=True)


UPSAMPLING_HANDLERS: dict[str, Callable[[_Graph, onnx.NodeProto], _Value]] = {
    "ConvTranspose": _conv_transpose,
    "Resize": _resize,
}
"""ONNX op type -> rebuild function, merged into tflite_export's registry."""
