"""Shared pieces of the property tests over parsers of outside bytes: the outcome check (a valid object
or one of our `EdgeError`s, within a memory bound, nothing written outside the folder given) and the
strategies for JSON, TOML and byte mutations."""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import tracemalloc
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import strategies as st

from edge_runtime.core.errors import EdgeError

T = TypeVar("T")

MEMORY_LIMIT = 64 * 1024 * 1024
"""Peak Python-traced allocation one parse of a small (KB-sized) input may take."""


def outcome(call: Callable[[], T], *, memory_limit: int = MEMORY_LIMIT) -> T | EdgeError:
    """`call()`'s result, or the `EdgeError` it raised; any other exception propagates (a finding), and
    so does an AssertionError when the call's peak traced allocation exceeds `memory_limit`."""
    tracemalloc.start()
    try:
        try:
            result: T | EdgeError = call()
        except EdgeError as exc:
            result = exc
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= memory_limit, f"parsing took {peak / 2**20:.1f} MiB (limit {memory_limit / 2**20:.0f} MiB)"
    return result


def scratch_root(fallback: Path) -> Path:
    """Where per-example files go: /dev/shm when the machine has it (bundle and outbox writes fsync,
    which on a loaded disk makes a few hundred examples take minutes), else `fallback`."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="edge-fuzz-", dir=shm))
    return fallback


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> content): compare before and after a call."""
    found = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = Path(base, name)
            found[str(path.relative_to(folder))] = path.read_bytes() if path.is_file() else b""
    return found


# JSON values as a peer might send them: every JSON type, odd numbers, deep-ish nesting.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)


def mutate(data: bytes, draw: Callable[[st.SearchStrategy[Any]], Any]) -> bytes:
    """`data` with a few bytes flipped, cut short, or with random bytes spliced in."""
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "same"]))
    if not data or kind == "same":
        return data
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "splice":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    mutable = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(data) - 1))
        mutable[index] ^= draw(st.integers(1, 255))
    return bytes(mutable)


# TOML: documents built from tables whose keys are mostly the real ones, then written out as text.
toml_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.text(st.characters(exclude_categories=["Cs"]), max_size=16)  # TOML strings hold no surrogates
    | st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31))
)


toml_values = (
    toml_scalars
    | st.lists(toml_scalars, max_size=3)
    | st.dictionaries(st.text(min_size=1, max_size=6), toml_scalars, max_size=2)
)
"""Any TOML value: a scalar of each type (nan, inf, datetimes included), an array or an inline table."""
toml_edge_values = (
    st.sampled_from(
        [math.nan, math.inf, -math.inf, 0, -1, 0.0, -0.5, 2**63 - 1, -(2**63), "", "x", True, [], {}]
    )
    | toml_values
)
"""TOML values with the edge cases (non-finite, zero, negative, extreme, empty, wrong type) drawn often."""


def toml_value(value: Any) -> str:
    """One TOML value (inline tables and arrays for nesting)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".e") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string (\\uXXXX escapes, no \\/)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def toml_document(table: dict[str, Any]) -> str:
    """A TOML document: top-level scalars first, then one [section] per nested table."""
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for key, value in table.items():
        if isinstance(value, dict):
            lines.append(f"[{json.dumps(key)}]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


def tables(keys: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Tables shaped like `keys` (key -> None for a scalar, or a nested dict of the same form), each key
    present or not, each value right-typed-ish or random, plus now and then an unknown key."""
    entries: dict[str, st.SearchStrategy[Any]] = {}
    for key, nested in keys.items():
        if isinstance(nested, dict):
            entries[key] = tables(nested) | toml_scalars
        else:
            entries[key] = (
                toml_scalars
                | st.lists(toml_scalars, max_size=3)
                | st.lists(
                    st.dictionaries(st.sampled_from(sorted(keys)), toml_scalars, max_size=4), max_size=2
                )
            )
    known = st.fixed_dictionaries({}, optional=entries)
    extra = st.dictionaries(st.text(min_size=1, max_size=6), toml_scalars, max_size=1)
    return st.builds(lambda a, b: {**b, **a}, known, extra)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (keys / indexes) to a value inside a JSON-like tree, the root excluded."""
    found = []
    children = (
        value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    )
    for key, child in children:
        found.append((*prefix, key))
        found += _paths(child, (*prefix, key))
    return found


def corrupt(
    doc: Any,
    draw: Callable[[st.SearchStrategy[Any]], Any],
    *,
    at_most: int = 2,
    values: st.SearchStrategy[Any] | None = None,
) -> Any:
    """A deep copy of `doc` with up to `at_most` values replaced by random ones (JSON by default) or
    keys deleted: mostly-valid input that gets past the first checks and into the deeper ones."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(0, at_most))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values if values is None else values)
    return doc


def _same_type_edge(value: Any) -> st.SearchStrategy[Any]:
    """Edge values of `value`'s own type: what gets past the type check and into the range checks."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.sampled_from([0, -1, 1, 65535, 65536, 2**31, 2**63 - 1, -(2**63)]) | st.integers()
    if isinstance(value, float):
        return st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-300, 1e308]) | st.floats()
    if isinstance(value, str):
        odd = ["", " ", "a/b", "+", "#", "$SYS/x", "\x00", "../../etc", "{device}", "x" * 300]
        return st.sampled_from(odd) | st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
    if isinstance(value, list):
        return st.just([]) | st.just(value * 3)
    return st.just(value)


def tweak(doc: Any, draw: Callable[[st.SearchStrategy[Any]], Any], *, at_most: int = 2) -> Any:
    """A deep copy of `doc` with up to `at_most` leaves set to an edge value of their own type (or,
    now and then, to a value of another type): valid structure, hostile values."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, at_most))):
        leaves = [p for p in _paths(doc) if not isinstance(_at(doc, p), dict)]
        if not leaves:
            break
        path = draw(st.sampled_from(leaves))
        parent = _at(doc, path[:-1])
        old = parent[path[-1]]
        parent[path[-1]] = draw(toml_values if draw(st.integers(0, 4)) == 0 else _same_type_edge(old))
    return doc


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc
