"""Property tests over the daemon's settings and the device-profile TOML (issue 10, item 13): random
text, and random documents whose tables use the real keys with values of any TOML type. Each parse
returns settings/a profile whose every field has its declared type (floats finite), or raises the
loader's own error (UsageError / ProfileError), never another exception."""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
import typing
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.config.profiles import DeviceProfile, load_profile, parse_profile
from edge_runtime.config.settings import Settings, load_settings, parse_settings
from edge_runtime.core.errors import EdgeError, ProfileError, UsageError
from tests.fuzzing import corrupt, outcome, tables, toml_document, toml_edge_values, tweak

TOML_SETTINGS = settings(max_examples=200, deadline=timedelta(seconds=2))


def key_tree(cls: type) -> dict[str, Any]:
    """The dataclass's keys as a tree: None for a value, a nested dict for a table."""
    hints = typing.get_type_hints(cls)
    tree: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name == "source":
            continue
        hint = hints[field.name]
        tree[field.name] = key_tree(hint) if dataclasses.is_dataclass(hint) else None
    return tree


def check_typed(value: Any, cls: type, where: str = "") -> None:
    """Every field of the frozen dataclass `value` holds its declared type; floats are finite."""
    assert isinstance(value, cls), where
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        item, hint = getattr(value, field.name), hints[field.name]
        _check_value(item, hint, f"{where}{field.name}")


def _check_value(item: Any, hint: Any, where: str) -> None:
    if typing.get_origin(hint) is tuple:
        assert isinstance(item, tuple), where
        for index, element in enumerate(item):
            _check_value(element, typing.get_args(hint)[0], f"{where}[{index}]")
    elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
        check_typed(item, hint, f"{where}.")
    elif isinstance(hint, type) and issubclass(hint, StrEnum):
        assert isinstance(item, hint), where
    elif hint is float:
        assert isinstance(item, float) and math.isfinite(item), f"{where} = {item!r}"
    elif hint is int:
        assert isinstance(item, int) and not isinstance(item, bool), f"{where} = {item!r}"
    elif hint in (str, bool):
        assert isinstance(item, hint), f"{where} = {item!r}"


SETTINGS_KEYS = key_tree(Settings)
SETTINGS_KEYS["streams"] = None  # an array of tables: drawn as lists of inline tables below


VALID_SETTINGS: dict[str, Any] = {
    "device_id": "dev1",
    "profile": "x86-vnni-gateway",
    "store": "store",
    "public_key": "key.pub",
    "max_request_bytes": 1024,
    "strict_readiness": True,
    "http": {"enabled": True, "host": "127.0.0.1", "port": 8000},
    "mqtt": {"enabled": True, "host": "127.0.0.1", "port": 1883, "protocol": "5", "fallback": True,
             "keepalive": 30, "client_id": "", "username": "", "password": "", "workers": 2,
             "queue_size": 16, "reconnect_min_s": 0.5, "reconnect_max_s": 30.0},
    "telemetry": {"interval_s": 30.0},
    "outbox": {"path": "outbox.sqlite", "max_records": 100},
    "streams": [{"topic": "in/{device}/x", "model": "m", "output_topic": "out/x", "decode": "raw",
                 "input": "x", "dtype": "float32", "shape": [-1, 4], "qos": 1, "durable": False}],
}  # fmt: skip


@st.composite
def _settings_tables(draw: st.DrawFn) -> dict[str, Any]:
    """Settings documents: a complete valid one with a few values replaced by any TOML value (or
    removed), or tables with the real keys and random values."""
    kind = draw(st.integers(0, 5))
    if kind <= 3:
        return tweak(VALID_SETTINGS, draw, at_most=2)
    if kind == 4:
        return corrupt(VALID_SETTINGS, draw, at_most=3, values=toml_edge_values)
    return draw(tables(SETTINGS_KEYS))


def test_the_valid_settings_document_parses() -> None:
    check_typed(parse_settings(toml_document(VALID_SETTINGS), "fuzz.toml", Path("/base")), Settings)


@TOML_SETTINGS
@given(table=_settings_tables())
def test_settings_documents(table: dict[str, Any]) -> None:
    text = toml_document(table)
    result = outcome(lambda: parse_settings(text, "fuzz.toml", Path("/nonexistent/base")))
    if isinstance(result, EdgeError):
        assert isinstance(result, UsageError), repr(result)
        assert str(result).startswith("fuzz.toml"), str(result)
    else:
        check_typed(result, Settings)


@TOML_SETTINGS
@given(text=st.text(max_size=200))
def test_settings_random_text(text: str) -> None:
    result = outcome(lambda: parse_settings(text, "fuzz.toml", Path("/nonexistent/base")))
    assert isinstance(result, UsageError | Settings), repr(result)


BUILTIN = load_profile("x86-vnni-gateway")


def _plain_builtin() -> dict[str, Any]:
    """The built-in x86 profile as plain TOML-ready data."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value.value if isinstance(value, StrEnum) else value

    real = dataclasses.asdict(BUILTIN)
    real.pop("source")
    return plain(real)


def _profile_tables() -> st.SearchStrategy[dict[str, Any]]:
    """Profile documents: the real profile with a few values tweaked, or random tables merged in."""
    start = _plain_builtin()

    @st.composite
    def corrupted(draw: st.DrawFn) -> dict[str, Any]:
        if draw(st.integers(0, 3)):
            return tweak(start, draw, at_most=2)
        return corrupt(start, draw, at_most=3, values=toml_edge_values)

    return corrupted() | st.builds(lambda random: _merge(start, random), tables(key_tree(DeviceProfile)))


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied one level deep into tables."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


@TOML_SETTINGS
@given(table=_profile_tables())
def test_profile_documents(table: dict[str, Any]) -> None:
    text = toml_document(table)
    result = outcome(lambda: parse_profile(text, "fuzz.toml"))
    if isinstance(result, EdgeError):
        assert isinstance(result, ProfileError), repr(result)
        assert str(result).startswith("fuzz.toml"), str(result)
    else:
        check_typed(result, DeviceProfile)


@TOML_SETTINGS
@given(text=st.text(max_size=200))
def test_profile_random_text(text: str) -> None:
    result = outcome(lambda: parse_profile(text, "fuzz.toml"))
    assert isinstance(result, ProfileError | DeviceProfile), repr(result)


@settings(max_examples=100, deadline=timedelta(seconds=2))
@given(raw=st.binary(max_size=100))
def test_settings_and_profile_files_of_random_bytes(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "fuzz.toml")
        path.write_bytes(raw)
        assert isinstance(outcome(lambda: load_settings(path)), UsageError | Settings)
        assert isinstance(outcome(lambda: load_profile(path)), ProfileError | DeviceProfile)


SETTINGS_BASE = 'device_id = "d"\nprofile = "x86-vnni-gateway"\nstore = "s"\npublic_key = "k.pub"\n'
STREAM = '[[streams]]\ntopic = "in/x"\nmodel = "m"\noutput_topic = "out/x"\n'


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[telemetry]\ninterval_s = nan", "telemetry.interval_s must be a finite number, got nan"),
        ("[telemetry]\ninterval_s = inf", "telemetry.interval_s must be a finite number, got inf"),
        ("[mqtt]\nreconnect_min_s = inf", "mqtt.reconnect_min_s must be a finite number"),
        ("[mqtt]\nreconnect_max_s = 0.1", "mqtt.reconnect_max_s (0.1) is below mqtt.reconnect_min_s (0.5)"),
        ("[mqtt]\nkeepalive = 70000", "mqtt.keepalive must be at most 65535 s"),
        (STREAM + 'dtype = "U3"', "dtype 'U3' is not a numeric numpy dtype"),
        (STREAM + 'dtype = "M8"', "dtype 'M8' is not a numeric numpy dtype"),
        (STREAM + 'dtype = "object"', "dtype 'object' is not a numeric numpy dtype"),
        (STREAM + "shape = [-1, -1]", "shape [-1, -1] may hold sizes >= 0 and at most one -1"),
        (STREAM + "shape = [-2]", "shape [-2] may hold sizes >= 0 and at most one -1"),
    ],
)
def test_settings_found_by_fuzzing_are_refused_with_the_key(extra: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_settings(SETTINGS_BASE + extra, "fuzz.toml", Path("/base"))


def test_profile_with_a_non_finite_budget_is_refused() -> None:
    text = toml_document(
        {**_plain_builtin(), "budgets": {**_plain_builtin()["budgets"], "latency_target_ms": math.nan}}
    )
    with pytest.raises(ProfileError, match=r"budgets\.latency_target_ms must be a finite number, got nan"):
        parse_profile(text, "fuzz.toml")


def test_settings_file_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_bytes(b'device_id = "\xff"\n')
    with pytest.raises(UsageError, match="are not UTF-8 text"):
        load_settings(path)
