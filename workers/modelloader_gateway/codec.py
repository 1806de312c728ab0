"""Decode and encode v2 inference bodies: JSON tensors and Triton's binary tensor extension.

Pure functions over bytes. With the binary extension the body is a JSON header of
`Inference-Header-Content-Length` bytes followed by raw little-endian tensors, each input
declaring its size in `parameters.binary_data_size`; outputs are sent raw when asked
(`parameters.binary_data` per output, or `binary_data_output` for the whole request).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
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


def _parse_head(text: bytes) -> _Head:
    try:
        request = json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadRequest(f"request body is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise BadRequest("request body must be a JSON object")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list")
    inputs: list[_Input] = []
    for position, raw in enumerate(raw_inputs):
        spec = _decode_input(raw, position)
        if any(i.name == spec.name for i in inputs):
            raise BadRequest(f"input {spec.name!r} is given twice")
        inputs.append(spec)

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
    try:
        flat = np.asarray(raw["data"], dtype=dtype).reshape(-1)
    except (ValueError, TypeError, OverflowError) as error:
        raise BadRequest(
            f"input {name!r}: 'data' does not hold {datatype} values: {error}"
        ) from None
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
    return json.dumps(response, separators=(",", ":")).encode()


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


def _json_values(array: np.ndarray[Any, Any]) -> Sequence[Any]:
    flat = array.reshape(-1)
    if flat.dtype == np.float16:
        flat = flat.astype(np.float32)  # JSON numbers; tolist() of float16 is slow
    values: list[Any] = flat.tolist()
    return values
