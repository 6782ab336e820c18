"""Golden self-test data: inputs with the outputs the reference run produced, stored as .npz."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from edge_runtime.core.errors import BundleError

__all__ = ["GoldenCase", "pack_golden", "unpack_golden"]


@dataclass(frozen=True)
class GoldenCase:
    """One self-test case: inputs and the outputs the reference run produced."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def pack_golden(cases: list[GoldenCase]) -> bytes:
    """Serialize golden cases into .npz bytes (keys ``in/<i>/<name>`` and ``out/<i>/<name>``)."""
    arrays: dict[str, np.ndarray] = {}
    for index, case in enumerate(cases):
        arrays.update({f"in/{index}/{name}": value for name, value in case.inputs.items()})
        arrays.update({f"out/{index}/{name}": value for name, value in case.outputs.items()})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()


def unpack_golden(raw: bytes) -> list[GoldenCase]:
    """Inverse of pack_golden."""
    try:
        archive = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise BundleError(f"golden data is not a readable .npz: {exc}") from exc
    cases: dict[int, GoldenCase] = {}
    for key in archive.files:
        kind, index, name = key.split("/", 2)
        case = cases.setdefault(int(index), GoldenCase({}, {}))
        (case.inputs if kind == "in" else case.outputs)[name] = archive[key]
    return [cases[index] for index in sorted(cases)]
