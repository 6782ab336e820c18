"""The one interface every inference engine sits behind, and the function that picks one."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from edge_runtime.artifact.manifest import Manifest
from edge_runtime.config.profiles import DeviceProfile, Engine
from edge_runtime.core.errors import ModelError, RequestError
from edge_runtime.core.types import TensorSpec

__all__ = ["Backend", "check_feed_names", "load_backend"]

_MODULES = {
    Engine.ONNXRUNTIME: "edge_runtime.engines.onnx:OnnxBackend",
    Engine.TFLITE: "edge_runtime.engines.tflite:TfliteBackend",
    Engine.OPENVINO: "edge_runtime.engines.openvino:OpenvinoBackend",
}


@runtime_checkable
class Backend(Protocol):
    """A loaded model: tensor specs in and out, `run` on float/int numpy arrays, `close`."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference; raises RequestError for a feed the model cannot take."""
        ...

    def close(self) -> None:
        """Release the engine's resources; `run` afterwards is an error."""
        ...


def check_feed_names(specs: tuple[TensorSpec, ...], feeds: Mapping[str, np.ndarray]) -> None:
    """Raise RequestError unless `feeds` holds exactly the inputs `specs` names."""
    if len(feeds) == len(specs) and all(spec.name in feeds for spec in specs):
        return
    expected = [spec.name for spec in specs]
    missing = [name for name in expected if name not in feeds]
    if missing:
        raise RequestError(f"missing input '{missing[0]}' (the model takes: {', '.join(expected)})")
    unknown = sorted(set(feeds) - set(expected))
    if unknown:
        raise RequestError(f"unknown input '{unknown[0]}' (the model takes: {', '.join(expected)})")


def _check_names_agree(manifest: Manifest, backend: Backend) -> None:
    """The manifest must describe the model it ships: same input and output names."""
    for kind, declared, actual in (
        ("inputs", manifest.inputs, backend.inputs),
        ("outputs", manifest.outputs, backend.outputs),
    ):
        declared_names = sorted(spec.name for spec in declared)
        actual_names = sorted(spec.name for spec in actual)
        if declared_names != actual_names:
            raise ModelError(
                f"{manifest.name} {manifest.version}: manifest {kind} {declared_names} do not match "
                f"the model's {actual_names}"
            )


def _check_engine_options(manifest: Manifest, known: tuple[str, ...]) -> None:
    """Refuse engine options the manifest's engine does not read (a bundle made for another engine)."""
    unknown = sorted(set(manifest.engine_options) - set(known))
    if unknown:
        raise ModelError(
            f"{manifest.name} {manifest.version}: engine option '{unknown[0][:64]}' is not known to the "
            f"{manifest.engine} engine (known: {', '.join(known) or 'none'})"
        )


def load_backend(
    manifest: Manifest, model_bytes: bytes, profile: DeviceProfile, *, threads: int | None = None
) -> Backend:
    """Load `model_bytes` with the engine the manifest names; raises ModelError when it cannot."""
    try:
        target = _MODULES[Engine(manifest.engine)]
    except ValueError:
        known = ", ".join(engine.value for engine in Engine)
        raise ModelError(f"unknown engine '{manifest.engine}' (known: {known})") from None
    module_name, attribute = target.split(":")
    backend_class = getattr(importlib.import_module(module_name), attribute)
    _check_engine_options(manifest, getattr(backend_class, "OPTIONS", ()))
    backend: Backend = backend_class.load(manifest, model_bytes, profile, threads=threads)
    try:
        _check_names_agree(manifest, backend)
    except ModelError:
        backend.close()
        raise
    return backend
