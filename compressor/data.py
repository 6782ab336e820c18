"""Calibration and validation data: .npz / .npy files or a folder of them, checked against the model."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.core.errors import DataError
from edge_runtime.core.types import TensorSpec

__all__ = [
    "LABELS_KEY",
    "MIN_REPORT_SAMPLES",
    "Dataset",
    "check_samples",
    "load_dataset",
    "split",
    "split_selection",
]

LABELS_KEY = "labels"
"""An .npz array under this name (when no model input has it) holds class ids, one per sample."""

MIN_REPORT_SAMPLES = 30
"""Below this many report samples the report warns that its shares move by several points per sample."""

Feed = dict[str, np.ndarray]
SAFE_CASTS = {("float64", "float32"), ("float16", "float32"), ("int32", "int64"), ("int64", "int32")}


@dataclass(frozen=True)
class Dataset:
    """Samples (one feed each) and optional labels, as read from the user's files."""

    samples: list[Feed]
    labels: np.ndarray | None
    notes: tuple[str, ...] = ()


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
        if not files:
            raise DataError(f"{path}: the folder holds no .npz or .npy files")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix not in (".npz", ".npy"):
        raise DataError(f"{path}: expected an .npz or .npy file (or a folder of them)")
    return [path]


def _read(path: Path, inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Arrays of one file by name; an .npy belongs to the model's only input."""
    try:
        if path.suffix == ".npy":
            if len(inputs) != 1:
                names = ", ".join(spec.name for spec in inputs)
                raise DataError(
                    f"{path}: an .npy file fits single-input models; this one takes {names} (use .npz)"
                )
            return {inputs[0].name: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read arrays: {exc}") from exc


_BATCH_NAMES = ("batch", "batch_size", "n", "b", "bs")


def batch_axes(inputs: Sequence[TensorSpec]) -> dict[str, int | None]:
    """Each input's batch axis: where the symbolic dimension most inputs share sits (a name like
    "batch" wins a tie); the leading axis of an input without it; None for a scalar."""
    names = Counter(dim for spec in inputs for dim in set(spec.shape) if isinstance(dim, str) and dim != "?")
    ranked = sorted(names.items(), key=lambda item: (-item[1], item[0].lower() not in _BATCH_NAMES))
    batch = ranked[0][0] if ranked else None
    return {
        spec.name: (spec.shape.index(batch) if batch in spec.shape else (0 if spec.shape else None))
        for spec in inputs
    }


def _split_samples(
    name: str, array: np.ndarray, spec: TensorSpec, axis: int | None, source: Path
) -> list[np.ndarray]:
    """One array per sample. Rank == model rank: a batch, split along the input's batch axis into
    batch-1 samples; rank + 1: a stack of whole feeds; a scalar input: one value or a list of them."""
    rank = len(spec.shape)
    if rank == 0 or axis is None:
        return [array] if array.ndim == rank else list(array)
    if array.ndim == rank:
        return [np.take(array, [i], axis=axis) for i in range(array.shape[axis])]
    if array.ndim == rank + 1:
        return list(array)
    raise DataError(
        f"{source}: '{name}' has shape {list(array.shape)}; the model input has rank {rank} "
        f"({list(spec.shape)}), so give [samples, ...] with rank {rank} or {rank + 1}"
    )


def _shared_once(spec: TensorSpec) -> bool:
    """Whether an input may be given once for every sample: it has no free (batch) dimension."""
    return not any(isinstance(dim, str) for dim in spec.shape)


def _file_samples(
    file: Path, arrays: dict[str, np.ndarray], by_name: Mapping[str, TensorSpec], notes: list[str]
) -> list[Feed]:
    """The samples of one file, with inputs given once shared by every sample."""
    axes = batch_axes(list(by_name.values()))
    per_input = {
        name: _split_samples(name, arrays[name], spec, axes[name], file) for name, spec in by_name.items()
    }
    count = max(len(values) for values in per_input.values())
    for name, values in per_input.items():
        if len(values) == 1 and count > 1 and _shared_once(by_name[name]):
            per_input[name] = values * count
            note = f"'{name}' given once: shared by all {count} samples"
            if note not in notes:
                notes.append(note)
    counts = {name: len(values) for name, values in per_input.items()}
    if len(set(counts.values())) != 1:
        detail = ", ".join(f"'{name}' {n}" for name, n in counts.items())
        where = ", ".join(f"'{name}' axis {axes[name]}" for name in by_name if axes[name] is not None)
        raise DataError(
            f"{file}: inputs hold different numbers of samples ({detail}; split along {where}); give each "
            "input the same batch, or a single value for an input without a batch dimension"
        )
    return [{name: per_input[name][i] for name in by_name} for i in range(count)]


def load_dataset(path: Path, inputs: Sequence[TensorSpec], labels_path: Path | None = None) -> Dataset:
    """Read samples for a model with `inputs` from `path` (file or folder), plus optional labels."""
    by_name = {spec.name: spec for spec in inputs}
    samples: list[Feed] = []
    labels: list[np.ndarray] = []
    notes: list[str] = []
    for file in _files(Path(path)):
        arrays = _read(file, inputs)
        if LABELS_KEY in arrays and LABELS_KEY not in by_name:
            labels.append(np.asarray(arrays.pop(LABELS_KEY)).ravel())
        unknown = sorted(set(arrays) - set(by_name))
        if unknown:
            raise DataError(
                f"{file}: '{unknown[0]}' is not an input of the model (inputs: {', '.join(by_name)})"
            )
        missing = sorted(set(by_name) - set(arrays))
        if missing:
            raise DataError(f"{file}: no data for model input '{missing[0]}'")
        samples.extend(_file_samples(file, arrays, by_name, notes))
    if labels_path is not None:
        labels = [
            np.asarray(
                _read(Path(labels_path), [TensorSpec(LABELS_KEY, "int64", ("N",))])[LABELS_KEY]
            ).ravel()
        ]
    notes += check_samples(samples, inputs, str(path))
    merged = np.concatenate(labels) if labels else None
    if merged is not None and len(merged) != len(samples):
        raise DataError(f"{len(merged)} labels for {len(samples)} samples: give one label per sample")
    return Dataset(samples=samples, labels=merged, notes=tuple(notes))


def carry_states(
    samples: Sequence[Feed], run: Callable[[Feed], Mapping[str, np.ndarray]], pairs: Mapping[str, str]
) -> list[Feed]:
    """Samples of a stateful model in stream order, each state input (key of `pairs`) replaced by the
    state output (value) the model produced for the sample before: the states it meets in use."""
    carried: list[Feed] = []
    previous: Mapping[str, np.ndarray] | None = None
    for feed in samples:
        feed = dict(feed)
        if previous is not None:
            for state_input, state_output in pairs.items():
                if previous[state_output].shape != feed[state_input].shape:
                    raise DataError(
                        f"state output '{state_output}' has shape {list(previous[state_output].shape)}, "
                        f"input '{state_input}' takes {list(feed[state_input].shape)}"
                    )
                feed[state_input] = previous[state_output].astype(feed[state_input].dtype)
        previous = run(feed)
        carried.append(feed)
    return carried


def check_samples(samples: list[Feed], inputs: Sequence[TensorSpec], source: str) -> list[str]:
    """Check (and where safe, cast in place) every sample against the model inputs; returns notes."""
    if not samples:
        raise DataError(f"{source}: no samples")
    notes: list[str] = []
    for index, feed in enumerate(samples):
        for spec in inputs:
            value = feed[spec.name]
            if value.dtype.name != spec.dtype:
                if (value.dtype.name, spec.dtype) not in SAFE_CASTS:
                    raise DataError(
                        f"{source}: sample {index} input '{spec.name}' is {value.dtype.name}, the model takes {spec.dtype}"
                    )
                feed[spec.name] = value = value.astype(spec.dtype)
                note = f"'{spec.name}' cast to {spec.dtype}"
                if note not in notes:
                    notes.append(note)
            if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                bad = int(value.size - np.count_nonzero(np.isfinite(value)))
                raise DataError(
                    f"{source}: sample {index} input '{spec.name}' holds {bad} NaN or infinite "
                    f"value(s); calibration and validation data must be finite"
                )
            if len(spec.shape) != value.ndim or any(
                isinstance(want, int) and want > 0 and want != got
                for want, got in zip(spec.shape, value.shape, strict=True)
            ):
                raise DataError(
                    f"{source}: sample {index} input '{spec.name}' has shape {list(value.shape)}, "
                    f"the model takes {list(spec.shape)}"
                )
    return notes


def split(dataset: Dataset, held_out: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split into calibration and held-out validation parts (labels follow their samples)."""
    count = len(dataset.samples)
    if count < 2:
        raise DataError("need at least 2 samples: some calibrate, some are held out to measure fidelity")
    order = np.random.default_rng(seed).permutation(count)
    n_val = min(max(1, round(count * held_out)), count - 1)
    val_idx, cal_idx = sorted(order[:n_val]), sorted(order[n_val:])
    labels = dataset.labels
    calibration = Dataset([dataset.samples[i] for i in cal_idx], None if labels is None else labels[cal_idx])
    validation = Dataset([dataset.samples[i] for i in val_idx], None if labels is None else labels[val_idx])
    return calibration, validation


def split_selection(
    samples: Sequence[Feed], labels: np.ndarray | None, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Split held-out data into a selection half (every measured choice) and a report half (only the
    final numbers); with fewer than 4 samples both are the same samples, and the report says so."""
    if len(samples) < 4:
        note = (
            f"only {len(samples)} held-out samples: the report is measured on the samples that drove "
            "the choices (give at least 4, better 60+)"
        )
        same = Dataset(list(samples), labels, (note,))
        return same, same
    return split(Dataset(list(samples), labels), held_out=0.5, seed=seed + 1)
