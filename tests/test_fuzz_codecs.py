"""Property tests over the request codecs (issue 10, item 13): v2 JSON and binary requests (HTTP and
MQTT share the codec), MQTT envelopes, stream payloads and replies. Each call returns a well-formed
object or raises one of our `EdgeError`s, within a memory bound; with and without orjson alike."""

from __future__ import annotations

import json
import math
import struct
from datetime import timedelta
from typing import Any
from unittest import mock

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.codecs import payloads, v2
from edge_runtime.core.datatypes import V2_TO_NUMPY
from edge_runtime.core.errors import EdgeError
from edge_runtime.core.types import InferRequest, InferResponse, StreamDecoding
from tests.fuzzing import corrupt, json_scalars, json_values, mutate, outcome

FAST = settings(max_examples=200, deadline=timedelta(seconds=2))


def _json_libraries() -> list[Any]:
    """The JSON back ends to run every decode with: orjson when installed, and the standard library."""
    return [v2.orjson, None] if v2.orjson is not None else [None]


def _with_json(library: Any, call: Any) -> Any:
    """`call()` with the v2 codec's JSON back end set to `library` (None: standard library)."""
    with mock.patch.object(v2, "orjson", library):
        return outcome(call)


def _check_request(request: InferRequest) -> None:
    """A decoded request holds real arrays with the shapes and dtypes it was declared with."""
    assert isinstance(request, InferRequest) and request.inputs
    for name, array in request.inputs.items():
        assert isinstance(name, str) and isinstance(array, np.ndarray)
        assert array.dtype in V2_TO_NUMPY.values()
    assert request.id is None or isinstance(request.id, str)
    assert request.outputs is None or all(isinstance(o, str) for o in request.outputs)


def _same_outcome(results: list[Any]) -> None:
    """orjson and the standard library: both decode to equal arrays, or both refuse."""
    kinds = {type(r).__name__ if isinstance(r, EdgeError) else "ok" for r in results}
    assert len(kinds) == 1, f"JSON back ends disagree: {results}"
    if kinds == {"ok"} and len(results) == 2:
        first, second = (r.request if isinstance(r, v2.DecodedRequest) else r for r in results)
        assert first.inputs.keys() == second.inputs.keys()
        for name in first.inputs:
            np.testing.assert_array_equal(first.inputs[name], second.inputs[name])


NAMES = st.sampled_from(["x", "y", "input", "pixels"])


def _values(dtype: np.dtype, count: int) -> st.SearchStrategy[list[Any]]:
    """`count` JSON numbers that fit `dtype`."""
    if dtype.kind == "b":
        element: st.SearchStrategy[Any] = st.booleans()
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        element = st.integers(int(info.min), int(info.max))
    else:
        element = st.floats(width=16 if dtype.itemsize == 2 else 32, allow_nan=False, allow_infinity=False)
    return st.lists(element, min_size=count, max_size=count)


@st.composite
def valid_requests(
    draw: st.DrawFn, binary: bool = False
) -> tuple[dict[str, Any], bytes, dict[str, np.ndarray]]:
    """A well-formed v2 request: its JSON document, its binary tail, and the arrays it must decode to."""
    names = draw(st.lists(NAMES, min_size=1, max_size=2, unique=True))
    doc: dict[str, Any] = {"inputs": []}
    tail, expected = b"", {}
    for name in names:
        dtype = V2_TO_NUMPY[draw(st.sampled_from(sorted(V2_TO_NUMPY)))]
        shape = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3))
        values = draw(_values(dtype, math.prod(shape)))
        array = np.array(values, dtype=dtype).reshape(shape)
        entry: dict[str, Any] = {"name": name, "datatype": v2.v2_datatype(dtype), "shape": shape}
        if binary and draw(st.booleans()):
            entry["parameters"] = {"binary_data_size": array.nbytes}
            tail += array.astype(dtype.newbyteorder("<")).tobytes()
        else:
            entry["data"] = values
        doc["inputs"].append(entry)
        expected[name] = array
    if draw(st.booleans()):
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": draw(st.booleans())}} for n in names]
    if draw(st.booleans()):
        doc["parameters"] = {"binary_data_output": draw(st.booleans())}
    if draw(st.booleans()):
        doc["id"] = draw(st.text(max_size=8))
    return doc, tail, expected


def _decode(body: bytes, header_length: int | None) -> Any:
    return v2.decode_request(body, "m", None, header_length=header_length)


@FAST
@given(case=valid_requests())
def test_v2_valid_json_requests_decode_to_their_arrays(case: tuple[dict[str, Any], bytes, dict]) -> None:
    doc, _, expected = case
    body = json.dumps(doc).encode()
    for lib in _json_libraries():
        result = _with_json(lib, lambda: _decode(body, None))
        assert not isinstance(result, EdgeError), result
        assert result.request.inputs.keys() == expected.keys()
        for name, array in expected.items():
            np.testing.assert_array_equal(result.request.inputs[name], array)
            assert result.request.inputs[name].dtype == array.dtype


@FAST
@given(case=valid_requests(), data=st.data())
def test_v2_corrupted_json_requests(case: tuple[dict[str, Any], bytes, dict], data: st.DataObject) -> None:
    body = json.dumps(corrupt(case[0], data.draw)).encode()
    results = [_with_json(lib, lambda: _decode(body, None)) for lib in _json_libraries()]
    for result in results:
        if not isinstance(result, EdgeError):
            _check_request(result.request)
    _same_outcome(results)


@FAST
@given(body=st.binary(max_size=256) | st.text(max_size=64).map(str.encode))
def test_v2_random_bytes(body: bytes) -> None:
    for lib in _json_libraries():
        result = _with_json(lib, lambda: _decode(body, None))
        assert isinstance(result, EdgeError) or isinstance(result.request, InferRequest)


@FAST
@given(case=valid_requests(), data=st.data())
def test_v2_mutated_json_bytes(case: tuple[dict[str, Any], bytes, dict], data: st.DataObject) -> None:
    body = mutate(json.dumps(case[0]).encode(), data.draw)
    for lib in _json_libraries():
        result = _with_json(lib, lambda: _decode(body, None))
        if not isinstance(result, EdgeError):
            _check_request(result.request)


@FAST
@given(case=valid_requests(binary=True), data=st.data())
def test_v2_binary_requests_with_and_without_header_length(
    case: tuple[dict[str, Any], bytes, dict], data: st.DataObject
) -> None:
    doc, tail, expected = case
    corrupted = corrupt(doc, data.draw, at_most=1)
    header = json.dumps(corrupted).encode()
    body = header + tail
    if data.draw(st.booleans()):
        body = mutate(body, data.draw)
    length = data.draw(
        st.sampled_from([len(header), None, 0, len(body), len(body) + 1, -1]) | st.integers(-5, len(body) + 5)
    )
    for lib in _json_libraries():
        result = _with_json(lib, lambda: _decode(body, length))
        if isinstance(result, EdgeError):
            continue
        _check_request(result.request)
        if corrupted == doc and body == header + tail and length == len(header):
            for name, array in expected.items():
                np.testing.assert_array_equal(result.request.inputs[name], array)


envelope_docs = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, "1"]) | json_scalars,
        "id": json_values,
        "reply_to": st.sampled_from(["a/b", "a/+/b", "#", "$SYS/x", "edge/other/x", "", "a\x00b"])
        | json_values,
        "model_version": json_values,
        "inputs": valid_requests().map(lambda case: case[0]["inputs"]) | json_values,
    },
)


@FAST
@given(doc=envelope_docs, data=st.data())
def test_mqtt_envelopes_and_their_requests(doc: dict[str, Any], data: st.DataObject) -> None:
    raw = mutate(json.dumps(doc).encode(), data.draw)
    for lib in _json_libraries():
        envelope = _with_json(lib, lambda: payloads.read_envelope(raw, max_bytes=4096))
        if isinstance(envelope, EdgeError):
            continue
        assert all(
            x is None or isinstance(x, str) for x in (envelope.id, envelope.reply_to, envelope.model_version)
        )
        request = _with_json(lib, lambda envelope=envelope: envelope.request("m"))
        if not isinstance(request, EdgeError):
            _check_request(request)


@FAST
@given(raw=st.binary(max_size=200), max_bytes=st.integers(0, 300))
def test_mqtt_envelope_random_bytes(raw: bytes, max_bytes: int) -> None:
    for lib in _json_libraries():
        result = _with_json(lib, lambda: payloads.read_envelope(raw, max_bytes=max_bytes))
        assert isinstance(result, EdgeError | payloads.Envelope)
        if len(raw) > max_bytes:
            assert isinstance(result, EdgeError)


stream_payloads = (
    st.binary(max_size=128)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.lists(st.floats(width=32) | st.integers(-(2**70), 2**70), max_size=16).map(
        lambda v: json.dumps(v).encode()
    )
    | st.lists(st.floats(width=32, allow_nan=False), max_size=16).map(
        lambda v: struct.pack(f"<{len(v)}f", *v)
    )
    | valid_requests().map(lambda case: json.dumps(case[0]).encode())
)


@FAST
@given(
    raw=stream_payloads,
    decoding=st.sampled_from(list(StreamDecoding)),
    dtype=st.sampled_from(["float32", "float16", "int8", "uint8", "int64", "bool", "float64"]),
    shape=st.lists(st.integers(-1, 8), max_size=3).map(tuple),
)
def test_stream_payloads(raw: bytes, decoding: StreamDecoding, dtype: str, shape: tuple[int, ...]) -> None:
    def decode() -> InferRequest:
        return payloads.decode_stream(
            raw, model="m", decoding=decoding, input_name="x", dtype=dtype, shape=shape, max_bytes=4096
        )

    for lib in _json_libraries():
        result = _with_json(lib, decode)
        if not isinstance(result, EdgeError):
            _check_request(result)


reply_docs = st.fixed_dictionaries(
    {},
    optional={
        "v": st.just(1) | json_scalars,
        "id": json_values,
        "error": json_values,
        "status": st.sampled_from([400, 404, 413, 500, 503]) | json_scalars,
        "model_name": json_values,
        "outputs": valid_requests().map(lambda case: case[0]["inputs"]) | json_values,
    },
)


@FAST
@given(doc=reply_docs, data=st.data())
def test_mqtt_replies(doc: dict[str, Any], data: st.DataObject) -> None:
    raw = mutate(json.dumps(doc).encode(), data.draw)
    for lib in _json_libraries():
        result = _with_json(lib, lambda: payloads.decode_reply(raw))
        assert isinstance(result, EdgeError | InferResponse), result
        if isinstance(result, InferResponse):
            assert all(isinstance(a, np.ndarray) for a in result.outputs.values())


@FAST
@given(values=st.lists(st.floats(width=32), min_size=1, max_size=6))
def test_v2_non_finite_numbers_get_one_answer_with_and_without_orjson(values: list[float]) -> None:
    """NaN / Infinity are not JSON; the standard library reads them, orjson does not: one behaviour."""
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(values)], "data": values}]}
    body = json.dumps(doc).encode()  # writes NaN / Infinity / -Infinity literals for non-finite floats
    results = [_with_json(lib, lambda: _decode(body, None)) for lib in _json_libraries()]
    _same_outcome(results)


@FAST
@given(case=valid_requests(), where=st.sampled_from(["request", "outputs", "inputs"]), value=json_values)
def test_v2_parameters_of_any_type(case: tuple[dict[str, Any], bytes, dict], where: str, value: Any) -> None:
    """`parameters` (of the request, of an output, of an input) holding any JSON value: 400, never 500."""
    doc = json.loads(json.dumps(case[0]))
    if where == "request":
        doc["parameters"] = value
    elif where == "outputs":
        doc["outputs"] = [{"name": name, "parameters": value} for name in case[2]]
    else:
        doc["inputs"][0]["parameters"] = value
    body = json.dumps(doc).encode()
    results = [_with_json(lib, lambda: _decode(body, None)) for lib in _json_libraries()]
    for result in results:
        if not isinstance(result, EdgeError):
            _check_request(result.request)
    _same_outcome(results)
