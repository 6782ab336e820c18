"""Device profiles: validated TOML files describing a target device and its budgets."""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import tomllib
import typing
from dataclasses import dataclass
from enum import StrEnum
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from edge_runtime.core.errors import EdgeError, ProfileError

BUILTIN_FOLDER = "device_profiles"
"""The package folder holding the built-in profiles."""

__all__ = [
    "Budgets",
    "CompressionSpec",
    "DeviceProfile",
    "Engine",
    "Hardware",
    "QuantScheme",
    "RuntimeSpec",
    "build_from_table",
    "list_profiles",
    "load_profile",
    "parse_profile",
]


class Engine(StrEnum):
    """The inference engine a device runs models with."""

    ONNXRUNTIME = "onnxruntime"
    TFLITE = "tflite"
    OPENVINO = "openvino"
    """OpenVINO's CPU plugin (an optional device extra); reads the same ONNX artifacts as ONNX Runtime."""


class QuantDtype(StrEnum):
    """8-bit integer types the hardware's kernels are fast at."""

    INT8 = "int8"
    UINT8 = "uint8"


@dataclass(frozen=True)
class Hardware:
    """What the device is made of."""

    arch: str
    """CPU architecture as `uname -m` prints it (x86_64, aarch64, armv7l)."""
    cpu: str
    """Human-readable CPU name."""
    cpu_features: tuple[str, ...]
    """Instruction-set extensions that matter for kernels (avx2, avx512_vnni, neon, dotprod)."""
    cores: int
    ram_mb: int
    storage_mb: int
    accelerators: tuple[str, ...] = ()
    """Non-CPU compute (cuda, tensorrt, npu); empty for CPU-only devices."""


@dataclass(frozen=True)
class RuntimeSpec:
    """How the device runs models."""

    engine: Engine
    """The preferred engine: the first of `engines` (a profile gives `engine`, `engines` or both)."""
    execution_providers: tuple[str, ...]
    """ONNX Runtime execution providers in priority order (ignored by TFLite and OpenVINO)."""
    intra_op_threads: int
    """Threads one inference may use; 0 lets the runtime decide."""
    engines: tuple[Engine, ...] = ()
    """Every engine the device may run, in order of preference; the device accepts a bundle for any
    of them, and the compressor may measure each. Defaults to `(engine,)`."""


@dataclass(frozen=True)
class QuantScheme:
    """The int8 scheme the device's kernels are fast and exact at."""

    activation_type: QuantDtype
    weight_type: QuantDtype
    per_channel: bool
    reduce_range: bool
    """7-bit weights: needed for U8S8 on x86 without VNNI, where VPMADDUBSW can saturate."""

    @property
    def name(self) -> str:
        """Short name such as S8S8 or U8S8 (activation, weight)."""
        letter = {QuantDtype.INT8: "S8", QuantDtype.UINT8: "U8"}
        return letter[self.activation_type] + letter[self.weight_type]


@dataclass(frozen=True)
class Budgets:
    """Limits a compressed model must meet on this device, or be refused."""

    max_model_bytes: int
    latency_target_ms: float
    """Median single-inference latency the model should reach on the device."""
    max_accuracy_drop_pp: float
    """Largest accepted drop in accuracy (or top-1 agreement), in percentage points."""
    min_output_cosine: float
    """Smallest accepted cosine similarity to the original model's outputs that are not class scores
    (maps, embeddings); class scores are judged by `max_accuracy_drop_pp`."""


@dataclass(frozen=True)
class CompressionSpec:
    """Which passes compress models for this device, and which candidates a recipe search tries."""

    recipe: tuple[str, ...] = ()
    """Passes in order; empty: prepare + int8 (ONNX Runtime) or prepare + tflite (TFLite)."""
    search: bool = False
    """Try candidate recipes (distillation widths, pruning) and keep the smallest within budget."""
    distill_widths: tuple[float, ...] = (0.5, 0.25)
    """Student widths (share of the teacher's channels) the search distills into."""
    prune_ratios: tuple[float, ...] = (0.5,)
    """Share of channels structured pruning removes from a distilled student."""
    sparsities: tuple[float, ...] = (0.5,)
    """Unstructured magnitude-pruning sparsities tried on the original weights."""
    distill_epochs: int = 30


@dataclass(frozen=True)
class DeviceProfile:
    """One target device: hardware, runtime, int8 scheme, budgets and compression recipe."""

    name: str
    description: str
    hardware: Hardware
    runtime: RuntimeSpec
    quantization: QuantScheme
    budgets: Budgets
    compression: CompressionSpec = dataclasses.field(default_factory=CompressionSpec)
    source: str = ""
    """The file the profile was read from."""

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain JSON-ready data."""
        data = dataclasses.asdict(self)
        data.pop("source")
        return data


def _convert(
    value: Any, annotation: Any, source: str, key: str, error: type[EdgeError] = ProfileError
) -> Any:
    """Check one TOML value against a field type and convert it."""
    where = f"{source}: {key}"
    origin = typing.get_origin(annotation)
    if origin is tuple:
        item_type = typing.get_args(annotation)[0]
        if item_type is str and (not isinstance(value, list) or not all(isinstance(i, str) for i in value)):
            raise error(f"{where} must be a list of strings, got {value!r}")
        if not isinstance(value, list):
            raise error(f"{where} must be a list, got {value!r}")
        return tuple(
            _convert(item, item_type, source, f"{key}[{index}]", error) for index, item in enumerate(value)
        )
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        try:
            return annotation(value)
        except ValueError:
            allowed = ", ".join(member.value for member in annotation)
            raise error(f"{where} must be one of {allowed}, got {value!r}") from None
    if annotation is bool:
        if not isinstance(value, bool):
            raise error(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise error(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise error(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise error(f"{where} must be a table, got {value!r}")
        return _build(annotation, value, source, f"{key}.", error)
    raise TypeError(f"unsupported profile field type {annotation!r}")  # a bug in this module


def _build(
    cls: type, table: dict[str, Any], source: str, prefix: str = "", error: type[EdgeError] = ProfileError
) -> Any:
    """Build the frozen dataclass `cls` from a TOML table, naming any unknown or missing key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        allowed = ", ".join(fields)
        raise error(f"{source}: unknown key '{prefix}{unknown[0]}' (allowed here: {allowed})")
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in table:
            if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING:
                continue
            raise error(f"{source}: missing key '{prefix}{name}'")
        values[name] = _convert(table[name], hints[name], source, f"{prefix}{name}", error)
    return cls(**values)


def build_from_table(
    cls: type, table: dict[str, Any], source: str, *, error: type[EdgeError] = ProfileError
) -> Any:
    """Build the frozen dataclass `cls` from a parsed TOML table; bad or unknown keys raise `error`."""
    return _build(cls, table, source, "", error)


def parse_profile(text: str, source: str) -> DeviceProfile:
    """Parse and validate a profile from TOML text; `source` names it in errors."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source}: not valid TOML: {exc}") from exc
    _default_engine(table, source)
    profile = _build(DeviceProfile, table, source)
    profile = dataclasses.replace(profile, runtime=_engines_in_order(profile.runtime, source))
    _check_consistency(profile, source)
    return dataclasses.replace(profile, source=source)


def _default_engine(table: dict[str, Any], source: str) -> None:
    """A runtime table that lists `engines` but no `engine` prefers the first one listed."""
    runtime = table.get("runtime")
    if not isinstance(runtime, dict) or "engine" in runtime or "engines" not in runtime:
        return
    engines = runtime["engines"]
    if not isinstance(engines, list) or not engines:
        raise ProfileError(f"{source}: runtime.engines must be a non-empty list of engines, got {engines!r}")
    runtime["engine"] = engines[0]


def _engines_in_order(runtime: RuntimeSpec, source: str) -> RuntimeSpec:
    """`engines` filled in from `engine` when absent; refused when it repeats one or disagrees."""
    if not runtime.engines:
        return dataclasses.replace(runtime, engines=(runtime.engine,))
    if len(set(runtime.engines)) != len(runtime.engines):
        raise ProfileError(
            f"{source}: runtime.engines names an engine twice: {list(map(str, runtime.engines))}"
        )
    if runtime.engines[0] is not runtime.engine:
        raise ProfileError(
            f"{source}: runtime.engine '{runtime.engine}' must be the first of runtime.engines "
            f"({', '.join(runtime.engines)}), the engine the device prefers"
        )
    return runtime


def _check_consistency(profile: DeviceProfile, source: str) -> None:
    """Reject values that are well-typed but meaningless together."""
    budgets = profile.budgets
    if budgets.max_model_bytes <= 0:
        raise ProfileError(f"{source}: budgets.max_model_bytes must be positive")
    if not 0.0 <= budgets.min_output_cosine <= 1.0:
        raise ProfileError(f"{source}: budgets.min_output_cosine must be between 0 and 1")
    if budgets.max_accuracy_drop_pp < 0:
        raise ProfileError(f"{source}: budgets.max_accuracy_drop_pp must not be negative")
    if profile.runtime.intra_op_threads < 0:
        raise ProfileError(f"{source}: runtime.intra_op_threads must be 0 or more")
    if Engine.ONNXRUNTIME in profile.runtime.engines and not profile.runtime.execution_providers:
        raise ProfileError(f"{source}: runtime.execution_providers must name at least one provider")


def _builtin_profiles() -> dict[str, Traversable]:
    """Name -> resource of every profile that ships inside the package (wheel or checkout alike)."""
    folder = importlib.resources.files(__package__) / BUILTIN_FOLDER
    return {item.name[: -len(".toml")]: item for item in folder.iterdir() if item.name.endswith(".toml")}


def list_profiles() -> list[DeviceProfile]:
    """Every built-in profile, sorted by name."""
    return [load_profile(name) for name in sorted(_builtin_profiles())]


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a built-in profile by name, or a user's profile from a .toml path."""
    if str(name_or_path).endswith(".toml"):
        path = Path(name_or_path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProfileError(f"cannot read profile {path}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ProfileError(f"profile {path} is not UTF-8 text: {exc}") from exc
        return parse_profile(text, str(path))
    builtin = _builtin_profiles()
    resource = builtin.get(str(name_or_path))
    if resource is None:
        known = ", ".join(sorted(builtin))
        raise ProfileError(f"unknown device profile '{name_or_path}' (built-in: {known})")
    return parse_profile(resource.read_text(encoding="utf-8"), f"{BUILTIN_FOLDER}/{resource.name}")
