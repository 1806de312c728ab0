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
import contextlib
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
        # Flat first: memoryview.cast refuses a view with a 0 in its shape, e.g. (0, 10).
        buffers.append(contiguous.reshape(-1).data.cast("B"))
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


def _parse_header(raw: bytes | memoryview) -> dict[str, Any]:
    try:
        header = json.loads(bytes(raw))
    except ValueError as error:
        raise FrameError(f"frame header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise FrameError("frame header is not an object")
    return header


# Socket buffers: big enough that a request of a few MB goes out in one gather write (one
# wake-up of the peer instead of one per default-sized buffer). The kernel caps it at its
# `net.core.wmem_max`/`rmem_max` without complaint.
SOCKET_BUFFER_BYTES = 4 << 20


def tune(sock: socket.socket) -> None:
    """Options for a data-path connection, on either side."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            if sock.getsockopt(socket.SOL_SOCKET, option) < SOCKET_BUFFER_BYTES:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small replies, now


def gather(prefix: bytes, buffers: Sequence[Any]) -> list[memoryview]:
    return [memoryview(prefix), *(memoryview(b).cast("B") for b in buffers)]


def advance(pending: list[memoryview], sent: int) -> None:
    """Drop what a partial gather write sent from the front of `pending`."""
    while pending and sent >= pending[0].nbytes:
        sent -= pending[0].nbytes
        pending.pop(0)
    if pending and sent:
        pending[0] = pending[0][sent:]


# Blocking side: the worker process.

# A connection keeps its receive buffer for the next frame (no allocation, no zeroing, no page
# faults per request) up to this size; a larger frame gets a buffer of its own.
KEPT_BUFFER_BYTES = 4 << 20
FIRST_READ_BYTES = 1 << 16


class FrameReader:
    """Reads frames from a blocking socket into one reused buffer: the first `recv_into` takes
    the prefix, the header and as much of the payload as has arrived, so a frame costs one or
    two system calls. The payload returned is a view into the buffer, valid until the next
    `read` (the worker answers a frame before it reads the next)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray(FIRST_READ_BYTES)
        self._start = 0  # unread bytes are _buffer[_start:_end]: the next frame's beginning
        self._end = 0

    def _fill(self, buffer: bytearray, start: int, end: int, need: int) -> int:
        """Receive until buffer[start:] holds `need` bytes; returns the new end."""
        view = memoryview(buffer)
        while end - start < need:
            n = self._sock.recv_into(view[end:], len(buffer) - end)
            if n == 0:
                raise FrameError(
                    "connection closed mid-frame" if end > start else "connection closed"
                )
            end += n
        return end

    def read(self) -> tuple[dict[str, Any], memoryview]:
        buffer, start, end = self._buffer, self._start, self._end
        if start == end:
            start = end = 0
        elif len(buffer) - start < FIRST_READ_BYTES:  # a frame's beginning, near the end
            buffer[: end - start] = buffer[start:end]
            start, end = 0, end - start
        end = self._fill(buffer, start, end, PREFIX.size)
        header_len, payload_len = _parse_prefix(bytes(buffer[start : start + PREFIX.size]))
        total = PREFIX.size + header_len + payload_len
        if len(buffer) - start < total:  # does not fit: a bigger buffer, what arrived copied
            bigger = bytearray(max(total, FIRST_READ_BYTES))
            bigger[: end - start] = buffer[start:end]
            buffer, start, end = bigger, 0, end - start
            if len(bigger) <= KEPT_BUFFER_BYTES:
                self._buffer = bigger
        end = self._fill(buffer, start, end, total)
        view = memoryview(buffer)
        header = _parse_header(view[start + PREFIX.size : start + PREFIX.size + header_len])
        payload = view[start + PREFIX.size + header_len : start + total]
        if buffer is self._buffer:
            self._start, self._end = start + total, end
        else:  # a one-off buffer: nothing of a next frame was read into it (total == end)
            self._start = self._end = 0
        return header, payload


def write_frame(sock: socket.socket, header: Mapping[str, Any], buffers: Sequence[Any]) -> None:
    prefix, _ = encode_prefix(header, buffers)
    # One gather write for prefix, header and every tensor: no concatenation copy.
    pending = gather(prefix, buffers)
    while pending:
        advance(pending, sock.sendmsg(pending))


# Asynchronous side: the gateway. A raw non-blocking socket driven by the event loop's `sock_*`
# calls rather than streams: streams join the buffers of a write into one copy and read through
# an intermediate buffer.


class AsyncFrameSocket:
    """One gateway -> worker connection; one exchange at a time."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        tune(sock)
        self.sock = sock
        self._head = bytearray(FIRST_READ_BYTES)

    @classmethod
    async def connect(cls, address: str) -> AsyncFrameSocket:
        """`address` is "unix:/path" or "tcp:host:port"; raises OSError or ValueError."""
        kind, _, where = address.partition(":")
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = where
        elif kind == "tcp":
            host, _, port = where.rpartition(":")
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, int(port), type=socket.SOCK_STREAM
            )
            family, _, _, _, target = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
        else:
            raise ValueError(f"unsupported worker address {address!r}")
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, target)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def exchange(
        self, header: Mapping[str, Any], buffers: Sequence[Any]
    ) -> tuple[dict[str, Any], bytearray]:
        """Send a frame, read the answer. The payload is the reply's own buffer."""
        loop = asyncio.get_running_loop()
        prefix, _ = encode_prefix(header, buffers)
        pending = gather(prefix, buffers)
        while pending:
            try:
                advance(pending, self.sock.sendmsg(pending))
            except (BlockingIOError, InterruptedError):
                await loop.sock_sendall(self.sock, pending.pop(0))  # waits for room
        head = self._head
        got = 0
        while got < PREFIX.size:
            got += await self._recv(loop, memoryview(head)[got:])
        header_len, payload_len = _parse_prefix(bytes(head[: PREFIX.size]))
        if PREFIX.size + header_len > len(head):
            head = bytearray(PREFIX.size + header_len)
            head[:got] = self._head[:got]
        while got < PREFIX.size + header_len:
            got += await self._recv(loop, memoryview(head)[got : PREFIX.size + header_len])
        reply = _parse_header(memoryview(head)[PREFIX.size : PREFIX.size + header_len])
        payload = bytearray(payload_len)
        early = got - PREFIX.size - header_len  # payload bytes that came with the header
        if early > payload_len:
            raise FrameError("the worker sent more than one frame")
        payload[:early] = head[PREFIX.size + header_len : got]
        view = memoryview(payload)
        while early < payload_len:
            early += await self._recv(loop, view[early:])
        return reply, payload

    async def _recv(self, loop: asyncio.AbstractEventLoop, into: memoryview) -> int:
        try:
            n = self.sock.recv_into(into)
        except (BlockingIOError, InterruptedError):
            n = await loop.sock_recv_into(self.sock, into)
        if n == 0:
            raise FrameError("worker closed the connection mid-frame")
        return n

    def close(self) -> None:
        self.sock.close()


def v2(array: np.ndarray[Any, Any]) -> str:
    return v2_datatype(array.dtype)
