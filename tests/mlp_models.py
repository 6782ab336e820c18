"""Small MLP classifiers built in code: one set of seeded weights as ONNX, float TFLite and int8 TFLite.

The TFLite models are written with the flatbuffer schema module that ships inside ai-edge-litert
(`ai_edge_litert.schema_py_generated`), so no TensorFlow install is needed to make them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MlpWeights", "build_onnx_mlp", "build_tflite_mlp", "make_weights", "reference_forward"]

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"


@dataclass(frozen=True)
class MlpWeights:
    """Gemm -> Relu -> Gemm -> Softmax weights: w1 [inputs, hidden], w2 [hidden, classes]."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(inputs, hidden, classes)."""
        return self.w1.shape[0], self.w1.shape[1], self.w2.shape[1]


def make_weights(inputs: int = 64, hidden: int = 32, classes: int = 10, seed: int = 0) -> MlpWeights:
    """Random but seeded weights."""
    rng = np.random.default_rng(seed)
    return MlpWeights(
        w1=rng.normal(0.0, 1.0 / np.sqrt(inputs), (inputs, hidden)).astype(np.float32),
        b1=rng.normal(0.0, 0.1, hidden).astype(np.float32),
        w2=rng.normal(0.0, 1.0 / np.sqrt(hidden), (hidden, classes)).astype(np.float32),
        b2=rng.normal(0.0, 0.1, classes).astype(np.float32),
    )


def reference_forward(weights: MlpWeights, x: np.ndarray) -> np.ndarray:
    """The MLP in numpy (float64 maths, float32 result)."""
    hidden = np.maximum(x.astype(np.float64) @ weights.w1 + weights.b1, 0.0)
    logits = hidden @ weights.w2 + weights.b2
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def build_onnx_mlp(weights: MlpWeights, *, opset: int = 17) -> bytes:
    """The MLP as an ONNX model with a free batch dimension "N"."""
    from onnx import TensorProto, helper, numpy_helper

    n_in, _, n_out = weights.sizes
    initializers = [
        numpy_helper.from_array(weights.w1, "W1"),
        numpy_helper.from_array(weights.b1, "B1"),
        numpy_helper.from_array(weights.w2, "W2"),
        numpy_helper.from_array(weights.b2, "B2"),
    ]
    nodes = [
        helper.make_node("Gemm", [INPUT_NAME, "W1", "B1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2", "B2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", n_out])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model.SerializeToString()


class _TfliteWriter:
    """Collects buffers, tensors and operators for one subgraph."""

    def __init__(self, schema: object) -> None:
        self.s = schema
        self.buffers = [schema.BufferT()]  # buffer 0: the empty sentinel
        self.tensors: list = []
        self.operators: list = []
        self.opcodes: dict[int, int] = {}

    def tensor(self, name, shape, ttype, data=None, quant=None, signature=None) -> int:
        tensor = self.s.TensorT()
        tensor.name, tensor.shape, tensor.type = name, list(shape), ttype
        tensor.shapeSignature = list(signature) if signature is not None else None
        tensor.buffer = 0
        if data is not None:
            buffer = self.s.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            self.buffers.append(buffer)
            tensor.buffer = len(self.buffers) - 1
        if quant is not None:
            params = self.s.QuantizationParametersT()
            params.scale = [float(quant[0])]
            params.zeroPoint = [int(quant[1])]
            tensor.quantization = params
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def op(self, code: int, inputs, outputs, options_type=0, options=None) -> None:
        if code not in self.opcodes:
            self.opcodes[code] = len(self.opcodes)
        operator = self.s.OperatorT()
        operator.opcodeIndex = self.opcodes[code]
        operator.inputs, operator.outputs = list(inputs), list(outputs)
        operator.builtinOptionsType, operator.builtinOptions = options_type, options
        self.operators.append(operator)

    def finish(self, inputs: list[int], outputs: list[int]) -> bytes:
        import flatbuffers

        s = self.s
        subgraph = s.SubGraphT()
        subgraph.tensors, subgraph.operators = self.tensors, self.operators
        subgraph.inputs, subgraph.outputs, subgraph.name = inputs, outputs, "main"
        model = s.ModelT()
        model.version, model.description = 3, "edge-runtime test MLP"
        model.buffers, model.subgraphs = self.buffers, [subgraph]
        codes = []
        for code in sorted(self.opcodes, key=self.opcodes.get):
            opcode = s.OperatorCodeT()
            opcode.builtinCode, opcode.deprecatedBuiltinCode, opcode.version = code, min(code, 127), 1
            codes.append(opcode)
        model.operatorCodes = codes
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _fc_options(schema: object, relu: bool) -> object:
    options = schema.FullyConnectedOptionsT()
    options.fusedActivationFunction = (
        schema.ActivationFunctionType.RELU if relu else schema.ActivationFunctionType.NONE
    )
    return options


def build_tflite_mlp(
    weights: MlpWeights, *, int8: bool = False, calibration: np.ndarray | None = None
) -> bytes:
    """The MLP as TFLite with a free batch dim: float32, or int8 inside with int8 input/output tensors."""
    from ai_edge_litert import schema_py_generated as s

    n_in, n_hidden, n_out = weights.sizes
    op, fc_type = s.BuiltinOperator, s.BuiltinOptions.FullyConnectedOptions
    softmax = s.SoftmaxOptionsT()
    softmax.beta = 1.0
    w = _TfliteWriter(s)
    if not int8:
        t = s.TensorType.FLOAT32
        x = w.tensor(INPUT_NAME, (1, n_in), t, signature=(-1, n_in))
        w1 = w.tensor("W1", (n_hidden, n_in), t, weights.w1.T)
        b1 = w.tensor("B1", (n_hidden,), t, weights.b1)
        w2 = w.tensor("W2", (n_out, n_hidden), t, weights.w2.T)
        b2 = w.tensor("B2", (n_out,), t, weights.b2)
        h = w.tensor("hidden", (1, n_hidden), t, signature=(-1, n_hidden))
        logits = w.tensor("logits", (1, n_out), t, signature=(-1, n_out))
        y = w.tensor(OUTPUT_NAME, (1, n_out), t, signature=(-1, n_out))
    else:
        x_cal = calibration if calibration is not None else np.random.default_rng(1).normal(size=(64, n_in))
        hidden_cal = np.maximum(x_cal @ weights.w1 + weights.b1, 0)
        logits_cal = hidden_cal @ weights.w2 + weights.b2
        i8, i32 = s.TensorType.INT8, s.TensorType.INT32
        x_q = (float(np.abs(x_cal).max()) / 127.0, 0)
        h_q = (float(hidden_cal.max()) / 255.0, -128)
        l_lo, l_hi = float(logits_cal.min()), float(logits_cal.max())
        l_q = ((l_hi - l_lo) / 255.0, round(-128 - l_lo / ((l_hi - l_lo) / 255.0)))
        w1_s, w2_s = float(np.abs(weights.w1).max()) / 127.0, float(np.abs(weights.w2).max()) / 127.0
        x = w.tensor(INPUT_NAME, (1, n_in), i8, quant=x_q, signature=(-1, n_in))
        w1 = w.tensor("W1", (n_hidden, n_in), i8, np.round(weights.w1.T / w1_s).astype(np.int8), (w1_s, 0))
        b1 = w.tensor(
            "B1",
            (n_hidden,),
            i32,
            np.round(weights.b1 / (x_q[0] * w1_s)).astype(np.int32),
            (x_q[0] * w1_s, 0),
        )
        w2 = w.tensor("W2", (n_out, n_hidden), i8, np.round(weights.w2.T / w2_s).astype(np.int8), (w2_s, 0))
        b2 = w.tensor(
            "B2", (n_out,), i32, np.round(weights.b2 / (h_q[0] * w2_s)).astype(np.int32), (h_q[0] * w2_s, 0)
        )
        h = w.tensor("hidden", (1, n_hidden), i8, quant=h_q, signature=(-1, n_hidden))
        logits = w.tensor("logits", (1, n_out), i8, quant=l_q, signature=(-1, n_out))
        y = w.tensor(OUTPUT_NAME, (1, n_out), i8, quant=(1.0 / 256.0, -128), signature=(-1, n_out))
    w.op(op.FULLY_CONNECTED, [x, w1, b1], [h], fc_type, _fc_options(s, relu=True))
    w.op(op.FULLY_CONNECTED, [h, w2, b2], [logits], fc_type, _fc_options(s, relu=False))
    w.op(op.SOFTMAX, [logits], [y], s.BuiltinOptions.SoftmaxOptions, softmax)
    return w.finish([x], [y])
