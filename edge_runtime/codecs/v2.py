"""KServe Open Inference Protocol v2 JSON codec, shared by the HTTP and MQTT transports.

Supports JSON tensors ("data" flat or nested, row-major) and the binary tensor extension: the
JSON header is followed by raw little-endian tensor bytes, its length given by the
``Inference-Header-Content-Length`` header, each binary tensor marked with
``"parameters": {"binary_data_size": n}``. BYTES tensors are refused. Every decoding error is a
``RequestError`` that names the tensor.

JSON goes through `orjson` when it is installed (several times faster on the request path) and
through the standard library otherwise; both give the same results for finite numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Set
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.core.datatypes import numpy_dtype, v2_datatype
from edge_runtime.core.errors import RequestError
from edge_runtime.core.types import InferRequest, InferResponse

orjson: Any
try:  # optional accelerator, not a dependency
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None

__all__ = [
    "HEADER_LENGTH",
    "DecodedRequest",
    "decode_infer_document",
    "decode_infer_request",
    "decode_infer_response",
    "decode_request",
    "encode_error",
    "encode_infer_request",
    "encode_infer_response",
    "json_dumps",
    "json_loads",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
_JSON_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}
"""For each target dtype kind, the kinds of JSON-parsed numbers it accepts without loss of meaning."""


def json_loads(raw: bytes | memoryview) -> Any:
    """Parse JSON bytes (ValueError if malformed)."""
    if orjson is not None:
        return orjson.loads(raw)
    return json.loads(bytes(raw))


def json_dumps(doc: Any) -> bytes:
    """Compact JSON bytes."""
    if orjson is not None:
        return orjson.dumps(doc)
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class DecodedRequest:
    """A decoded request plus which outputs the client wants back as binary tensors."""

    request: InferRequest
    binary_outputs: bool | frozenset[str] = False


def _json_tensor(name: str, data: Any, dtype: np.dtype) -> np.ndarray:
    """A flat or nested JSON list as an array of `dtype` (no silent truncation or wrap-around)."""
    try:
        raw = np.array(data)
    except (ValueError, TypeError) as exc:
        raise RequestError(f"input '{name}': data is not a regular (nested) list: {exc}") from None
    if raw.size == 0:
        return raw.astype(dtype)
    if raw.dtype.kind not in _JSON_KINDS.get(dtype.kind, ""):
        raise RequestError(
            f"input '{name}': data holds {raw.dtype.kind!r}-kind values, not {v2_datatype(dtype)}"
        )
    array = raw.astype(dtype)
    if dtype.kind in "iu" and not np.array_equal(array, raw):
        raise RequestError(f"input '{name}': values are out of range for {v2_datatype(dtype)}")
    return array


def _shape(name: str, value: Any) -> tuple[int, ...]:
    """A tensor's shape as a tuple of non-negative ints."""
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise RequestError(f"input '{name}': shape must be a list of non-negative integers, got {value!r}")
    return tuple(value)


def _decode_input(item: Any, binary: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    """One entry of "inputs": its name, array, and the binary offset after it."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise RequestError("every entry of 'inputs' must be an object with a string 'name'")
    name = item["name"]
    dtype = numpy_dtype(item.get("datatype"), name)
    shape = _shape(name, item.get("shape"))
    count = math.prod(shape)
    params = item.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if not isinstance(size, int) or size != count * dtype.itemsize:
            raise RequestError(f"input '{name}': binary_data_size {size!r} does not fit shape {list(shape)}")
        if offset + size > len(binary):
            raise RequestError(f"input '{name}': the binary data ends before its {size} bytes")
        array = np.frombuffer(binary[offset : offset + size], dtype=dtype.newbyteorder("<")).astype(dtype)
        return name, array.reshape(shape), offset + size
    if "data" not in item:
        raise RequestError(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    array = _json_tensor(name, item["data"], dtype)
    if array.size != count:
        raise RequestError(f"input '{name}': {array.size} values do not fill shape {list(shape)}")
    return name, array.reshape(shape), offset


def _split(body: bytes, header_length: int | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON document and the binary tail of a body."""
    view = memoryview(body)
    if header_length is not None and not 0 <= header_length <= len(body):
        raise RequestError(f"{HEADER_LENGTH} {header_length} is outside the body ({len(body)} bytes)")
    cut = len(body) if header_length is None else header_length
    try:
        doc = json_loads(body if cut == len(body) else view[:cut])
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RequestError("request body must be a JSON object")
    return doc, view[cut:]


def _requested_outputs(doc: dict[str, Any]) -> tuple[tuple[str, ...] | None, bool | frozenset[str]]:
    """Output names asked for (None: all) and which of them should come back binary."""
    params = doc.get("parameters")
    if not isinstance(params, dict):
        params = {}
    binary_default = bool(params.get("binary_data_output", False))
    outputs = doc.get("outputs")
    if outputs is None:
        return None, binary_default
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise RequestError("'outputs' must be a list of objects with a string 'name'")
    binary = set()
    for entry in outputs:
        wanted = (entry.get("parameters") or {}).get("binary_data", binary_default)
        if wanted:
            binary.add(entry["name"])
    return tuple(entry["name"] for entry in outputs), frozenset(binary)


def _decode_document(
    doc: dict[str, Any], binary: memoryview, model: str, version: str | None
) -> DecodedRequest:
    """A parsed v2 request document (plus its binary tail) as a DecodedRequest."""
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        raise RequestError("request must have a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for item in items:
        name, array, offset = _decode_input(item, binary, offset)
        if name in inputs:
            raise RequestError(f"input '{name}' is given twice")
        inputs[name] = array
    if offset != len(binary):
        raise RequestError(f"{len(binary) - offset} bytes of binary data belong to no input")
    request_id = doc.get("id")
    outputs, binary_outputs = _requested_outputs(doc)
    request = InferRequest(
        model=model,
        inputs=inputs,
        version=version,
        id=None if request_id is None else str(request_id),
        outputs=outputs,
    )
    return DecodedRequest(request=request, binary_outputs=binary_outputs)


def decode_request(
    body: bytes, model: str, version: str | None, *, header_length: int | None = None
) -> DecodedRequest:
    """Decode a v2 infer request body, also returning which outputs the client wants binary."""
    doc, binary = _split(body, header_length)
    return _decode_document(doc, binary, model, version)


def decode_infer_document(doc: Any, model: str, version: str | None) -> InferRequest:
    """An already parsed JSON v2 request (no binary tensors) as an InferRequest, so a transport parses once."""
    if not isinstance(doc, dict):
        raise RequestError("request body must be a JSON object")
    return _decode_document(doc, memoryview(b""), model, version).request


def decode_infer_request(
    body: bytes, model: str, version: str | None, *, header_length: int | None = None
) -> InferRequest:
    """Decode a v2 infer request body (JSON, or JSON header + binary tensors) into an InferRequest."""
    return decode_request(body, model, version, header_length=header_length).request


def _encode_tensors(
    tensors: dict[str, np.ndarray], binary: bool | Set[str]
) -> tuple[list[dict], list[bytes]]:
    """v2 tensor entries and the binary chunks that follow the JSON header, in order."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, value in tensors.items():
        array = np.asarray(value)
        entry: dict[str, Any] = {
            "name": name,
            "datatype": v2_datatype(array.dtype),
            "shape": list(array.shape),
        }
        if binary is True or (not isinstance(binary, bool) and name in binary):
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    return entries, chunks


def _pack(doc: dict[str, Any], chunks: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """JSON header plus binary chunks, and the header-length header when there are chunks."""
    head = json_dumps(doc)
    if not chunks:
        return head, {}
    return head + b"".join(chunks), {HEADER_LENGTH: str(len(head))}


def encode_infer_response(
    response: InferResponse, *, binary_outputs: bool | Set[str] = False
) -> tuple[bytes, dict[str, str]]:
    """The v2 response body and any extra headers (binary outputs: all, none, or a set of names)."""
    entries, chunks = _encode_tensors(response.outputs, binary_outputs)
    doc: dict[str, Any] = {
        "model_name": response.model,
        "model_version": response.version,
        "outputs": entries,
    }
    if response.id is not None:
        doc["id"] = response.id
    return _pack(doc, chunks)


def encode_infer_request(
    request: InferRequest, *, binary_inputs: bool = False
) -> tuple[bytes, dict[str, str]]:
    """A v2 request body for `request` (for clients such as `edgectl predict`), plus extra headers."""
    entries, chunks = _encode_tensors(request.inputs, binary_inputs)
    doc: dict[str, Any] = {"inputs": entries}
    if request.id is not None:
        doc["id"] = request.id
    if request.outputs is not None:
        doc["outputs"] = [{"name": name} for name in request.outputs]
    return _pack(doc, chunks)


def decode_infer_response(body: bytes, *, header_length: int | None = None) -> InferResponse:
    """Parse a v2 response body (client side); RequestError if it is malformed."""
    doc, binary = _split(body, header_length)
    if "error" in doc:
        raise RequestError(str(doc["error"]))
    items = doc.get("outputs")
    if not isinstance(items, list):
        raise RequestError("response has no 'outputs' list")
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for item in items:
        name, array, offset = _decode_input(item, binary, offset)
        outputs[name] = array
    return InferResponse(
        model=str(doc.get("model_name", "")),
        version=str(doc.get("model_version", "")),
        outputs=outputs,
        id=None if doc.get("id") is None else str(doc["id"]),
    )


def encode_error(message: str) -> bytes:
    """The v2 error body ``{"error": message}``."""
    return json_dumps({"error": message})
