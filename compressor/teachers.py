"""Task models trained in-repo to serve as teachers: a small CNN on scikit-learn's digits.

The digits set (1,797 8x8 grey images, 10 classes) ships inside scikit-learn, so everything here
runs offline. Training needs PyTorch (the `distill` extra); it is imported only when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from compressor.torch_bridge import export_onnx, require_torch, torch_threads

if TYPE_CHECKING:
    import torch

__all__ = [
    "DIGITS_INPUT",
    "DIGITS_OUTPUT",
    "DigitsData",
    "as_samples",
    "build_digits_cnn",
    "digits_data",
    "digits_teacher",
    "train_digits_cnn",
]

DIGITS_INPUT = "image"
DIGITS_OUTPUT = "logits"


@dataclass(frozen=True)
class DigitsData:
    """scikit-learn's digits as NCHW float32 images in [0, 1], split into train and held-out test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits_data(seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
    """Load the digits and split them, stratified, with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return DigitsData(x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64))


def as_samples(x: np.ndarray, name: str = DIGITS_INPUT) -> list[dict[str, np.ndarray]]:
    """One feed dict per row of `x` (batch dimension 1 kept)."""
    return [{name: x[i : i + 1]} for i in range(len(x))]


def build_digits_cnn(width: float = 1.0) -> torch.nn.Module:
    """Conv(32)-Conv(64)-MaxPool-Linear(128)-Linear(10) for 1x8x8 inputs, channels scaled by `width`."""
    torch = require_torch("the digits CNN")
    nn = torch.nn
    c1, c2, hidden = (max(1, round(c * width)) for c in (32, 64, 128))
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 16, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def train_digits_cnn(
    data: DigitsData | None = None, *, seed: int = 0, epochs: int = 30, log: Any = None
) -> onnx.ModelProto:
    """Train the digits CNN with cross-entropy (seeded, CPU) and export it to ONNX."""
    torch = require_torch("training the digits CNN")
    data = data or digits_data(seed)
    with torch_threads(1):
        return _train(torch, data, seed, epochs, log)


def _train(torch: Any, data: DigitsData, seed: int, epochs: int, log: Any) -> onnx.ModelProto:
    """The training loop of `train_digits_cnn`."""
    torch.manual_seed(seed)
    model = build_digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
        if log is not None:
            log(f"digits CNN epoch {epoch + 1}/{epochs} loss {loss.item():.4f}")
    example = [torch.from_numpy(data.x_test[:1])]
    return export_onnx(model, example, [DIGITS_INPUT], [DIGITS_OUTPUT])


def digits_teacher(cache: Path | None = None, *, seed: int = 0, epochs: int = 30) -> onnx.ModelProto:
    """The trained digits CNN, loaded from `cache` when that file exists, else trained (and saved there)."""
    if cache is not None and cache.exists():
        return onnx.load(str(cache))
    model = train_digits_cnn(digits_data(seed), seed=seed, epochs=epochs)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(cache))
    return model
