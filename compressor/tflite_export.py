"""Full-integer int8 TFLite artifacts for devices whose engine is TFLite (LiteRT).

Conversion path: the ONNX graph is rebuilt op by op as a TensorFlow function (NHWC inside,
weights as constants), then `tf.lite.TFLiteConverter` quantizes it with the representative
dataset taken from `ctx.calibration`, restricted to `TFLITE_BUILTINS_INT8` so every weight and
activation is int8 (the converter refuses rather than leaving an op in float). Weights are int8
per output channel, activations int8 per tensor, biases int32.

Input/output: float32 by default (`TFLiteIO.FLOAT32`): the artifact takes and returns the same
tensors as the ONNX model (NCHW), with one QUANTIZE after the input and one DEQUANTIZE before each
output; everything between runs in int8. `TFLiteIO.INT8` drops those two ops and exposes int8
tensors; the caller then quantizes with the input's scale/zero point.

Why this path (checked offline from PyPI on Python 3.11): `tensorflow-cpu` 2.21 installs cleanly
beside numpy 2 / onnx 1.23 / onnxruntime 1.32 and carries the converter; `ai-edge-litert` runs
the result. `onnx2tf` 1.29 (the last release for 3.11; 2.x needs 3.12) pins numpy 1.26,
onnx 1.19, onnxruntime 1.23 and tensorflow 2.19, so it cannot live in our environment;
`litert-torch` pulls jax, transformers, torchao and some 40 other packages and needs the model in
PyTorch. The rebuild covers the ops small CNN/MLP students use (see `SUPPORTED_OPS`); any other op
gets a CompressionError naming it, and the fix is to distill into a supported student first.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compressor.onnx_model import tensor_specs
from compressor.passes._metrics import run_onnx
from compressor.passes.base import CompressionContext, PassResult, Samples
from edge_runtime.artifact.manifest import Manifest
from edge_runtime.config.profiles import DeviceProfile
from edge_runtime.core.errors import CompressionError, DataError
from edge_runtime.engines import load_backend
from edge_runtime.engines.tflite import tflite_name

__all__ = [
    "SUPPORTED_OPS",
    "TFLiteExportPass",
    "TFLiteIO",
    "TFLiteOptions",
    "TFLiteRunner",
    "convert_to_tflite",
    "run_tflite",
    "unsupported_tflite_ops",
]

INSTALL_HINT = "pip install tensorflow-cpu==2.21.0 ai-edge-litert==2.3.0"


class TFLiteIO(StrEnum):
    """Data type of the artifact's inputs and outputs (internals are int8 either way)."""

    FLOAT32 = "float32"
    INT8 = "int8"


@dataclass(frozen=True)
class TFLiteOptions:
    """TFLite conversion settings."""

    io: TFLiteIO = TFLiteIO.FLOAT32
    max_calibration_samples: int = 300
    """Representative samples fed to the converter's calibration (the first N of the set)."""
    filename: str = "model.tflite"
    """Name of the artifact written into `ctx.workdir` by the pass."""


def _tf() -> Any:
    """Import TensorFlow quietly, or explain how to install the extra."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return importlib.import_module("tensorflow")
    except ImportError as exc:
        raise CompressionError(
            f"TFLite export needs TensorFlow, which is not installed: {INSTALL_HINT}"
        ) from exc


@dataclass
class _Value:
    """A TF tensor during the rebuild; `nhwc` marks 4-D activations held channels-last."""

    tensor: Any
    nhwc: bool = False


class _Graph:
    """Rebuild state: constants by name, values by name, and the TF module."""

    def __init__(self, model: onnx.ModelProto, tf: Any) -> None:
        """Collect the model's constants."""
        self.tf = tf
        self.consts: dict[str, np.ndarray] = {
            i.name: numpy_helper.to_array(i) for i in model.graph.initializer
        }
        self.values: dict[str, _Value] = {}

    def nchw(self, name: str) -> Any:
        """Tensor `name` in ONNX layout."""
        value = self.values[name]
        return self.tf.transpose(value.tensor, [0, 3, 1, 2]) if value.nhwc else value.tensor

    def const(self, node: onnx.NodeProto, index: int) -> np.ndarray:
        """Input `index` of `node`, which must be a stored constant."""
        name = node.input[index]
        if name not in self.consts:
            raise CompressionError(f"TFLite export: {node.op_type} input '{name}' must be a constant")
        return self.consts[name]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes as plain Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pad4(g: _Graph, x: Any, pads: Sequence[int], value: float = 0.0) -> Any:
    """Pad an NHWC tensor by ONNX-style [top, left, bottom, right] pads."""
    if not any(pads):
        return x
    top, left, bottom, right = pads
    return g.tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]], constant_values=value)


def _spatial(node: onnx.NodeProto, kernel: Sequence[int]) -> tuple[list[int], list[int]]:
    """Strides and explicit pads of a 2-D Conv/Pool node (auto_pad resolved for stride 1 only)."""
    a = _attrs(node)
    strides = list(a.get("strides", [1, 1]))
    pads = list(a.get("pads", [0, 0, 0, 0]))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER") and strides == [1, 1]:
        pads = [(kernel[0] - 1) // 2, (kernel[1] - 1) // 2, kernel[0] // 2, kernel[1] // 2]
    elif auto not in ("NOTSET", "VALID"):
        raise CompressionError(f"TFLite export: {node.op_type} auto_pad={auto} with strides {strides}")
    if list(a.get("dilations", [1, 1])) != [1, 1]:
        raise CompressionError(f"TFLite export: dilated {node.op_type} is not supported")
    return strides, [pads[0], pads[1], pads[2], pads[3]]


def _conv(g: _Graph, node: onnx.NodeProto) -> _Value:
    """Conv 2-D (plain or depthwise) with bias."""
    tf, w = g.tf, g.const(node, 1).astype(np.float32)
    if w.ndim != 4:
        raise CompressionError("TFLite export: only 2-D Conv is supported")
    strides, pads = _spatial(node, w.shape[2:])
    x = _pad4(g, g.values[node.input[0]].tensor, pads)
    group = _attrs(node).get("group", 1)
    if group == 1:
        y = tf.nn.conv2d(x, w.transpose(2, 3, 1, 0), [1, *strides, 1], "VALID")
    elif w.shape[1] == 1 and group == x.shape[-1]:
        mult = w.shape[0] // group
        kernel = w.reshape(group, mult, *w.shape[2:]).transpose(2, 3, 0, 1)
        y = tf.nn.depthwise_conv2d(x, kernel, [1, *strides, 1], "VALID")
    else:
        raise CompressionError(f"TFLite export: grouped Conv (group={group}) is not supported")
    if len(node.input) > 2 and node.input[2]:
        y = y + g.const(node, 2).astype(np.float32)
    return _Value(y, nhwc=True)


def _gemm(g: _Graph, node: onnx.NodeProto) -> _Value:
    """Gemm with a constant weight (FULLY_CONNECTED)."""
    a = _attrs(node)
    if a.get("transA", 0):
        raise CompressionError("TFLite export: Gemm with transA=1 is not supported")
    w = g.const(node, 1).astype(np.float32)
    w = w.T if a.get("transB", 0) else w
    y = g.tf.matmul(g.nchw(node.input[0]), w * a.get("alpha", 1.0))
    if len(node.input) > 2 and node.input[2]:
        y = y + g.const(node, 2).astype(np.float32) * a.get("beta", 1.0)
    return _Value(y)


def _matmul(g: _Graph, node: onnx.NodeProto) -> _Value:
    """MatMul (constant right operand becomes FULLY_CONNECTED / BATCH_MATMUL)."""
    right = g.consts.get(node.input[1])
    right = g.nchw(node.input[1]) if right is None else right.astype(np.float32)
    return _Value(g.tf.matmul(g.nchw(node.input[0]), right))


def _binary(op: Callable[[Any, Any], Any]) -> Callable[[_Graph, onnx.NodeProto], _Value]:
    """Elementwise Add/Sub/Mul/Div; constants follow the activation's layout."""

    def handler(g: _Graph, node: onnx.NodeProto) -> _Value:
        names = list(node.input)
        live = [g.values[n] for n in names if n in g.values]
        nhwc = bool(live) and all(v.nhwc for v in live)
        args = []
        for name in names:
            if name in g.consts:
                c = g.consts[name].astype(np.float32)
                if nhwc and c.ndim >= 3:
                    c = c.reshape((1,) * (4 - c.ndim) + c.shape).transpose(0, 2, 3, 1)
                args.append(c)
            else:
                args.append(g.values[name].tensor if nhwc else g.nchw(name))
        return _Value(op(*args), nhwc=nhwc)

    return handler


def _unary(op: Callable[[Any, Any, dict[str, Any]], Any]) -> Callable[[_Graph, onnx.NodeProto], _Value]:
    """Layout-preserving activation: `op(tf, x, attributes)`."""

    def handler(g: _Graph, node: onnx.NodeProto) -> _Value:
        value = g.values[node.input[0]]
        return _Value(op(g.tf, value.tensor, _attrs(node)), value.nhwc)

    return handler


def _clip(g: _Graph, node: onnx.NodeProto) -> _Value:
    """Clip with bounds from attributes (opset < 11) or constant inputs."""
    a = _attrs(node)
    low, high = a.get("min", -np.inf), a.get("max", np.inf)
    if len(node.input) > 1 and node.input[1]:
        low = float(g.const(node, 1))
    if len(node.input) > 2 and node.input[2]:
        high = float(g.const(node, 2))
    value = g.values[node.input[0]]
    tensor = (
        g.tf.nn.relu6(value.tensor)
        if (low, high) == (0.0, 6.0)
        else g.tf.clip_by_value(value.tensor, low, high)
    )
    return _Value(tensor, value.nhwc)


def _pool(kind: str) -> Callable[[_Graph, onnx.NodeProto], _Value]:
    """MaxPool / AveragePool 2-D."""

    def handler(g: _Graph, node: onnx.NodeProto) -> _Value:
        kernel = list(_attrs(node)["kernel_shape"])
        strides, pads = _spatial(node, kernel)
        if _attrs(node).get("ceil_mode", 0):
            raise CompressionError(f"TFLite export: {node.op_type} with ceil_mode=1 is not supported")
        x = g.values[node.input[0]].tensor
        if kind == "max":
            y = g.tf.nn.max_pool2d(_pad4(g, x, pads, -3.0e38), kernel, strides, "VALID")
        elif any(pads):
            raise CompressionError("TFLite export: padded AveragePool is not supported")
        else:
            y = g.tf.nn.avg_pool2d(x, kernel, strides, "VALID")
        return _Value(y, nhwc=True)

    return handler


def _flatten(g: _Graph, node: onnx.NodeProto) -> _Value:
    """Flatten to 2-D in ONNX element order."""
    if _attrs(node).get("axis", 1) != 1:
        raise CompressionError("TFLite export: Flatten only with axis=1")
    x = g.nchw(node.input[0])
    return _Value(g.tf.reshape(x, [x.shape[0], -1]))


def _reshape(g: _Graph, node: onnx.NodeProto) -> _Value:
    """Reshape to a constant shape (0 copies the input's dimension)."""
    x = g.nchw(node.input[0])
    shape = [int(x.shape[i]) if s == 0 else int(s) for i, s in enumerate(g.const(node, 1))]
    return _Value(g.tf.reshape(x, shape))


def _global_pool(g: _Graph, node: onnx.NodeProto) -> _Value:
    """GlobalAveragePool (MEAN over H, W)."""
    return _Value(g.tf.reduce_mean(g.values[node.input[0]].tensor, axis=[1, 2], keepdims=True), nhwc=True)


def _batchnorm(g: _Graph, node: onnx.NodeProto) -> _Value:
    """BatchNormalization in inference form, folded to a per-channel scale and shift."""
    scale, bias, mean, var = (g.const(node, i).astype(np.float64) for i in range(1, 5))
    factor = scale / np.sqrt(var + _attrs(node).get("epsilon", 1e-5))
    shift = bias - mean * factor
    value = g.values[node.input[0]]
    shape = (-1,) if value.nhwc or len(value.tensor.shape) == 2 else (-1, 1, 1)
    return _Value(
        value.tensor * factor.astype(np.float32).reshape(shape) + shift.astype(np.float32).reshape(shape),
        value.nhwc,
    )


def _softmax(g: _Graph, node: onnx.NodeProto) -> _Value:
    """Softmax over the last axis (ONNX axis 1 of a 2-D tensor)."""
    axis = _attrs(node).get("axis", -1)
    x = g.nchw(node.input[0])
    if axis not in (-1, len(x.shape) - 1):
        raise CompressionError(f"TFLite export: Softmax over axis {axis} is not supported")
    return _Value(g.tf.nn.softmax(x))


def _concat(g: _Graph, node: onnx.NodeProto) -> _Value:
    """Concat along the channel axis (NHWC) or any axis (plain)."""
    axis = _attrs(node)["axis"]
    values = [g.values[n] for n in node.input]
    if all(v.nhwc for v in values) and axis in (1, -3):
        return _Value(g.tf.concat([v.tensor for v in values], axis=3), nhwc=True)
    return _Value(g.tf.concat([g.nchw(n) for n in node.input], axis=axis))


def _handlers() -> dict[str, Callable[[_Graph, onnx.NodeProto], _Value]]:
    """ONNX op type -> rebuild function (the registry of supported ops)."""
    from compressor.tflite_ops import UPSAMPLING_HANDLERS

    return {
        **UPSAMPLING_HANDLERS,
        "Conv": _conv,
        "Gemm": _gemm,
        "MatMul": _matmul,
        "Clip": _clip,
        "Flatten": _flatten,
        "Reshape": _reshape,
        "BatchNormalization": _batchnorm,
        "Softmax": _softmax,
        "Concat": _concat,
        "MaxPool": _pool("max"),
        "AveragePool": _pool("avg"),
        "GlobalAveragePool": _global_pool,
        "Add": _binary(lambda a, b: a + b),
        "Sub": _binary(lambda a, b: a - b),
        "Mul": _binary(lambda a, b: a * b),
        "Div": _binary(lambda a, b: a / b),
        "Relu": _unary(lambda tf, x, a: tf.nn.relu(x)),
        "Sigmoid": _unary(lambda tf, x, a: tf.sigmoid(x)),
        "Tanh": _unary(lambda tf, x, a: tf.tanh(x)),
        "LeakyRelu": _unary(lambda tf, x, a: tf.nn.leaky_relu(x, a.get("alpha", 0.01))),
        "HardSigmoid": _unary(
            lambda tf, x, a: tf.clip_by_value(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0)
        ),
        "HardSwish": _unary(lambda tf, x, a: x * tf.nn.relu6(x + 3.0) / 6.0),
        "Identity": _unary(lambda tf, x, a: x),
        "Dropout": _unary(lambda tf, x, a: x),
    }


SUPPORTED_OPS = frozenset(_handlers())
"""ONNX op types the TFLite rebuild handles."""


def unsupported_tflite_ops(model: onnx.ModelProto) -> list[str]:
    """Op types in `model` the TFLite rebuild cannot handle (Constant nodes are fine)."""
    return sorted({n.op_type for n in model.graph.node if n.op_type not in SUPPORTED_OPS | {"Constant"}})


def _feeds(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that are real feeds."""
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _rebuild(model: onnx.ModelProto, tf: Any) -> Callable[..., dict[str, Any]]:
    """A TF function computing `model`'s outputs, keyed by their TF-safe names (the signature's
    output names, which the runtime maps back to the manifest's), from its inputs (NCHW)."""
    missing = unsupported_tflite_ops(model)
    if missing:
        raise CompressionError(
            f"TFLite export does not support op(s) {', '.join(missing)}; distill the model into a "
            "small CNN/MLP student first (the distill pass), then export that"
        )
    handlers = _handlers()

    def forward(*inputs: Any) -> dict[str, Any]:
        g = _Graph(model, tf)
        for node in model.graph.node:
            if node.op_type == "Constant":
                g.consts[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
        for name, x in zip(_feeds(model), inputs, strict=True):
            g.values[name] = _Value(tf.transpose(x, [0, 2, 3, 1]), True) if len(x.shape) == 4 else _Value(x)
        for node in model.graph.node:
            if node.op_type != "Constant":
                g.values[node.output[0]] = handlers[node.op_type](g, node)
        return {tflite_name(o.name): g.nchw(o.name) for o in model.graph.output}

    return forward


def _representative(samples: Samples, names: Sequence[str], limit: int) -> Callable[[], Iterator[list[Any]]]:
    """The converter's calibration generator: one list of float32 inputs per sample."""

    def generate() -> Iterator[list[Any]]:
        for sample in list(samples)[:limit]:
            yield [np.asarray(sample[n], dtype=np.float32) for n in names]

    return generate


def convert_to_tflite(
    model: onnx.ModelProto, calibration: Samples, options: TFLiteOptions = TFLiteOptions()
) -> bytes:
    """Full-integer int8 `.tflite` bytes for `model`, calibrated on `calibration` (batch-1 samples)."""
    tf = _tf()
    names = _feeds(model)
    if not calibration:
        raise DataError("TFLite int8 conversion needs calibration samples")
    first = calibration[0]
    missing = [n for n in names if n not in first]
    if missing:
        raise DataError(f"calibration samples lack model input(s): {', '.join(missing)}")
    specs = [tf.TensorSpec(np.asarray(first[n]).shape, tf.float32, name=tflite_name(n)) for n in names]
    holder = tf.Module()
    holder.forward = tf.function(_rebuild(model, tf), input_signature=specs, autograph=False)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [holder.forward.get_concrete_function()], holder
    )
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _representative(calibration, names, options.max_calibration_samples)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if options.io is TFLiteIO.INT8:
        converter.inference_input_type = converter.inference_output_type = tf.int8
    try:
        return bytes(converter.convert())
    except Exception as exc:
        raise CompressionError(f"TFLite int8 conversion failed: {str(exc).splitlines()[0]}") from exc


class TFLiteRunner:
    """A `.tflite` artifact loaded by the runtime's own TFLite backend, called like an ORT session."""

    def __init__(self, data: bytes, model: onnx.ModelProto, profile: DeviceProfile) -> None:
        initializers = {init.name for init in model.graph.initializer}
        self._outputs = tensor_specs(list(model.graph.output))
        manifest = Manifest(
            name="candidate",
            version="0",
            profile=profile.name,
            engine="tflite",
            model_file="model.tflite",
            inputs=tensor_specs(list(model.graph.input), initializers),
            outputs=self._outputs,
            files={},
        )
        self._backend = load_backend(manifest, data, profile)

    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Float32 outputs for one feed, in the ONNX model's output order (`output_names` ignored)."""
        produced = self._backend.run(feed)
        return [produced[spec.name] for spec in self._outputs]


def run_tflite(
    data: bytes, samples: Samples, model: onnx.ModelProto, profile: DeviceProfile
) -> list[list[np.ndarray]]:
    """Every output (float32) of a `.tflite` converted from `model`, for every sample."""
    runner = TFLiteRunner(data, model, profile)
    return [runner.run(None, sample) for sample in samples]


@dataclass(frozen=True)
class TFLiteExportPass:
    """Write a full-integer int8 `.tflite` next to the ONNX model and measure it in LiteRT."""

    options: TFLiteOptions = TFLiteOptions()
    name: str = "tflite"

    def supports(self, model: onnx.ModelProto) -> bool:
        """True when every op of `model` has a TFLite rebuild."""
        return not unsupported_tflite_ops(model)

    def run(self, model: onnx.ModelProto, ctx: CompressionContext) -> PassResult:
        """Convert, write `ctx.workdir / options.filename`, compare with ONNX Runtime on validation."""
        data = convert_to_tflite(model, ctx.calibration, self.options)
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        path = ctx.workdir / self.options.filename
        path.write_bytes(data)
        report: dict[str, Any] = {
            "pass": self.name,
            "artifact": str(path),
            "format": "tflite",
            "io": str(self.options.io),
            "bytes_before": model.ByteSize(),
            "bytes_after": len(data),
        }
        if ctx.validation:
            reference = run_onnx(model, ctx.validation, ctx.profile)
            candidate = run_tflite(data, ctx.validation, model, ctx.profile)
            report["fidelity"] = ctx.fidelity(reference, candidate).to_dict()
        ctx.log(f"tflite: wrote {path} ({len(data)} bytes)")
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return PassResult(copy, report, artifact=data, artifact_format="tflite")
