"""OpenVINO backend: the `openvino` package, imported only when a bundle asks for it, compiles the
bundle's ONNX model for the CPU with the profile's threads and the manifest's precision hint.

Two things differ from ONNX Runtime and are handled here:
- OpenVINO reads an ONNX model's external data relative to the process's working directory when
  the model comes as bytes, so the model is written to a fresh, empty private folder and read from
  there: a bundle cannot make the engine read any file beside its own model.
- OpenVINO converts or ignores a feed of the wrong dtype or shape instead of failing, so every feed
  is checked against the model's inputs before it runs.
"""

from __future__ import annotations

import logging
import queue
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from edge_runtime.artifact.manifest import Manifest
from edge_runtime.config.profiles import DeviceProfile
from edge_runtime.core.errors import ModelError, RequestError
from edge_runtime.core.types import TensorSpec, is_free_dim
from edge_runtime.engines.base import check_feed_names

__all__ = ["PRECISIONS", "OpenvinoBackend", "compile_config", "import_openvino"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'edge-runtime[openvino]' (openvino==2026.4.1)"
"""What a device without the engine must install."""
PRECISIONS = {"f32": "FP32", "bf16": "BF16"}
"""`inference_precision` option -> the CPU capability OpenVINO reports for it."""
DEVICE = "CPU"


def import_openvino() -> ModuleType:
    """The `openvino` module; ModelError saying what to install when it is missing."""
    try:
        import openvino
    except ImportError as exc:
        raise ModelError(f"the openvino engine needs the OpenVINO runtime ({exc}): {INSTALL_HINT}") from None
    return openvino


def _engine_errors(ov: ModuleType) -> tuple[type[Exception], ...]:
    """Every exception class OpenVINO raises for a model it cannot read or compile."""
    found = [
        value
        for value in vars(ov.frontend).values()
        if isinstance(value, type) and issubclass(value, Exception)
    ]
    return (RuntimeError, ValueError, TypeError, *found)


def _check_precision(manifest: Manifest) -> str:
    """The manifest's precision option (f32 unless given); ModelError naming the allowed values."""
    precision = manifest.engine_options.get("inference_precision", "f32")
    if precision not in PRECISIONS:
        raise ModelError(
            f"{manifest.name} {manifest.version}: inference_precision '{precision[:16]}' is not one of "
            f"{', '.join(PRECISIONS)}"
        )
    return precision


def compile_config(precision: str, threads: int, capabilities: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """CPU compile properties for `precision` and `threads`, and why bf16 fell back to f32 ('' if not).

    bf16 needs the CPU's BF16 capability (AVX512_BF16 or AMX); without it OpenVINO would run f32
    anyway, so f32 is asked for outright and the reason is returned for the log.
    """
    reason = ""
    if precision != "f32" and PRECISIONS[precision] not in capabilities:
        reason = (
            f"this CPU has no {PRECISIONS[precision]} support (OpenVINO reports: "
            f"{', '.join(capabilities) or 'nothing'}); running f32 instead"
        )
        precision = "f32"
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_PRECISION_HINT": precision,
    }
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = threads
    return config, reason


def _read_onnx(ov: ModuleType, model_bytes: bytes, where: str) -> Any:
    """Read ONNX bytes with OpenVINO's ONNX frontend from a private folder holding nothing else."""
    frontend = ov.frontend.FrontEndManager().load_by_framework("onnx")
    with tempfile.TemporaryDirectory(prefix="edge-openvino-") as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(model_bytes)
        if not frontend.supported(str(path)):
            raise ModelError(f"{where}: OpenVINO cannot load the model: it is not an ONNX model")
        return frontend.convert(frontend.load(str(path)))


def _spec(port: Any) -> TensorSpec:
    """A TensorSpec from an OpenVINO port (dynamic dimensions become '?')."""
    dims = tuple("?" if dim.is_dynamic else int(dim.get_length()) for dim in port.get_partial_shape())
    dtype = np.dtype(port.get_element_type().to_dtype()).name
    return TensorSpec(name=port.get_any_name(), dtype=dtype, shape=dims)


def _check_feed(spec: TensorSpec, value: np.ndarray) -> np.ndarray:
    """The feed as a contiguous array the input takes; RequestError for a wrong rank, size or dtype."""
    value = np.asarray(value)
    if value.ndim != len(spec.shape) or any(
        not is_free_dim(want) and want != got for want, got in zip(spec.shape, value.shape, strict=True)
    ):
        raise RequestError(
            f"input '{spec.name}' has shape {list(value.shape)}, the model takes {list(spec.shape)}"
        )
    if value.dtype != np.dtype(spec.dtype):
        raise RequestError(f"input '{spec.name}' has dtype {value.dtype}, the model takes {spec.dtype}")
    return value if value.flags.c_contiguous else value.copy(order="C")  # keeps 0-d feeds 0-d


class OpenvinoBackend:
    """A model compiled by OpenVINO for the CPU; `run` is thread-safe (one infer request per caller)."""

    OPTIONS: ClassVar[tuple[str, ...]] = ("inference_precision",)
    """Manifest `engine_options` keys this engine reads."""

    def __init__(
        self, compiled: Any, precision: str, fallback_reason: str, errors: tuple[type[Exception], ...]
    ) -> None:
        self._compiled: Any = compiled
        self._errors = errors
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.inputs = tuple(_spec(port) for port in compiled.inputs)
        self.outputs = tuple(_spec(port) for port in compiled.outputs)
        self.precision = precision
        """The precision the model runs at (f32 when bf16 was asked for on a CPU without it)."""
        self.fallback_reason = fallback_reason

    @classmethod
    def load(
        cls, manifest: Manifest, model_bytes: bytes, profile: DeviceProfile, *, threads: int | None = None
    ) -> OpenvinoBackend:
        """Read and compile the model with the profile's threads (overridable) and its precision option."""
        ov = import_openvino()
        where = f"{manifest.name} {manifest.version}"
        wanted = _check_precision(manifest)
        count = profile.runtime.intra_op_threads if threads is None else threads
        errors = _engine_errors(ov)
        try:
            core = ov.Core()
            capabilities = tuple(core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
            config, reason = compile_config(wanted, count, capabilities)
            compiled = core.compile_model(_read_onnx(ov, bytes(model_bytes), where), DEVICE, config)
        except errors as exc:
            raise ModelError(f"{where}: OpenVINO cannot load the model: {_first_line(exc)}") from exc
        if reason:
            log.warning("%s: inference_precision %s: %s", where, wanted, reason)
        precision = "bf16" if config["INFERENCE_PRECISION_HINT"] == "bf16" else "f32"
        log.info("loaded %s with OpenVINO (%s, %s threads)", where, precision, count or "default")
        return cls(compiled, precision, reason, errors)

    def _request(self) -> Any:
        """An idle infer request, or a new one when every request is busy."""
        compiled = self._compiled
        if compiled is None:
            raise ModelError("the model was unloaded")
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return compiled.create_infer_request()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference; a feed the model cannot take raises RequestError."""
        check_feed_names(self.inputs, feeds)
        prepared = {spec.name: _check_feed(spec, feeds[spec.name]) for spec in self.inputs}
        request = self._request()
        try:
            results = request.infer(prepared, share_outputs=False)
            values = [np.asarray(results[index]) for index in range(len(self.outputs))]
        except self._errors as exc:
            raise RequestError(f"the model cannot run on this input: {_first_line(exc)}") from exc
        if self._compiled is not None:
            self._idle.put(request)
        return {spec.name: value for spec, value in zip(self.outputs, values, strict=True)}

    def close(self) -> None:
        """Drop the compiled model (an inference already running on it finishes first)."""
        self._compiled = None
        while not self._idle.empty():
            self._idle.get_nowait()


def _first_line(exc: BaseException) -> str:
    """OpenVINO's messages hold source locations and blank lines; keep the lines a user can act on."""
    lines = [line.strip() for line in str(exc).splitlines()]
    useful = [line for line in lines if line and not line.startswith(("Exception from", "Check '"))]
    return " ".join(useful)[:400] or type(exc).__name__
