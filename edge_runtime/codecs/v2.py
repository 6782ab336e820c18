"""KServe Open Inference Protocol v2 JSON codec, shared by the HTTP and MQTT transports.

Supports JSON tensors ("data" flat or nested, row-major) and the binary tensor extension: the
JSON header is followed by raw little-endian tensor bytes, its length given by the
``Inference-Header-Content-Length`` header, each binary tensor marked with
``"parameters": {"binary_data_size": n}``. BYTES tensors are refused. Every decoding error is a
``RequestError`` that names the tensor.

JSON goes through `orjson` when it is installed (several times faster on the request path) and
through the standard library otherwise, with one behaviour on both paths:

- NaN, Infinity and -Infinity are not JSON: a request holding them is refused (`JsonError`, a 400),
  as orjson does; the standard library's parser is told to refuse them too.
- A document nested deeper than the parser allows (orjson: 1024 levels; the standard library: its
  recursion limit, about 1000) is refused with the same message. Any depth a v2 tensor can have
  (numpy allows at most 64 dimensions) parses on both.
- A body of ``PREEMPTIBLE_JSON_BYTES`` or more is parsed by the standard library on both paths,
  calling back into Python for every number: one C-level parse (orjson's, or the standard
  library's own) holds the GIL for its whole run, 0.5-2 s for 15 MB on a small CPU, and the HTTP
  event loop thread would stall behind it even though the parse runs on a worker. With the
  callbacks the interpreter switches threads every few milliseconds; the parse costs about 10 %
  more than the plain standard library. Binary tensors skip JSON parsing altogether.
- Non-finite float outputs are written as ``null``, so every response body is valid JSON (orjson,
  MLServer and KServe's Python server do the same; numpy-based clients such as tritonclient read
  ``null`` back as NaN in a float tensor). A client that needs the exact IEEE values (+-Inf, NaN
  payloads) asks for binary outputs, which carry the bits unchanged.
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
    "JsonError",
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
_CHUNK_VALUES = 1 << 16
"""Values converted per numpy call for a large JSON tensor (see `_to_array`)."""
_JSON_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}
"""For each target dtype kind, the kinds of JSON-parsed numbers it accepts without loss of meaning."""


NOT_A_NUMBER = "NaN and Infinity are not valid JSON numbers"
PREEMPTIBLE_JSON_BYTES = 1 << 20
TOO_DEEP = "nested too deeply"


class JsonError(ValueError):
    """Bytes that are not JSON; the message is the same with orjson and with the standard library."""


def _refuse_constant(name: str) -> Any:
    raise JsonError(NOT_A_NUMBER)


def _number(text: str) -> float:
    """A JSON float; a Python-level call, so the parser lets other threads run (see the module doc)."""
    return float(text)


def _integer(text: str) -> int:
    """A JSON integer, as `_number`."""
    return int(text)


def _orjson_error(exc: ValueError) -> JsonError:
    """orjson's error with the messages the standard library path gives for the same input."""
    doc, pos = getattr(exc, "doc", ""), getattr(exc, "pos", -1)
    message = str(exc)
    if message.startswith("depth limit exceeded"):
        return JsonError(TOO_DEEP)
    if isinstance(doc, str) and pos >= 0:
        at = doc[max(pos - 1, 0) : pos + 9]
        if at[1:4] == "NaN" or at[1:9] == "Infinity" or at.startswith("-Infinity"):
            return JsonError(NOT_A_NUMBER)
    return JsonError(message)


def json_loads(raw: bytes | memoryview) -> Any:
    """Parse JSON bytes; `JsonError` (a ValueError) if they are not JSON, nested too deep, or hold NaN."""
    large = len(raw) >= PREEMPTIBLE_JSON_BYTES
    if orjson is not None and not large:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _orjson_error(exc) from None
    hooks: dict[str, Any] = {"parse_float": _number, "parse_int": _integer} if large else {}
    try:
        return json.loads(bytes(raw), parse_constant=_refuse_constant, **hooks)
    except RecursionError:
        raise JsonError(TOO_DEEP) from None
    except UnicodeDecodeError as exc:
        raise JsonError(str(exc)) from None
    except JsonError:
        raise
    except ValueError as exc:
        raise JsonError(str(exc)) from None


def json_dumps(doc: Any) -> bytes:
    """Compact JSON bytes (ValueError on a non-finite float: `_encode_tensors` writes those as null)."""
    if orjson is not None:
        return orjson.dumps(doc)  # writes NaN and Infinity as null
    try:
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except ValueError:  # a non-finite float outside a tensor: null, as orjson writes it
        return json.dumps(_finite(doc), separators=(",", ":"), allow_nan=False).encode("utf-8")


def _finite(doc: Any) -> Any:
    """`doc` with every non-finite float replaced by None."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {key: _finite(value) for key, value in doc.items()}
    if isinstance(doc, list | tuple):
        return [_finite(value) for value in doc]
    return doc


@dataclass(frozen=True)
class DecodedRequest:
    """A decoded request plus which outputs the client wants back as binary tensors."""

    request: InferRequest
    binary_outputs: bool | frozenset[str] = False


def _to_array(data: Any) -> np.ndarray:
    """``np.array(data)``, a slice of the outer list at a time when it is large.

    One numpy call holds the GIL for its whole run; in slices, a worker converting a big request
    lets the event loop thread run between them, so health checks are not held up.
    """
    if not isinstance(data, list) or len(data) < 2:
        return np.array(data)
    step = max(1, _CHUNK_VALUES // max(np.asarray(data[0]).size, 1))
    if len(data) <= step:
        return np.array(data)
    return np.concatenate([np.array(data[i : i + step]) for i in range(0, len(data), step)])


def _json_tensor(name: str, data: Any, dtype: np.dtype, *, nulls: bool = False) -> np.ndarray:
    """A flat or nested JSON list as an array of `dtype` (no silent truncation or wrap-around).

    `nulls`: read ``null`` as NaN in a float tensor (responses, where the server wrote NaN so).
    """
    try:
        raw = _to_array(data)
        if nulls and raw.dtype == object and dtype.kind == "f":
            raw = np.array(data, dtype=np.float64)
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


def _parameters(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """The ``parameters`` object of a document or tensor entry ({} when absent)."""
    params = entry.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise RequestError(f"{where}: 'parameters' must be an object, got {type(params).__name__}")
    return params


def _flag(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    """A boolean parameter (a 400 when it is not true or false)."""
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise RequestError(f"{where}: parameter '{key}' must be true or false, got {value!r}")
    return value


def _decode_input(
    item: Any, binary: memoryview, offset: int, *, nulls: bool = False
) -> tuple[str, np.ndarray, int]:
    """One entry of "inputs": its name, array, and the binary offset after it."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise RequestError("every entry of 'inputs' must be an object with a string 'name'")
    name = item["name"]
    dtype = numpy_dtype(item.get("datatype"), name)
    shape = _shape(name, item.get("shape"))
    count = math.prod(shape)
    size = _parameters(item, f"input '{name}'").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != count * dtype.itemsize:
            raise RequestError(f"input '{name}': binary_data_size {size!r} does not fit shape {list(shape)}")
        if offset + size > len(binary):
            raise RequestError(f"input '{name}': the binary data ends before its {size} bytes")
        array = np.frombuffer(binary[offset : offset + size], dtype=dtype.newbyteorder("<")).astype(dtype)
        return name, array.reshape(shape), offset + size
    if "data" not in item:
        raise RequestError(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    array = _json_tensor(name, item["data"], dtype, nulls=nulls)
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
    except JsonError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RequestError("request body must be a JSON object")
    return doc, view[cut:]


def _requested_outputs(doc: dict[str, Any]) -> tuple[tuple[str, ...] | None, bool | frozenset[str]]:
    """Output names asked for (None: all) and which of them should come back binary."""
    binary_default = _flag(_parameters(doc, "request"), "binary_data_output", False, "request")
    outputs = doc.get("outputs")
    if outputs is None:
        return None, binary_default
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise RequestError("'outputs' must be a list of objects with a string 'name'")
    binary = set()
    for entry in outputs:
        where = f"output '{entry['name']}'"
        if _flag(_parameters(entry, where), "binary_data", binary_default, where):
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
    if request_id is not None and (not isinstance(request_id, str | int) or isinstance(request_id, bool)):
        raise RequestError(f"'id' must be a string, got {type(request_id).__name__}")
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
            entry["data"] = _json_values(array)
        entries.append(entry)
    return entries, chunks


def _json_values(array: np.ndarray) -> list[Any]:
    """A tensor's values as a flat JSON list; non-finite floats as None, so the JSON stays valid."""
    flat = array.ravel()
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        values = flat.astype(object)
        values[~np.isfinite(flat)] = None
        return values.tolist()
    return flat.tolist()


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
        name, array, offset = _decode_input(item, binary, offset, nulls=True)
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
