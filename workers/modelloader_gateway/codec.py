"""Decode and encode v2 inference bodies: JSON tensors and Triton's binary tensor extension.

Pure functions over bytes. With the binary extension the body is a JSON header of
`Inference-Header-Content-Length` bytes followed by raw little-endian tensors, each input
declaring its size in `parameters.binary_data_size`; outputs are sent raw when asked
(`parameters.binary_data` per output, or `binary_data_output` for the whole request).

JSON tensors are parsed without a Python object per value: simdjson parses the body and hands
each numeric `data` array over as one buffer (flattened row-major, nested or not), which numpy
range-checks and converts whole; values it cannot take that way (booleans, or a value of the
wrong kind) go the slow way, for the same checks and messages. Outputs are written by orjson
straight from the arrays.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
import simdjson
from modelloader_workers.wire.memo import Memo
from modelloader_workers.wire.tensor_types import UnsupportedDatatype, numpy_dtype, v2_datatype

from modelloader_gateway.errors import BadRequest


@dataclass(frozen=True)
class DecodedRequest:
    id: str | None
    inputs: dict[str, np.ndarray[Any, Any]]
    outputs: list[str]  # empty: all of the model's outputs
    binary_outputs: dict[str, bool]  # per requested output
    binary_default: bool  # for outputs not named in the request


# Request heads (the JSON part) of at most this size, with no JSON tensor values, are parsed
# once and remembered: a client sending the same shapes sends the same head every time.
REMEMBERED_HEAD_BYTES = 4096


@dataclass(frozen=True, slots=True)
class _Input:
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    size: int | None  # bytes of binary data; None: the values are in the head ("data")
    values: np.ndarray[Any, Any] | None = None


@dataclass(frozen=True, slots=True)
class _Head:
    id: str | None
    inputs: tuple[_Input, ...]
    outputs: tuple[str, ...]
    binary_outputs: Mapping[str, bool]
    binary_default: bool


def decode_request(
    body: bytes | bytearray | memoryview, header_length: str | None
) -> DecodedRequest:
    """Binary inputs are views over `body`, not copies."""
    if header_length is not None:
        try:
            json_len = int(header_length)
        except ValueError:
            raise BadRequest("Inference-Header-Content-Length must be an integer") from None
        if not 0 <= json_len <= len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {json_len} is outside the body's "
                f"{len(body)} bytes"
            )
    else:
        json_len = len(body)
    text = bytes(body[:json_len])
    if json_len <= REMEMBERED_HEAD_BYTES and b'"data"' not in text:
        head = _remembered_heads(text)
    else:
        head = _parse_head(text)
    binary = memoryview(body)[json_len:]
    offset = 0
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for spec in head.inputs:
        if spec.size is None:
            assert spec.values is not None
            inputs[spec.name] = spec.values
            continue
        if offset + spec.size > len(binary):
            raise BadRequest(
                f"input {spec.name!r}: the body ends before its {spec.size} bytes of data"
            )
        count = spec.size // spec.dtype.itemsize if spec.dtype.itemsize else 0
        inputs[spec.name] = np.frombuffer(
            binary, dtype=spec.dtype, count=count, offset=offset
        ).reshape(spec.shape)
        offset += spec.size
    if offset != len(binary):
        raise BadRequest(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims"
        )
    return DecodedRequest(
        id=head.id,
        inputs=inputs,
        outputs=list(head.outputs),
        binary_outputs=dict(head.binary_outputs),
        binary_default=head.binary_default,
    )


# A parser per thread, reused: a fresh one's buffers are fresh pages, and faulting them in
# costs more than the parse itself (bench/RESULTS.md). Bodies past REUSED_PARSER_BYTES get
# a parser of their own, so one huge body does not leave its buffers held for good.
REUSED_PARSER_BYTES = 4 << 20
_parsers = threading.local()


def _parse(text: bytes) -> Any:
    if len(text) > REUSED_PARSER_BYTES:
        return simdjson.Parser().parse(text)
    parser = getattr(_parsers, "parser", None)
    if parser is not None:
        try:
            return parser.parse(text)
        except RuntimeError:
            # Something of its last document is still alive (a failed request's traceback
            # can hold it): this one is left to it, and a new one takes its place.
            pass
    _parsers.parser = parser = simdjson.Parser()
    return parser.parse(text)


def _parse_head(text: bytes) -> _Head:
    try:
        document = _parse(text)
    except (ValueError, RuntimeError):
        # Not JSON to simdjson: NaN, Infinity and -Infinity (which Python's parser, Triton's
        # and clients such as perf_analyzer's random FP32 data use) or not JSON at all. The
        # standard parser takes those, or says what is wrong and where.
        return _parse_head_slowly(text)
    try:
        return _head(document)
    except (RuntimeError, UnicodeError):
        return _parse_head_slowly(text)


def _parse_head_slowly(text: bytes) -> _Head:
    """What simdjson parses but will not hand over (an integer past 64 bits, a string it
    cannot decode): the standard parser takes the whole body, for the same checks."""
    try:
        document = json.loads(text)
    except (ValueError, UnicodeError) as error:
        raise BadRequest(f"request body is not valid JSON: {error}") from None
    return _head(document)


def _head(document: Any) -> _Head:
    """A request head from a parsed document: simdjson's proxies or plain Python objects."""
    if not isinstance(document, simdjson.Object | dict):
        raise BadRequest("request body must be a JSON object")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, simdjson.Array | list) or not len(raw_inputs):
        raise BadRequest("'inputs' must be a non-empty list")
    inputs: list[_Input] = []
    for position, raw in enumerate(raw_inputs):
        spec = _decode_input(_plain_except_data(raw), position)
        if any(i.name == spec.name for i in inputs):
            raise BadRequest(f"input {spec.name!r} is given twice")
        inputs.append(spec)

    # Keys, then values one by one: simdjson's items() would convert every value, the inputs'
    # `data` arrays too, element by element.
    request = {k: _plain(document[k]) for k in document if k != "inputs"}
    params = _parameters(request.get("parameters"), "request")
    binary_default = bool(params.get("binary_data_output", False))
    outputs: list[str] = []
    binary_outputs: dict[str, bool] = {}
    raw_outputs = request.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise BadRequest("'outputs' must be a list")
    for raw in raw_outputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise BadRequest("each requested output must be an object with a string 'name'")
        out_params = _parameters(raw.get("parameters"), f"output {raw['name']!r}")
        if "classification" in out_params:
            raise BadRequest("the classification extension is not supported")
        outputs.append(raw["name"])
        binary_outputs[raw["name"]] = bool(out_params.get("binary_data", binary_default))
    request_id = request.get("id")
    return _Head(
        id=str(request_id) if request_id is not None else None,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        binary_outputs=binary_outputs,
        binary_default=binary_default,
    )


_remembered_heads = Memo(_parse_head)


# What simdjson hands a numeric array over as, by `as_buffer`'s kind.
_WIDE = {"d": np.dtype(np.float64), "u": np.dtype(np.uint64), "i": np.dtype(np.int64)}


def _plain(value: Any) -> Any:
    """A parsed JSON value as Python objects."""
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _plain_except_data(raw: Any) -> Any:
    """An input as Python objects, but its `data`, left for `_values` to take whole."""
    if not isinstance(raw, simdjson.Object):
        return _plain(raw)
    return {k: raw[k] if k == "data" else _plain(raw[k]) for k in raw}


def _values(data: Any, dtype: np.dtype[Any], datatype: str, name: str) -> np.ndarray[Any, Any]:
    """A JSON `data` array as a flat array of `dtype`, checked as `np.asarray` would."""
    if isinstance(data, simdjson.Array) and dtype.kind in "fiu":
        kind: Literal["d", "u", "i"] = (
            "d" if dtype.kind == "f" else ("u" if dtype == np.uint64 else "i")
        )
        try:
            buffer = data.as_buffer(of_type=kind)
        except (TypeError, ValueError):
            pass  # a value of another kind: the slow way says which
        else:
            wide = np.frombuffer(buffer, dtype=_WIDE[kind])
            if dtype.kind in "iu" and wide.size:
                limits = np.iinfo(dtype)
                low, high = wide.min(), wide.max()
                if low < limits.min or high > limits.max:
                    bad = low if low < limits.min else high
                    raise BadRequest(
                        f"input {name!r}: 'data' does not hold {datatype} values: "
                        f"{bad} is out of range"
                    )
            return wide.astype(dtype)
    values = _plain(data)
    try:
        return np.asarray(values, dtype=dtype).reshape(-1)
    except (ValueError, TypeError, OverflowError) as error:
        raise BadRequest(
            f"input {name!r}: 'data' does not hold {datatype} values: {error}"
        ) from None


def _parameters(raw: Any, where: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object")
    return raw


def _decode_input(raw: Any, position: int) -> _Input:
    if not isinstance(raw, dict):
        raise BadRequest(f"inputs[{position}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{position}]: 'name' must be a non-empty string")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise BadRequest(f"input {name!r}: 'datatype' must be a string")
    try:
        dtype = numpy_dtype(datatype)
    except UnsupportedDatatype as error:
        raise BadRequest(f"input {name!r}: {error}") from None
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadRequest(f"input {name!r}: 'shape' must be a list of non-negative integers")
    # Exact: np.prod in int64 raises past 2**63 and wraps below it (a lying shape could match).
    count = math.prod(shape)
    params = _parameters(raw.get("parameters"), f"input {name!r}")

    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"input {name!r}: 'binary_data_size' must be a non-negative integer")
        if size != count * dtype.itemsize:
            raise BadRequest(
                f"input {name!r}: {size} bytes of binary data do not fit shape {shape} of "
                f"{datatype} ({count * dtype.itemsize} bytes)"
            )
        return _Input(name, dtype, tuple(shape), size)

    if "data" not in raw:
        raise BadRequest(f"input {name!r}: has neither 'data' nor binary data")
    flat = _values(raw["data"], dtype, datatype, name)
    if flat.size != count:
        raise BadRequest(
            f"input {name!r}: 'data' has {flat.size} values but shape {shape} needs {count}"
        )
    return _Input(name, dtype, tuple(shape), None, flat.reshape(shape))


def encode_response(
    model_name: str,
    model_version: str,
    request: DecodedRequest,
    outputs: Mapping[str, np.ndarray[Any, Any]],
) -> tuple[bytes, int | None]:
    """The body and, when any output is binary, the length of its JSON header."""
    binary = [request.binary_outputs.get(n, request.binary_default) for n in outputs]
    if all(binary) and request.id is None:  # the usual fast request: its head is remembered
        layout = tuple((n, a.dtype.str, a.shape) for n, a in outputs.items())
        header = _remembered_binary_heads((model_name, model_version, layout))
        tensors = [np.ascontiguousarray(a).data for a in outputs.values()]
        return b"".join([header, *tensors]), len(header)
    entries: list[dict[str, Any]] = []
    buffers: list[bytes] = []
    for (name, array), as_binary in zip(outputs.items(), binary, strict=True):
        entry: dict[str, Any] = {
            "name": name,
            "datatype": v2_datatype(array.dtype),
            "shape": list(array.shape),
        }
        if as_binary:
            raw = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            buffers.append(raw)
        else:
            entry["data"] = _json_values(array)
        entries.append(entry)
    header = _response_head(model_name, model_version, request.id, entries)
    if not buffers:
        return header, None
    return b"".join([header, *buffers]), len(header)


def _response_head(
    model_name: str, model_version: str, request_id: str | None, entries: list[dict[str, Any]]
) -> bytes:
    response: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": entries,
    }
    if request_id is not None:
        response["id"] = request_id
    if any(_not_finite(entry.get("data")) for entry in entries):
        # orjson would write NaN and the infinities as null; Python's writer gives NaN,
        # Infinity and -Infinity, which Triton's clients (and this server) read back.
        for entry in entries:
            if "data" in entry:
                entry["data"] = entry["data"].tolist()
        return json.dumps(response, separators=(",", ":")).encode()
    # orjson writes numpy arrays (the JSON outputs' `data`) without a Python object per value.
    return orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)


_OutputsKey = tuple[str, str, tuple[tuple[str, str, tuple[int, ...]], ...]]


def _binary_head(key: _OutputsKey) -> bytes:
    model_name, model_version, outputs = key
    entries = []
    for name, dtype_str, shape in outputs:
        dtype = np.dtype(dtype_str)
        entries.append(
            {
                "name": name,
                "datatype": v2_datatype(dtype),
                "shape": list(shape),
                "parameters": {"binary_data_size": math.prod(shape) * dtype.itemsize},
            }
        )
    return _response_head(model_name, model_version, None, entries)


_remembered_binary_heads = Memo(_binary_head)


def _not_finite(values: np.ndarray[Any, Any] | None) -> bool:
    return values is not None and values.dtype.kind in "fc" and not np.isfinite(values).all()


def _json_values(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """An output's values for JSON: flat (row-major) and contiguous, as orjson takes them."""
    return np.ascontiguousarray(array.reshape(-1))
