"""Inference engines behind one interface (ONNX Runtime, TFLite), each imported only when used."""

from __future__ import annotations

from edge_runtime.backends.base import Backend, load_backend

__all__ = ["Backend", "load_backend"]
