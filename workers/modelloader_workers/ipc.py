"""The framing of tensors between the gateway and a worker: direct IPC over a stream socket.

Tenant tensors never go through Ray's shared-memory object store (see ARCHITECTURE.md). A frame
is two little-endian u32 lengths, a small JSON header, then the raw tensor bytes back to back:

    <u32 header length> <u32 payload length> <header JSON> <payload>

Request header:  {"inputs": [[name, datatype, shape, nbytes], ...], "outputs": [name, ...]}
Response header: {"outputs": [[name, datatype, shape, nbytes], ...], "invoke_seconds": s}
             or  {"error": message, "status": http status}

Tensors are read with `numpy.frombuffer` over the received payload: no per-element work and no
copies beyond the socket read itself.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from modelloader_workers.tensor_types import numpy_dtype, v2_datatype

PREFIX = struct.Struct("<II")
MAX_HEADER_BYTES = 1 << 20


class FrameError(RuntimeError):
    """The peer sent something that is not a frame, or went away mid-frame."""


TensorEntry = list[Any]  # [name, datatype, shape, nbytes]


def describe(tensors: Mapping[str, np.ndarray[Any, Any]]) -> tuple[list[TensorEntry], list[Any]]:
    """Header entries and the buffers to send, in the same order."""
    entries: list[TensorEntry] = []
    buffers: list[Any] = []
    for name, array in tensors.items():
        contiguous = np.ascontiguousarray(array)
        entries.append(
            [name, v2_datatype(contiguous.dtype), list(contiguous.shape), contiguous.nbytes]
        )
        buffers.append(contiguous.data.cast("B"))
    return entries, buffers


def tensors_from(entries: Sequence[TensorEntry], payload: Any) -> dict[str, np.ndarray[Any, Any]]:
    """Views over `payload` (no copy) for each described tensor."""
    out: dict[str, np.ndarray[Any, Any]] = {}
    offset = 0
    for name, datatype, shape, nbytes in entries:
        dtype = numpy_dtype(datatype)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dtype.itemsize != nbytes or offset + nbytes > len(payload):
            raise FrameError(f"tensor {name!r}: {nbytes} bytes do not fit shape {shape}")
        out[name] = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += nbytes
    return out


def encode_prefix(header: Mapping[str, Any], buffers: Iterable[Any]) -> tuple[bytes, int]:
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    payload_len = sum(memoryview(b).nbytes for b in buffers)
    return PREFIX.pack(len(header_bytes), payload_len) + header_bytes, payload_len


def _parse_prefix(prefix: bytes) -> tuple[int, int]:
    header_len, payload_len = PREFIX.unpack(prefix)
    if header_len > MAX_HEADER_BYTES:
        raise FrameError(f"frame header of {header_len} bytes is over the limit")
    return header_len, payload_len


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise FrameError(f"frame header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise FrameError("frame header is not an object")
    return header


# Blocking side: the worker process.


def recv_exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise FrameError("connection closed mid-frame" if got else "connection closed")
        got += n
    return buffer


def read_frame(sock: socket.socket) -> tuple[dict[str, Any], bytearray]:
    header_len, payload_len = _parse_prefix(bytes(recv_exactly(sock, PREFIX.size)))
    header = _parse_header(bytes(recv_exactly(sock, header_len)))
    return header, recv_exactly(sock, payload_len)


def write_frame(sock: socket.socket, header: Mapping[str, Any], buffers: Sequence[Any]) -> None:
    prefix, _ = encode_prefix(header, buffers)
    # One gather write for prefix, header and every tensor: no concatenation copy.
    pending = [memoryview(prefix), *(memoryview(b).cast("B") for b in buffers)]
    while pending:
        sent = sock.sendmsg(pending)
        while pending and sent >= pending[0].nbytes:
            sent -= pending[0].nbytes
            pending.pop(0)
        if pending and sent:
            pending[0] = pending[0][sent:]


# Asynchronous side: the gateway.


async def read_frame_async(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    try:
        header_len, payload_len = _parse_prefix(await reader.readexactly(PREFIX.size))
        header = _parse_header(await reader.readexactly(header_len))
        return header, await reader.readexactly(payload_len)
    except asyncio.IncompleteReadError as error:
        raise FrameError("worker closed the connection mid-frame") from error


def write_frame_async(
    writer: asyncio.StreamWriter, header: Mapping[str, Any], buffers: Sequence[Any]
) -> None:
    prefix, _ = encode_prefix(header, buffers)
    writer.writelines([prefix, *buffers])


def v2(array: np.ndarray[Any, Any]) -> str:
    return v2_datatype(array.dtype)
