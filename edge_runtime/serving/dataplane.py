"""The one dataplane every transport calls: validate a request, run the model, count it.

HTTP and MQTT each decode their bytes into an `InferRequest`, call `DataPlane.infer`, and encode
the `InferResponse`; validation, metrics and errors live here once, below the transports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime import __version__
from edge_runtime.config.profiles import Engine
from edge_runtime.core.datatypes import v2_datatype
from edge_runtime.core.errors import EdgeError, InternalError, PayloadTooLarge, RequestError
from edge_runtime.core.types import InferRequest, InferResponse, TensorSpec, is_free_dim
from edge_runtime.serving.metrics import Metrics
from edge_runtime.serving.registry import LoadedModel, ModelRegistry

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "DataPlane",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
SERVER_NAME = "edge-runtime"
_PLATFORMS = {
    Engine.ONNXRUNTIME.value: "onnxruntime_onnx",
    Engine.TFLITE.value: "tensorflow_lite",
    Engine.OPENVINO.value: "openvino",
}


@dataclass(frozen=True)
class Failure:
    """How every transport reports a failed request: an HTTP-like status and one readable line."""

    status: int
    message: str


def failure_of(exc: BaseException, what: str = "request") -> Failure:
    """The status and message for any exception a request raised (unexpected ones are logged, 500)."""
    if isinstance(exc, EdgeError):
        return Failure(exc.status, str(exc))
    if isinstance(exc, RecursionError):  # a document nested too deep for the parser
        return Failure(RequestError.status, f"{what} is nested too deeply to decode")
    if isinstance(exc, MemoryError):
        return Failure(PayloadTooLarge.status, f"{what} needs more memory than this device has")
    log.error("%s failed", what, exc_info=exc)
    return Failure(InternalError.status, f"internal error: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Readiness:
    """Whether the device is ready, and which configured models serve or were refused."""

    ready: bool
    serving: tuple[str, ...]
    refused: dict[str, str]
    """Model name -> why it was refused."""

    def to_dict(self) -> dict[str, Any]:
        """The body of ``/v2/health/ready``."""
        return {"ready": self.ready, "serving": list(self.serving), "refused": dict(self.refused)}


def _check_tensor(spec: TensorSpec, value: Any, sizes: dict[str, int]) -> np.ndarray:
    """One input checked against its spec: dtype (lossless casts only), rank, fixed and named dims."""
    array = np.asarray(value)
    expected = np.dtype(spec.dtype)
    if array.dtype != expected:
        if not np.can_cast(array.dtype, expected, casting="safe"):
            raise RequestError(f"input '{spec.name}' has dtype {array.dtype}, the model takes {expected}")
        array = array.astype(expected)
    if array.ndim != len(spec.shape):
        raise RequestError(
            f"input '{spec.name}' has shape {list(array.shape)}, the model takes {list(spec.shape)}"
        )
    for want, got in zip(spec.shape, array.shape, strict=True):
        if not is_free_dim(want) and want != got:
            raise RequestError(
                f"input '{spec.name}' has shape {list(array.shape)}, the model takes {list(spec.shape)}"
            )
        if isinstance(want, str) and want != "?" and sizes.setdefault(want, got) != got:
            raise RequestError(
                f"input '{spec.name}': dimension '{want}' is {got} here but {sizes[want]} elsewhere"
            )
    return array


def _spec_metadata(spec: TensorSpec) -> dict[str, Any]:
    """A tensor spec in the v2 metadata shape (free dimensions as -1)."""
    shape = [-1 if is_free_dim(dim) else int(dim) for dim in spec.shape]
    return {"name": spec.name, "datatype": v2_datatype(spec.dtype), "shape": shape}


class DataPlane:
    """Inference, metadata and health over a `ModelRegistry`, shared by every transport."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        strict_readiness: bool = True,
    ) -> None:
        self.registry = registry
        self.max_request_bytes = max_request_bytes
        self.strict_readiness = strict_readiness
        """Ready only when every configured model serves (Triton's strict readiness); else when any does."""
        self.metrics = Metrics()

    def _validate(self, model: LoadedModel, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The request's inputs checked and converted for the model."""
        specs = model.manifest.inputs
        names = [spec.name for spec in specs]
        unknown = sorted(set(inputs) - set(names))
        if unknown:
            raise RequestError(
                f"unknown input '{unknown[0]}' (model '{model.name}' takes: {', '.join(names)})"
            )
        missing = [name for name in names if name not in inputs]
        if missing:
            raise RequestError(
                f"missing input '{missing[0]}' (model '{model.name}' takes: {', '.join(names)})"
            )
        sizes: dict[str, int] = {}
        feeds = {spec.name: _check_tensor(spec, inputs[spec.name], sizes) for spec in specs}
        total = sum(array.nbytes for array in feeds.values())
        if total > self.max_request_bytes:
            raise PayloadTooLarge(f"inputs hold {total} bytes, the limit is {self.max_request_bytes}")
        return feeds

    @staticmethod
    def _select(model: LoadedModel, produced: dict[str, np.ndarray], wanted: tuple[str, ...] | None) -> dict:
        """The outputs asked for, in the manifest's order (all when `wanted` is None)."""
        names = [spec.name for spec in model.manifest.outputs]
        if wanted is None:
            return {name: produced[name] for name in names}
        unknown = [name for name in wanted if name not in names]
        if unknown:
            raise RequestError(
                f"unknown output '{unknown[0]}' (model '{model.name}' gives: {', '.join(names)})"
            )
        return {name: produced[name] for name in wanted}

    def infer(self, request: InferRequest) -> InferResponse:
        """Validate, run and count one request; RequestError / NotFoundError / UnavailableError / InternalError."""
        try:
            model = self.registry.get(request.model, request.version)
        except EdgeError:
            self.metrics.reject()
            raise
        start = time.perf_counter()
        ok = False
        try:
            feeds = self._validate(model, request.inputs)
            try:
                produced = model.predict(feeds)
            except EdgeError:
                raise
            except Exception as exc:  # an engine failure: answered 500, the server keeps serving
                log.exception("%s %s failed on a request", model.name, model.version)
                raise InternalError(f"model '{model.name}' failed: {type(exc).__name__}: {exc}") from exc
            outputs = self._select(model, produced, request.outputs)
            ok = True
        finally:
            self.metrics.observe(model.name, model.version, time.perf_counter() - start, ok)
        return InferResponse(model=model.name, version=model.version, outputs=outputs, id=request.id)

    def server_metadata(self) -> dict[str, Any]:
        """The v2 server metadata."""
        return {"name": SERVER_NAME, "version": __version__, "extensions": ["binary_tensor_data"]}

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The v2 model metadata: name, versions, platform, inputs and outputs with v2 datatypes."""
        model = self.registry.get(name, version)
        manifest = model.manifest
        return {
            "name": manifest.name,
            "versions": [manifest.version],
            "platform": _PLATFORMS.get(manifest.engine, manifest.engine),
            "inputs": [_spec_metadata(spec) for spec in manifest.inputs],
            "outputs": [_spec_metadata(spec) for spec in manifest.outputs],
        }

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """True when the model (at that version, if given) is loaded and serving."""
        try:
            self.registry.get(name, version)
        except EdgeError:
            return False
        return True

    def live(self) -> bool:
        """True while the process can answer at all."""
        return True

    def shed(self, model: str | None) -> None:
        """Count a request a transport refused unread because it was over capacity (answered 503)."""
        self.metrics.shed(model)

    def readiness(self) -> Readiness:
        """Ready when the first load finished and every configured model serves (or, not strict, any)."""
        serving = tuple(model.name for model in self.registry.models())
        refused = {failure.name: failure.reason for failure in self.registry.failures()}
        wanted = not refused if self.strict_readiness else bool(serving) or not refused
        ready = self.registry.ready and wanted
        return Readiness(ready=ready, serving=serving, refused=refused)

    def ready(self) -> bool:
        """True when `readiness()` says so."""
        return self.readiness().ready
