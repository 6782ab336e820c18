"""Offline compressor: turns a trained ONNX model into a small, fast, signed bundle for one device."""
