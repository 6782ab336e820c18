"""Property tests over the telemetry outbox as found on disk (issue 10, item 13): rows of any SQLite type
in the records table, and outbox files of mutated or random bytes. Opening the outbox and reading its
records gives well-typed records or one of our `EdgeError`s, and touches no file outside its folder."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from edge_runtime.core.errors import EdgeError
from edge_runtime.state.outbox import Outbox, Record
from tests.fuzzing import mutate, outcome, scratch_root

OUTBOX_SETTINGS = settings(max_examples=120, deadline=timedelta(seconds=2))

sqlite_values = (
    st.none()
    # small ints, and the extremes: `bytes(n)` of a large int would allocate n bytes in this test too
    | st.integers(min_value=-1000, max_value=1000)
    | st.sampled_from([2**63 - 1, -(2**63)])
    | st.floats()
    | st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
    | st.binary(max_size=12)
)
good_rows = st.tuples(
    st.text(min_size=1, max_size=10), st.binary(max_size=16), st.sampled_from([0, 1]), st.booleans()
)


@st.composite
def rows(draw: st.DrawFn) -> tuple[Any, Any, Any, Any]:
    """A (topic, payload, qos, retain) row: mostly well-typed, some columns any SQLite value."""
    row = list(draw(good_rows))
    for column in draw(st.sets(st.integers(0, 3), max_size=2)):
        row[column] = draw(sqlite_values)
    return tuple(row)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for the per-example outbox folders (in RAM when possible: each commit is an fsync)."""
    folder = scratch_root(tmp_path_factory.mktemp("fuzz-outbox"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def template(scratch: Path) -> bytes:
    """The bytes of an outbox file holding three records (checkpointed: no -wal file needed)."""
    path = scratch / "template.sqlite"
    outbox = Outbox(path, max_records=100)
    for index in range(3):
        outbox.put(f"t/{index}", b"payload %d" % index)
    outbox.close()
    return path.read_bytes()


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _open_and_drain(path: Path) -> list[Record] | EdgeError:
    """Open the outbox at `path`, read every record, then close it."""

    def drain() -> list[Record]:
        outbox = Outbox(path, max_records=100)
        try:
            found = outbox.peek(0, 1000)
            outbox.remove([record.seq for record in found])
            return found
        finally:
            outbox.close()

    return outcome(drain)


def _check_records(records: list[Record] | EdgeError) -> None:
    if isinstance(records, EdgeError):
        return
    for record in records:
        assert isinstance(record.seq, int) and isinstance(record.topic, str), record
        assert isinstance(record.payload, bytes) and record.qos in (0, 1, 2), record
        assert isinstance(record.retain, bool), record


@OUTBOX_SETTINGS
@given(table=st.lists(rows(), max_size=6))
def test_outbox_rows_of_any_type(
    scratch: Path, template: bytes, table: list[tuple[Any, Any, Any, Any]]
) -> None:
    folder = Path(tempfile.mkdtemp(dir=scratch))
    try:
        path = folder / "outbox.sqlite"
        path.write_bytes(template)
        try:
            with sqlite3.connect(path) as db:  # rows written by something else than the daemon, or a bad disk
                db.executemany("INSERT INTO records (topic, payload, qos, retain) VALUES (?, ?, ?, ?)", table)
            db.close()
        except sqlite3.IntegrityError:  # NULL in a NOT NULL column: the schema itself refuses it
            reject()
        _check_records(_open_and_drain(path))
        assert all(name.startswith("outbox.sqlite") for name in _listing(folder)), _listing(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@OUTBOX_SETTINGS
@given(data=st.data(), random=st.booleans())
def test_outbox_file_of_mutated_or_random_bytes(
    scratch: Path, template: bytes, data: st.DataObject, random: bool
) -> None:
    folder = Path(tempfile.mkdtemp(dir=scratch))
    try:
        path = folder / "outbox.sqlite"
        path.write_bytes(data.draw(st.binary(max_size=512)) if random else mutate(template, data.draw))
        _check_records(_open_and_drain(path))
        assert all(name.startswith("outbox.sqlite") for name in _listing(folder)), _listing(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
