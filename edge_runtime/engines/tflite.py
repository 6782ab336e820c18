"""TFLite backend: `ai_edge_litert` (or `tflite_runtime`) imported lazily; int8 I/O seen as float.

A quantized input or output tensor (int8/uint8/int16 with a scale) is presented to callers as
float32: float feeds are quantized with the tensor's scale and zero point, integer outputs are
dequantized, so a caller sees the same float tensors as with the ONNX Runtime backend.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edge_runtime.artifact.manifest import Manifest
from edge_runtime.config.profiles import DeviceProfile
from edge_runtime.core.errors import ModelError, RequestError
from edge_runtime.core.types import TensorSpec, is_free_dim
from edge_runtime.engines.base import check_feed_names

__all__ = ["TfliteBackend", "import_interpreter"]

log = logging.getLogger(__name__)


def import_interpreter() -> type:
    """The TFLite `Interpreter` class from ai-edge-litert, else tflite-runtime; ModelError if neither."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise ModelError(
                "the TFLite engine needs the LiteRT interpreter: pip install ai-edge-litert "
                "(or tflite-runtime)"
            ) from None
    return Interpreter


@dataclass(frozen=True)
class _Slot:
    """One input or output tensor of the interpreter, with its quantization (scale 0: not quantized)."""

    spec: TensorSpec
    index: int
    dtype: np.dtype
    scale: float
    zero_point: int


def tflite_name(name: str) -> str:
    """The signature name a converter can give an ONNX tensor name (TF allows [A-Za-z0-9_.])."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", name)


def _signature_names(interpreter: Any) -> tuple[dict[int, str], dict[int, str]]:
    """Tensor index -> public name, from the model's only signature (converters name tensors there,
    while the tensors themselves get names like `serving_default_x:0`); empty without one."""
    try:
        signatures = interpreter.get_signature_list()
    except (AttributeError, ValueError):
        return {}, {}
    if len(signatures) != 1:
        return {}, {}
    runner = interpreter.get_signature_runner(next(iter(signatures)))
    inputs = {int(detail["index"]): name for name, detail in runner.get_input_details().items()}
    outputs = {int(detail["index"]): name for name, detail in runner.get_output_details().items()}
    return inputs, outputs


def _slot(detail: dict[str, Any], public_name: str | None = None) -> _Slot:
    """A slot from the interpreter's tensor details."""
    dtype = np.dtype(detail["dtype"])
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", ()), dtype=np.float64)
    zero_points = np.asarray(params.get("zero_points", ()), dtype=np.int64)
    if scales.size > 1:
        raise ModelError(f"tensor '{detail['name']}' is quantized per channel at the model's edge")
    quantized = scales.size == 1 and dtype.kind in "iu" and float(scales[0]) > 0
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    shape = tuple("?" if int(dim) < 0 else int(dim) for dim in dims)
    public = "float32" if quantized else dtype.name
    return _Slot(
        spec=TensorSpec(name=public_name or detail["name"], dtype=public, shape=shape),
        index=int(detail["index"]),
        dtype=dtype,
        scale=float(scales[0]) if quantized else 0.0,
        zero_point=int(zero_points[0]) if quantized and zero_points.size else 0,
    )


def _quantize(slot: _Slot, value: np.ndarray) -> np.ndarray:
    """Float values to the tensor's integer type (round to nearest, saturate)."""
    info = np.iinfo(slot.dtype)
    scaled = np.rint(value.astype(np.float32) / np.float32(slot.scale)) + slot.zero_point
    return np.clip(scaled, info.min, info.max).astype(slot.dtype)


def _dequantize(slot: _Slot, value: np.ndarray) -> np.ndarray:
    """Integer tensor values back to float32."""
    return ((value.astype(np.float32) - np.float32(slot.zero_point)) * np.float32(slot.scale)).astype(
        np.float32
    )


class TfliteBackend:
    """A model loaded into a TFLite interpreter (calls are serialized: the interpreter is not thread-safe)."""

    def __init__(self, interpreter: Any) -> None:
        self._interpreter: Any = interpreter
        self._lock = threading.Lock()
        in_names, out_names = _signature_names(interpreter)
        self._in = tuple(_slot(d, in_names.get(int(d["index"]))) for d in interpreter.get_input_details())
        self._out = tuple(_slot(d, out_names.get(int(d["index"]))) for d in interpreter.get_output_details())
        self.inputs = tuple(slot.spec for slot in self._in)
        self.outputs = tuple(slot.spec for slot in self._out)
        self._shapes = {
            int(detail["index"]): tuple(int(dim) for dim in detail["shape"])
            for detail in interpreter.get_input_details()
        }

    @classmethod
    def load(
        cls, manifest: Manifest, model_bytes: bytes, profile: DeviceProfile, *, threads: int | None = None
    ) -> TfliteBackend:
        """Create and allocate an interpreter with the profile's thread count (overridable)."""
        interpreter_class = import_interpreter()
        count = profile.runtime.intra_op_threads if threads is None else threads
        try:
            interpreter = interpreter_class(model_content=bytes(model_bytes), num_threads=count or None)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(
                f"{manifest.name} {manifest.version}: TFLite cannot load the model: {exc}"
            ) from exc
        log.info("loaded %s %s with TFLite, %s threads", manifest.name, manifest.version, count or "default")
        backend = cls(interpreter)
        backend._use_manifest_names(manifest)
        return backend

    def _use_manifest_names(self, manifest: Manifest) -> None:
        """Serve tensors under the manifest's names where the signature holds their TF-safe form."""
        for attribute, specs in (("_in", manifest.inputs), ("_out", manifest.outputs)):
            wanted = {tflite_name(spec.name): spec.name for spec in specs}
            slots = tuple(
                replace(slot, spec=replace(slot.spec, name=wanted[slot.spec.name]))
                if slot.spec.name in wanted
                else slot
                for slot in getattr(self, attribute)
            )
            setattr(self, attribute, slots)
        self.inputs = tuple(slot.spec for slot in self._in)
        self.outputs = tuple(slot.spec for slot in self._out)

    def _prepare(self, slot: _Slot, value: np.ndarray) -> np.ndarray:
        """Check a feed against its slot and convert it to the tensor's storage type."""
        value = np.asarray(value)
        name = slot.spec.name
        if value.ndim != len(slot.spec.shape) or any(
            not is_free_dim(want) and want != got
            for want, got in zip(slot.spec.shape, value.shape, strict=True)
        ):
            raise RequestError(
                f"input '{name}' has shape {list(value.shape)}, the model takes {list(slot.spec.shape)}"
            )
        if slot.scale:
            if value.dtype.kind != "f":
                raise RequestError(f"input '{name}' must be float, got {value.dtype}")
            return _quantize(slot, value)
        if value.dtype != slot.dtype:
            raise RequestError(f"input '{name}' has dtype {value.dtype}, the model takes {slot.dtype}")
        return value if value.flags.c_contiguous else np.ascontiguousarray(value)  # keeps a 0-d feed 0-d

    def _resize(self, prepared: dict[int, np.ndarray]) -> None:
        """Resize inputs whose shape changed (a new batch size), then re-allocate."""
        interpreter = self._interpreter
        changed = False
        for index, value in prepared.items():
            if self._shapes[index] != value.shape:
                interpreter.resize_tensor_input(index, list(value.shape), strict=True)
                self._shapes[index] = value.shape
                changed = True
        if changed:
            interpreter.allocate_tensors()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference; a feed the model cannot take raises RequestError."""
        check_feed_names(self.inputs, feeds)
        prepared = {slot.index: self._prepare(slot, feeds[slot.spec.name]) for slot in self._in}
        with self._lock:
            interpreter = self._interpreter
            if interpreter is None:
                raise ModelError("the model was unloaded")
            try:
                self._resize(prepared)
                for index, value in prepared.items():
                    interpreter.set_tensor(index, value)
                interpreter.invoke()
                raw = {slot: interpreter.get_tensor(slot.index) for slot in self._out}
            except ValueError as exc:
                raise RequestError(f"the model cannot run on this input: {exc}") from exc
            except RuntimeError as exc:
                raise ModelError(f"TFLite inference failed: {exc}") from exc
        return {
            slot.spec.name: _dequantize(slot, value) if slot.scale else value.copy()
            for slot, value in raw.items()
        }

    def close(self) -> None:
        """Drop the interpreter (an inference already running on it finishes first)."""
        with self._lock:
            self._interpreter = None
