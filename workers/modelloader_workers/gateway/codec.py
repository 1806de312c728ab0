"""Decode and encode v2 inference bodies: JSON tensors and Triton's binary tensor extension.

Pure functions over bytes (and `read_body`, which gathers a body with one copy). With the binary
extension the body is a JSON header of `Inference-Header-Content-Length` bytes followed by raw
little-endian tensors, each input declaring its size in `parameters.binary_data_size`; outputs
are sent raw when asked
(`parameters.binary_data` per output, or `binary_data_output` for the whole request).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from modelloader_workers.gateway.errors import BadRequest, PayloadTooLarge
from modelloader_workers.tensor_types import UnsupportedDatatype, numpy_dtype, v2_datatype


@dataclass(frozen=True)
class DecodedRequest:
    id: str | None
    inputs: dict[str, np.ndarray[Any, Any]]
    outputs: list[str]  # empty: all of the model's outputs
    binary_outputs: dict[str, bool]  # per requested output
    binary_default: bool  # for outputs not named in the request


class BodyStream(Protocol):
    """What `read_body` needs of a request's body stream (aiohttp's `StreamReader`)."""

    async def readchunk(self) -> tuple[bytes, bool]: ...


async def read_body(content: BodyStream, length: int | None, limit: int) -> bytes | bytearray:
    """The body, copied once from the chunks the transport received into a buffer of the
    declared length. (aiohttp's `Request.read` joins the chunks, grows a bytearray with them and
    copies that into bytes: three copies of a tensor that may be megabytes.)"""
    too_large = PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    if length is None:  # chunked transfer: grow as it comes, within the limit
        grown = bytearray()
        async for chunk in _chunks(content):
            grown += chunk
            if len(grown) > limit:
                raise too_large
        return grown
    if length > limit:
        raise too_large
    body = bytearray(length)
    view = memoryview(body)
    got = 0
    async for chunk in _chunks(content):
        end = got + len(chunk)
        if end > length:
            raise BadRequest(f"the body is longer than its Content-Length of {length} bytes")
        view[got:end] = chunk
        got = end
    if got != length:
        raise BadRequest(f"the body ended after {got} of its {length} bytes")
    return body


async def _chunks(content: BodyStream) -> AsyncIterator[bytes]:
    """The chunks as received; an empty one marks the end of a transfer-encoding chunk, and
    only an empty one without that mark the end of the body."""
    while True:
        chunk, end_of_http_chunk = await content.readchunk()
        if chunk:
            yield chunk
        elif not end_of_http_chunk:
            return


def decode_request(body: bytes | bytearray, header_length: str | None) -> DecodedRequest:
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
    try:
        request = json.loads(body[:json_len])
    except (ValueError, UnicodeDecodeError) as error:
        raise BadRequest(f"request body is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise BadRequest("request body must be a JSON object")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list")

    binary = memoryview(body)[json_len:]
    offset = 0
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for position, raw in enumerate(raw_inputs):
        name, array, used = _decode_input(raw, position, binary, offset)
        if name in inputs:
            raise BadRequest(f"input {name!r} is given twice")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise BadRequest(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims"
        )

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
    return DecodedRequest(
        id=str(request_id) if request_id is not None else None,
        inputs=inputs,
        outputs=outputs,
        binary_outputs=binary_outputs,
        binary_default=binary_default,
    )


def _parameters(raw: Any, where: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object")
    return raw


def _decode_input(
    raw: Any, position: int, binary: memoryview, offset: int
) -> tuple[str, np.ndarray[Any, Any], int]:
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
        if offset + size > len(binary):
            raise BadRequest(f"input {name!r}: the body ends before its {size} bytes of data")
        array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
        return name, array, size

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
    return name, flat.reshape(shape), 0


def encode_response(
    model_name: str,
    model_version: str,
    request: DecodedRequest,
    outputs: Mapping[str, np.ndarray[Any, Any]],
) -> tuple[bytes, int | None]:
    """The body and, when any output is binary, the length of its JSON header."""
    entries: list[dict[str, Any]] = []
    buffers: list[bytes] = []
    for name, array in outputs.items():
        entry: dict[str, Any] = {
            "name": name,
            "datatype": v2_datatype(array.dtype),
            "shape": list(array.shape),
        }
        if request.binary_outputs.get(name, request.binary_default):
            raw = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            buffers.append(raw)
        else:
            entry["data"] = _json_values(array)
        entries.append(entry)
    response: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": entries,
    }
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not buffers:
        return header, None
    return b"".join([header, *buffers]), len(header)


def _json_values(array: np.ndarray[Any, Any]) -> Sequence[Any]:
    flat = array.reshape(-1)
    if flat.dtype == np.float16:
        flat = flat.astype(np.float32)  # JSON numbers; tolist() of float16 is slow
    values: list[Any] = flat.tolist()
    return values
