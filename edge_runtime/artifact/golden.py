"""Golden self-test data: inputs with the outputs the reference run produced, stored as .npz."""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from edge_runtime.core.errors import BundleError

__all__ = ["MAX_GOLDEN_CASES", "GoldenCase", "pack_golden", "unpack_golden"]

MAX_GOLDEN_CASES = 1024
"""More cases than this in one golden.npz is refused (the self-test runs them all at load)."""
_KEY = re.compile(r"(in|out)/([0-9]{1,4})/(.{1,256})", re.DOTALL)


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
    """Inverse of pack_golden; BundleError for anything that is not golden data."""
    try:
        archive = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise BundleError(f"golden data is not a readable .npz: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise BundleError("golden data is a single array, not an .npz archive")
    cases: dict[int, GoldenCase] = {}
    try:
        with archive:
            for key in archive.files:
                match = _KEY.fullmatch(key)
                if match is None:
                    raise BundleError(f"golden data holds an unexpected array '{key[:64]}'")
                kind, index, name = match.group(1), int(match.group(2)), match.group(3)
                if index >= MAX_GOLDEN_CASES:
                    raise BundleError(f"golden data has a case {index}; at most {MAX_GOLDEN_CASES} are read")
                case = cases.setdefault(index, GoldenCase({}, {}))
                (case.inputs if kind == "in" else case.outputs)[name] = archive[key]
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise BundleError(f"golden data is not a readable .npz: {exc}") from exc
    return [cases[index] for index in sorted(cases)]
