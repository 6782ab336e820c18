"""Tensor element types: numpy dtype names <-> KServe v2 datatype strings (FP32, INT64, BOOL, ...)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_runtime.core.errors import RequestError

__all__ = ["V2_TO_NUMPY", "numpy_dtype", "v2_datatype"]

V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_NUMPY_TO_V2 = {dtype: name for name, dtype in V2_TO_NUMPY.items()}


def numpy_dtype(datatype: Any, tensor: str) -> np.dtype:
    """The numpy dtype of a v2 datatype string; RequestError naming `tensor` if unsupported."""
    try:
        return V2_TO_NUMPY[datatype]
    except (KeyError, TypeError):
        if datatype == "BYTES":
            raise RequestError(
                f"tensor '{tensor}': BYTES tensors are not supported by this runtime"
            ) from None
        known = ", ".join(V2_TO_NUMPY)
        raise RequestError(f"tensor '{tensor}': unknown datatype {datatype!r} (known: {known})") from None


def v2_datatype(dtype: np.dtype | str) -> str:
    """The v2 datatype string of a numpy dtype (or dtype name)."""
    try:
        return _NUMPY_TO_V2[np.dtype(dtype)]
    except (KeyError, TypeError):
        return "BYTES"
