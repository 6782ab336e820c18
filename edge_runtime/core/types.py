"""The request, response and tensor types every layer shares (a leaf: imports nothing of ours)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

__all__ = ["InferRequest", "InferResponse", "StreamDecoding", "TensorSpec", "is_free_dim"]


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, element type and shape (str or -1 for a free dimension)."""

    name: str
    dtype: str
    """numpy dtype name, e.g. float32, int64."""
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        """Parse from the manifest's JSON form."""
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), shape=tuple(data["shape"]))


def is_free_dim(dim: int | str | None) -> bool:
    """True for a dimension any size may fill (a name, -1 or None)."""
    return dim is None or isinstance(dim, str) or dim < 0


@dataclass(frozen=True)
class InferRequest:
    """One inference request, whichever transport it came from."""

    model: str
    inputs: dict[str, np.ndarray]
    version: str | None = None
    id: str | None = None
    outputs: tuple[str, ...] | None = None
    """Names of the outputs wanted; None for all of them."""


@dataclass(frozen=True)
class InferResponse:
    """The outputs of one request, and the model version that produced them."""

    model: str
    version: str
    outputs: dict[str, np.ndarray]
    id: str | None = None


class StreamDecoding(StrEnum):
    """How a stream binding reads the payloads on its topic."""

    JSON = "json"
    """A JSON (nested) array of numbers."""
    RAW = "raw"
    """Raw little-endian tensor bytes of the binding's dtype and shape."""
    V2 = "v2"
    """A v2 inference request body (JSON)."""
