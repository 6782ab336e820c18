"""Inference engines behind one interface (ONNX Runtime, TFLite, OpenVINO), each imported only when a bundle asks for it."""

from __future__ import annotations

from edge_runtime.engines.base import Backend, load_backend

__all__ = ["Backend", "load_backend"]
