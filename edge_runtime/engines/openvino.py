"""OpenVINO backend: the `openvino` package, imported only when a bundle asks for it, compiles the
bundle's ONNX model for the CPU with the profile's threads and the manifest's precision hint.

Two things differ from ONNX Runtime and are handled here:
- OpenVINO reads an ONNX model's external data relative to the process's working directory when
  the model comes as bytes, so the model is written to a fresh, empty private folder and read from
  there: a bundle cannot make the engine read any file beside its own model.
- OpenVINO converts or ignores a feed of the wrong dtype or shape instead of failing, so every feed
  is checked against the model's inputs before it runs.

OpenVINO runs a model with dynamic input dimensions markedly slower than the same model compiled for
one shape (PP-OCR text classifier: 3.3 -> 2.1 ms), so a bundle may carry `static_shape` (set by the
compressor when its data had one shape): the model is compiled for it, and a feed of another shape the
model takes runs on a second compile for every shape, made on the first such feed.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from edge_runtime.artifact.manifest import Manifest
from edge_runtime.config.profiles import DeviceProfile
from edge_runtime.core.errors import ModelError, RequestError
from edge_runtime.core.types import TensorSpec, is_free_dim
from edge_runtime.engines.base import check_feed_names

__all__ = [
    "PRECISIONS",
    "OpenvinoBackend",
    "compile_config",
    "format_static_shape",
    "import_openvino",
    "parse_static_shape",
]

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


def format_static_shape(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The `static_shape` option for these input shapes: `name=1,3,48,192;other=1,32`."""
    return ";".join(f"{name}={','.join(str(int(d)) for d in dims)}" for name, dims in sorted(shapes.items()))


def parse_static_shape(text: str, where: str) -> dict[str, tuple[int, ...]]:
    """Input name -> shape from a `static_shape` option; ModelError naming what is malformed."""
    shapes: dict[str, tuple[int, ...]] = {}
    for part in filter(None, text.split(";")):
        name, sep, dims = part.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(",")) if dims else ()
        except ValueError:
            shape = (-1,)
        if not sep or not name or any(d < 0 for d in shape):
            raise ModelError(
                f"{where}: static_shape '{part[:60]}' is not NAME=D1,D2,... with non-negative integer dimensions"
            )
        shapes[name] = shape
    return shapes


def _fix_shapes(ov: ModuleType, model: Any, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Reshape the model's inputs to `shapes` before compiling; ModelError for an input it lacks or a
    shape its rank or fixed dimensions refuse."""
    ports = {port.get_any_name(): port for port in model.inputs}
    unknown = sorted(set(shapes) - set(ports))
    if unknown:
        raise ModelError(f"{where}: static_shape names {', '.join(unknown)[:200]}, not an input of the model")
    for name, shape in shapes.items():
        if not ports[name].get_partial_shape().compatible(ov.PartialShape(list(shape))):
            raise ModelError(
                f"{where}: static_shape {name}={list(shape)} does not fit the model's input shape "
                f"{ports[name].get_partial_shape()}"
            )
    model.reshape({ports[name]: list(shape) for name, shape in shapes.items()})


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

    OPTIONS: ClassVar[tuple[str, ...]] = ("inference_precision", "static_shape")
    """Manifest `engine_options` keys this engine reads."""

    def __init__(
        self, compiled: Any, precision: str, fallback_reason: str, errors: tuple[type[Exception], ...],
        general: Callable[[], Any] | None = None, inputs: tuple[TensorSpec, ...] | None = None,
    ) -> None:  # fmt: skip
        self._compiled: Any = compiled
        self._errors = errors
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._static = tuple(_spec(port) for port in compiled.inputs)
        self.inputs = inputs or self._static
        self.outputs = tuple(_spec(port) for port in compiled.outputs)
        self.precision = precision
        """The precision the model runs at (f32 when bf16 was asked for on a CPU without it)."""
        self.fallback_reason = fallback_reason
        self._general_compile = general
        """Compiles the model for every shape it takes (a static-shape bundle fed another shape)."""
        self._general: BackendSlot | None = None
        self._lock = threading.Lock()
        self._tensor: Callable[[np.ndarray], Any] = import_openvino().Tensor
        """A copy of a feed as an OpenVINO tensor."""

    @classmethod
    def load(
        cls, manifest: Manifest, model_bytes: bytes, profile: DeviceProfile, *, threads: int | None = None
    ) -> OpenvinoBackend:
        """Read and compile the model with the profile's threads (overridable) and its options."""
        ov = import_openvino()
        where = f"{manifest.name} {manifest.version}"
        wanted = _check_precision(manifest)
        shapes = parse_static_shape(manifest.engine_options.get("static_shape", ""), where)
        count = profile.runtime.intra_op_threads if threads is None else threads
        errors = _engine_errors(ov)
        try:
            core = ov.Core()
            capabilities = tuple(core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
            config, reason = compile_config(wanted, count, capabilities)
            model = _read_onnx(ov, bytes(model_bytes), where)
            inputs = tuple(_spec(port) for port in model.inputs)
            if shapes:  # compiled for the one shape the compressor's data had
                _fix_shapes(ov, model, shapes, where)
            compiled = core.compile_model(model, DEVICE, config)
        except errors as exc:
            raise ModelError(f"{where}: OpenVINO cannot load the model: {_first_line(exc)}") from exc
        if reason:
            log.warning("%s: inference_precision %s: %s", where, wanted, reason)
        precision = "bf16" if config["INFERENCE_PRECISION_HINT"] == "bf16" else "f32"
        log.info("loaded %s with OpenVINO (%s, %s threads)", where, precision, count or "default")

        def general() -> Any:
            log.info("%s: a feed of another shape than static_shape: compiling for every shape", where)
            return core.compile_model(_read_onnx(ov, bytes(model_bytes), where), DEVICE, config)

        return cls(compiled, precision, reason, errors, general if shapes else None, inputs)

    @property
    def static_inputs(self) -> tuple[TensorSpec, ...] | None:
        """The input shapes the model is compiled for (None without `static_shape`)."""
        return self._static if self._general_compile is not None else None

    @property
    def compiled_models(self) -> int:
        """1, or 2 once a feed of another shape than `static_shape` made the general compile."""
        return 1 + (self._general is not None)

    def _slot(self, prepared: Mapping[str, np.ndarray]) -> BackendSlot:
        """Where this feed runs: the static-shape compile when it fits, else the general one."""
        compiled = self._compiled
        if compiled is None:
            raise ModelError("the model was unloaded")
        if self._general_compile is None or all(
            tuple(prepared[spec.name].shape) == spec.shape for spec in self._static
        ):
            return BackendSlot(compiled, self._idle)
        with self._lock:
            if self._general is None:
                try:
                    self._general = BackendSlot(self._general_compile(), queue.SimpleQueue())
                except self._errors as exc:
                    raise RequestError(
                        f"the model cannot run on this input shape: {_first_line(exc)}"
                    ) from exc
            return self._general

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference; a feed the model cannot take raises RequestError."""
        check_feed_names(self.inputs, feeds)
        prepared = {spec.name: _check_feed(spec, feeds[spec.name]) for spec in self.inputs}
        slot = self._slot(prepared)
        request = slot.request()
        try:  # tensors set one by one and a bare infer(): `infer(dict)` costs 0.25 ms more per call
            for index, spec in enumerate(self._static):  # the compiled model's input order
                request.set_input_tensor(index, self._tensor(prepared[spec.name]))
            request.infer()
            values = [request.get_output_tensor(index).data.copy() for index in range(len(self.outputs))]
        except self._errors as exc:
            raise RequestError(f"the model cannot run on this input: {_first_line(exc)}") from exc
        if self._compiled is not None:
            slot.idle.put(request)
        return {spec.name: value for spec, value in zip(self.outputs, values, strict=True)}

    def close(self) -> None:
        """Drop the compiled model (an inference already running on it finishes first)."""
        self._compiled = None
        self._general = None
        while not self._idle.empty():
            self._idle.get_nowait()


@dataclasses.dataclass(frozen=True)
class BackendSlot:
    """One compiled model and its idle infer requests."""

    compiled: Any
    idle: queue.SimpleQueue[Any]

    def request(self) -> Any:
        """An idle infer request, or a new one when every request is busy."""
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            return self.compiled.create_infer_request()


def _first_line(exc: BaseException) -> str:
    """OpenVINO's messages hold source locations and blank lines; keep the lines a user can act on."""
    lines = [line.strip() for line in str(exc).splitlines()]
    useful = [line for line in lines if line and not line.startswith(("Exception from", "Check '"))]
    return " ".join(useful)[:400] or type(exc).__name__
