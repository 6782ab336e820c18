"""The embedded demo task: a 64-128-10 MLP trained on scikit-learn's digits, exported to ONNX."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sklearn.neural_network import MLPClassifier

__all__ = [
    "CALIBRATION_SAMPLES",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "TUNING_SAMPLES",
    "VALIDATION_SAMPLES",
    "DigitsTask",
    "export_mlp",
    "train_digits_model",
]

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
VALIDATION_SAMPLES = 360
"""Held-out test split (20% of the 1797 digits)."""
CALIBRATION_SAMPLES = 200
"""Calibration feeds drawn from the training split."""
TUNING_SAMPLES = 200
"""Labeled training-split feeds, disjoint from calibration, for a compressor's own measurements."""
_HIDDEN = 128
_OPSET = 17


@dataclass(frozen=True, eq=False)
class DigitsTask:
    """A trained digits model with its calibration and labeled validation feeds."""

    model: bytes
    """Serialized ONNX model: input "pixels" float32 [N, 64] (0..1), output "logits" float32 [N, 10]."""
    calibration: list[dict[str, np.ndarray]]
    """Feeds of batch 1 from the training split."""
    validation: list[dict[str, np.ndarray]]
    """Feeds of batch 1 from the held-out test split."""
    labels: np.ndarray
    """Class ids (int64) of the validation feeds, same order."""
    tuning: list[dict[str, np.ndarray]]
    """Labeled training-split feeds disjoint from calibration: lets a benchmark keep `validation` unseen."""
    tuning_labels: np.ndarray
    """Class ids of the tuning feeds."""
    sklearn_accuracy: float
    """Accuracy of the scikit-learn model on the validation split (the ONNX model must match it)."""


def train_digits_model(seed: int = 0) -> DigitsTask:
    """Train the digits MLP (deterministic for a seed, a few seconds) and export it to ONNX."""
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=VALIDATION_SAMPLES, random_state=seed, stratify=y
    )
    mlp = MLPClassifier(hidden_layer_sizes=(_HIDDEN,), max_iter=200, random_state=seed)
    # One BLAS thread: the same bits on every machine, and no thread storms on a busy host.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(x_train, y_train)
    picks = np.random.default_rng(seed).permutation(len(x_train))
    calibration = np.sort(picks[:CALIBRATION_SAMPLES])
    tuning = np.sort(picks[CALIBRATION_SAMPLES : CALIBRATION_SAMPLES + TUNING_SAMPLES])
    return DigitsTask(
        model=export_mlp(mlp),
        calibration=[{INPUT_NAME: x_train[i : i + 1]} for i in calibration],
        validation=[{INPUT_NAME: x_test[i : i + 1]} for i in range(len(x_test))],
        labels=y_test,
        tuning=[{INPUT_NAME: x_train[i : i + 1]} for i in tuning],
        tuning_labels=y_train[tuning],
        sklearn_accuracy=float(mlp.score(x_test, y_test)),
    )


def export_mlp(mlp: MLPClassifier) -> bytes:
    """Write a fitted one-hidden-layer ReLU MLPClassifier as an ONNX Gemm-Relu-Gemm graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if mlp.activation != "relu" or len(mlp.coefs_) != 2:
        raise ValueError("export_mlp handles one hidden ReLU layer only")
    w1, w2 = (np.asarray(w, dtype=np.float32) for w in mlp.coefs_)
    b1, b2 = (np.asarray(b, dtype=np.float32) for b in mlp.intercepts_)
    inits = [
        numpy_helper.from_array(w1, "fc1.weight"),
        numpy_helper.from_array(b1, "fc1.bias"),
        numpy_helper.from_array(w2, "fc2.weight"),
        numpy_helper.from_array(b2, "fc2.bias"),
    ]
    nodes = [
        helper.make_node("Gemm", [INPUT_NAME, "fc1.weight", "fc1.bias"], ["fc1"], name="fc1"),
        helper.make_node("Relu", ["fc1"], ["relu1"], name="relu1"),
        helper.make_node("Gemm", ["relu1", "fc2.weight", "fc2.bias"], [OUTPUT_NAME], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", w1.shape[0]])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", w2.shape[1]])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="edge-runtime-demo"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
