"""The v2 codec on its own: JSON and binary tensors, strict datatypes, errors naming the tensor."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_runtime.codecs import v2
from edge_runtime.codecs.v2 import (
    HEADER_LENGTH,
    decode_infer_document,
    decode_infer_request,
    decode_infer_response,
    decode_request,
    encode_infer_request,
    encode_infer_response,
)
from edge_runtime.core.errors import RequestError
from edge_runtime.core.types import InferRequest, InferResponse
from tests.conftest import require_module


@pytest.fixture(autouse=True, params=["orjson", "stdlib"])
def json_library(request, monkeypatch):
    """Every codec test runs with orjson (when installed) and with the standard library json."""
    if request.param == "stdlib":
        monkeypatch.setattr(v2, "orjson", None)
    elif v2.orjson is None:
        require_module("orjson", "fast extra: orjson>=3.9")
    return request.param


def body(*inputs, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def tensor(name="x", datatype="FP32", shape=(2, 2), data=(1, 2, 3, 4)):
    return {
        "name": name,
        "datatype": datatype,
        "shape": list(shape),
        "data": data if data is None else list(data),
    }


def test_flat_and_nested_data_decode_row_major():
    flat = decode_infer_request(body(tensor()), "m", None).inputs["x"]
    nested = decode_infer_request(body(tensor(data=[[1, 2], [3, 4]])), "m", "3").inputs["x"]
    assert flat.dtype == np.float32 and flat.tolist() == [[1, 2], [3, 4]]
    np.testing.assert_array_equal(flat, nested)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (tensor(datatype="INT8", data=[1, 2, 3, 300]), "out of range for INT8"),
        (tensor(datatype="INT32", data=[1.5, 2, 3, 4]), "'f'-kind values, not INT32"),
        (tensor(datatype="BOOL", data=[1, 0, 1, 0]), "not BOOL"),
        (tensor(datatype="BYTES"), "BYTES tensors are not supported"),
        (tensor(datatype="FP99"), "unknown datatype"),
        (tensor(shape=(2, -1)), "non-negative"),
        (tensor(data=[[1, 2], [3]]), "regular"),
        (tensor(data=["a", "b", "c", "d"]), "not FP32"),
        ({"datatype": "FP32"}, "string 'name'"),
    ],
)
def test_bad_tensors_are_request_errors_naming_the_tensor(item, message):
    with pytest.raises(RequestError, match=message) as info:
        decode_infer_request(body(item), "m", None)
    if "name" in item:
        assert "'x'" in str(info.value)


def test_bool_and_int_tensors_decode():
    request = decode_infer_request(
        body(tensor("b", "BOOL", (1, 2), [True, False]), tensor("i", "INT64", (3,), [1, -2, 3])), "m", None
    )
    assert request.inputs["b"].dtype == np.bool_ and request.inputs["b"].tolist() == [[True, False]]
    assert request.inputs["i"].dtype == np.int64 and request.inputs["i"].tolist() == [1, -2, 3]


def test_binary_request_round_trip_and_requested_outputs():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    mask = np.array([1, 0, 255], dtype=np.uint8)
    request = InferRequest(model="m", inputs={"x": x, "mask": mask}, id="7", outputs=("y",))
    raw, headers = encode_infer_request(request, binary_inputs=True)
    decoded = decode_request(raw, "m", None, header_length=int(headers[HEADER_LENGTH]))
    np.testing.assert_array_equal(decoded.request.inputs["x"], x)
    np.testing.assert_array_equal(decoded.request.inputs["mask"], mask)
    assert decoded.request.id == "7" and decoded.request.outputs == ("y",)
    assert decoded.binary_outputs == frozenset()


def test_binary_length_mismatches_are_refused():
    head = body({"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}})
    with pytest.raises(RequestError, match="ends before"):
        decode_infer_request(head + b"\0" * 4, "m", None, header_length=len(head))
    with pytest.raises(RequestError, match="belong to no input"):
        decode_infer_request(head + b"\0" * 12, "m", None, header_length=len(head))
    with pytest.raises(RequestError, match="outside the body"):
        decode_infer_request(head, "m", None, header_length=len(head) + 1)


def test_binary_output_choice_follows_the_request():
    doc = body(tensor(), outputs=[{"name": "a", "parameters": {"binary_data": True}}, {"name": "b"}])
    assert decode_request(doc, "m", None).binary_outputs == frozenset({"a"})
    everything = body(tensor(), parameters={"binary_data_output": True})
    assert decode_request(everything, "m", None).binary_outputs is True


@pytest.mark.parametrize("binary", [False, True, frozenset({"a"})])
def test_response_round_trip(binary):
    outputs = {"a": np.array([[0.25, 0.75]], np.float32), "b": np.array([3, 4], np.int64)}
    raw, headers = encode_infer_response(InferResponse("m", "2", outputs, id="q"), binary_outputs=binary)
    length = int(headers[HEADER_LENGTH]) if headers else None
    decoded = decode_infer_response(raw, header_length=length)
    assert (decoded.model, decoded.version, decoded.id) == ("m", "2", "q")
    for name, value in outputs.items():
        assert decoded.outputs[name].dtype == value.dtype
        np.testing.assert_array_equal(decoded.outputs[name], value)


def test_an_already_parsed_document_decodes_like_its_bytes():
    raw = body(tensor(), tensor("i", "INT64", (3,), [1, -2, 3]), id=9, outputs=[{"name": "y"}])
    from_bytes = decode_infer_request(raw, "m", "2")
    from_doc = decode_infer_document(json.loads(raw), "m", "2")
    assert (from_doc.model, from_doc.version, from_doc.id, from_doc.outputs) == ("m", "2", "9", ("y",))
    assert from_doc.inputs.keys() == from_bytes.inputs.keys()
    for name, value in from_bytes.inputs.items():
        assert from_doc.inputs[name].dtype == value.dtype
        np.testing.assert_array_equal(from_doc.inputs[name], value)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ({"inputs": []}, "non-empty 'inputs'"),
        ({"inputs": [tensor(), tensor()]}, "given twice"),
        ({"inputs": [tensor(shape=(3,))]}, "do not fill shape"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]},
         "ends before"),
    ],
)  # fmt: skip
def test_bad_parsed_documents_are_request_errors(doc, message):
    with pytest.raises(RequestError, match=message):
        decode_infer_document(doc, "m", None)


TOO_DEEP = "nested too deeply"
NOT_A_NUMBER = "NaN and Infinity are not valid JSON numbers"
DEEP = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (DEEP, "not valid JSON: nested too deeply"),
        (body(tensor(data=None)).replace(b"null", b"[1, NaN, 3, 4]"), "NaN and Infinity are not valid JSON"),
        (body(tensor(data=None)).replace(b"null", b"[1, 2, Infinity, 4]"), "NaN and Infinity are not valid"),
        (body(tensor(data=None)).replace(b"null", b"[1, 2, 3, -Infinity]"), "NaN and Infinity are not valid"),
        (body(tensor(), outputs=[{"name": "y", "parameters": [1]}]), "output 'y': 'parameters' must be an object"),
        (body(tensor(), outputs=[{"name": "y", "parameters": "x"}]), "'parameters' must be an object"),
        (body(tensor(), outputs=[{"name": "y", "parameters": {"binary_data": "no"}}]), "must be true or false"),
        (body(tensor(), parameters=[1]), "request: 'parameters' must be an object"),
        (body(tensor(), parameters={"binary_data_output": 1}), "must be true or false"),
        (body({**tensor(), "parameters": 7}), "input 'x': 'parameters' must be an object"),
        (body({**tensor(data=None), "parameters": {"binary_data_size": True}}), "binary_data_size True"),
        (body(tensor(), id={"a": 1}), "'id' must be a string"),
    ],
    ids=["deep", "nan", "inf", "-inf", "out-params-list", "out-params-str", "binary-data-str",
         "params-list", "binary-output-int", "in-params-int", "size-bool", "id-object"],
)  # fmt: skip
def test_hostile_json_is_the_same_request_error_on_both_paths(raw, message):
    with pytest.raises(RequestError, match=message):
        decode_request(raw, "m", None)


@pytest.mark.parametrize(
    ("raw", "message"),
    [(DEEP, TOO_DEEP), (b"[1, NaN]", NOT_A_NUMBER), (b"[Infinity]", NOT_A_NUMBER),
     (b"[-Infinity]", NOT_A_NUMBER), (b'{"a": "NaN", "b": NaN}', NOT_A_NUMBER)],
    ids=["deep", "nan", "inf", "-inf", "nan-after-string"],
)  # fmt: skip
def test_json_errors_read_exactly_the_same_with_and_without_orjson(raw, message):
    with pytest.raises(ValueError) as info:  # v2.JsonError
        v2.json_loads(raw)
    assert str(info.value) == message


def test_other_json_errors_are_json_errors_too():
    for raw in (b'{"a": }', b"\xff", b"", b"[1] x"):
        with pytest.raises(ValueError):  # v2.JsonError
            v2.json_loads(raw)


def test_non_finite_outputs_are_null_and_the_body_stays_valid_json():
    outputs = {"y": np.array([1.5, np.nan, np.inf, -np.inf], np.float32), "k": np.array([1, 2], np.int64)}
    raw, headers = encode_infer_response(InferResponse("m", "1", outputs))

    def refuse(name):
        raise AssertionError(f"{name} in a response body")

    doc = json.loads(raw, parse_constant=refuse)  # strict JSON: no NaN literal
    assert headers == {} and doc["outputs"][0]["data"] == [1.5, None, None, None]
    decoded = decode_infer_response(raw).outputs["y"]
    assert decoded.dtype == np.float32 and decoded[0] == 1.5 and np.isnan(decoded[1:]).all()
    assert v2.json_dumps({"stat": float("nan")}) == b'{"stat":null}'


def test_binary_outputs_carry_non_finite_values_exactly():
    values = np.array([np.nan, np.inf, -np.inf], np.float32)
    raw, headers = encode_infer_response(InferResponse("m", "1", {"y": values}), binary_outputs=True)
    decoded = decode_infer_response(raw, header_length=int(headers[HEADER_LENGTH])).outputs["y"]
    assert np.isnan(decoded[0]) and decoded[1] == np.inf and decoded[2] == -np.inf


def test_mqtt_payload_parsers_refuse_the_same_json():
    from edge_runtime.codecs import payloads
    from edge_runtime.core.types import StreamDecoding

    for raw, message in ((DEEP, "nested too deeply"), (b'{"inputs": [NaN]}', "NaN and Infinity")):
        with pytest.raises(RequestError, match=message):
            payloads.decode_json(raw, max_bytes=len(raw))
    for raw, message in ((b"[" * 100_000, "nested too deeply"), (b"[1, NaN]", "NaN and Infinity")):
        with pytest.raises(RequestError, match=message):
            payloads.decode_stream(
                raw, model="m", decoding=StreamDecoding.JSON, input_name="x", dtype="float32",
                shape=(), max_bytes=len(raw),
            )  # fmt: skip
    with pytest.raises(RequestError, match="schema"):
        payloads.decode_json(b'{"v": true}', max_bytes=100)


def test_a_large_body_is_parsed_preemptibly_and_decodes_the_same(monkeypatch):
    x = np.random.default_rng(3).normal(size=(3000, 64)).astype(np.float32)
    raw = body(tensor(shape=x.shape, data=None)).replace(b"null", json.dumps(x.tolist()).encode())
    assert len(raw) > v2.PREEMPTIBLE_JSON_BYTES
    calls = []
    monkeypatch.setattr(v2, "_number", lambda text: calls.append(1) or float(text))
    decoded = decode_request(raw, "m", None).request.inputs["x"]
    np.testing.assert_array_equal(decoded, x)
    assert len(calls) == x.size  # every number went through a Python-level call
    with pytest.raises(RequestError, match=NOT_A_NUMBER):
        decode_request(raw.replace(b"]]", b", NaN]]", 1), "m", None)
