"""ONNX Runtime backend: the one module that creates `InferenceSession`s and translates ORT errors."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from edge_runtime.artifact.manifest import Manifest
from edge_runtime.config.profiles import DeviceProfile
from edge_runtime.core.errors import ModelError, RequestError
from edge_runtime.core.types import TensorSpec
from edge_runtime.engines.base import check_feed_names

__all__ = ["OnnxBackend", "choose_providers"]

log = logging.getLogger(__name__)

_ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    value for value in vars(ort_state).values() if isinstance(value, type) and issubclass(value, Exception)
)
_RUN_ERRORS: tuple[type[Exception], ...] = (*_ORT_ERRORS, ValueError, TypeError)
_ELEMENT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def choose_providers(wanted: tuple[str, ...]) -> list[str]:
    """The profile's execution providers this onnxruntime build has, in order (CPU if none)."""
    available = set(ort.get_available_providers())
    chosen = [name for name in wanted if name in available]
    skipped = [name for name in wanted if name not in available]
    if skipped:
        log.warning("execution providers not in this onnxruntime build, skipped: %s", ", ".join(skipped))
    if not chosen:
        log.warning("none of the profile's execution providers is available; using CPUExecutionProvider")
        chosen = ["CPUExecutionProvider"]
    return chosen


def _spec(node: Any) -> TensorSpec:
    """A TensorSpec from an ORT NodeArg (free dimensions keep their name, or become '?')."""
    dtype = _ELEMENT_TYPES.get(node.type, node.type)
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else (dim or "?") for dim in node.shape)
    return TensorSpec(name=node.name, dtype=dtype, shape=shape)


_EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
_NO_FOLDER = "/proc/self/edge-runtime-no-external-data"
"""Where ORT may look for a model's external weights: a folder that cannot exist (and costs no disk)."""


def _session_options(manifest: Manifest, threads: int) -> ort.SessionOptions:
    """Options with the thread count and every session config entry the manifest asks for.

    A model loaded from bytes would otherwise read "external data" files named in it relative to
    the process's working directory (even ``../``); every bundle carries its weights inside the
    model, so external data is confined to a folder that cannot exist, and a model naming any is refused.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    for key, value in sorted(manifest.session_config.items()):
        if key == _EXTERNAL_DATA_FOLDER:
            raise ModelError(
                f"session config entry {key} is refused: a bundle carries its weights inside the model"
            )
        try:
            options.add_session_config_entry(key, value)
        except _ORT_ERRORS as exc:
            raise ModelError(f"session config entry {key}={value} is refused: {exc}") from exc
    options.add_session_config_entry(_EXTERNAL_DATA_FOLDER, _NO_FOLDER)
    return options


def _release_model_bytes(session: ort.InferenceSession) -> None:
    """Let go of the model bytes ORT's Python wrapper keeps once the session exists (a second copy).

    The wrapper holds them only to re-create the session on an execution-provider failure; with
    that fallback off, nothing reads them again. Dropping them saves the model's size in RSS.
    """
    if getattr(session, "_model_bytes", None) is not None:
        session.disable_fallback()
        session._model_bytes = None


class OnnxBackend:
    """A model loaded into an ONNX Runtime `InferenceSession` (thread-safe `run`)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session: ort.InferenceSession | None = session
        self.inputs = tuple(_spec(node) for node in session.get_inputs())
        self.outputs = tuple(_spec(node) for node in session.get_outputs())
        self._output_names = [spec.name for spec in self.outputs]
        self.providers = tuple(session.get_providers())

    @classmethod
    def load(
        cls, manifest: Manifest, model_bytes: bytes, profile: DeviceProfile, *, threads: int | None = None
    ) -> OnnxBackend:
        """Create the session with the profile's providers and threads (overridable)."""
        count = profile.runtime.intra_op_threads if threads is None else threads
        options = _session_options(manifest, count)
        providers = choose_providers(profile.runtime.execution_providers)
        try:
            session = ort.InferenceSession(model_bytes, sess_options=options, providers=providers)
        except _ORT_ERRORS as exc:
            raise ModelError(
                f"{manifest.name} {manifest.version}: ONNX Runtime cannot load the model: {exc}"
            ) from exc
        _release_model_bytes(session)
        log.info(
            "loaded %s %s with %s, %d intra-op threads", manifest.name, manifest.version, providers, count
        )
        return cls(session)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference; a feed the model cannot take raises RequestError."""
        session = self._session
        if session is None:
            raise ModelError("the model was unloaded")
        check_feed_names(self.inputs, feeds)
        try:
            values = session.run(self._output_names, dict(feeds))
        except _RUN_ERRORS as exc:
            raise RequestError(f"the model cannot run on this input: {exc}") from exc
        return dict(zip(self._output_names, values, strict=True))

    def close(self) -> None:
        """Drop the session (an inference already running on it finishes first)."""
        self._session = None
