"""The framing of tensors between the gateway and a worker: direct IPC over a stream socket.

Tenant tensors never go through Ray's object store, which is memory shared across a node. A
frame is a fixed prefix, a small JSON header, then the raw tensor bytes back to back:

    <u32 header length> <u32 payload length> <f64 service s> <f64 invoke s> <u32 batch>
    <header JSON> <payload>

Request header:  {"inputs": [[name, datatype, shape, nbytes], ...], "outputs": [name, ...]}
Response header: {"outputs": [[name, datatype, shape, nbytes], ...]}
             or  {"error": message, "status": http status}

The two timings are the worker's, set in replies (zero in requests): how long it took from
reading the request to answering it, and how long of that the interpreter ran; the gateway
counts the rest of the round trip as queueing (`Reply.queue_seconds`). With batching the
service time starts when the request's batch does, so the wait for a batch counts as
queueing, and `batch` is the items the invoke ran, set in exactly one reply of the invoke
(zero in the others, and in requests): the gateway counts executions and batch sizes from
it.

Kept out of the JSON, a header is the same bytes from one request to the next of the same
shapes, so each side parses and checks it once and looks it up after that (`memo.Memo`):
Python on the data path costs several times its quiet-loop price, because each request
arrives at a process whose caches the interpreter's last invoke has just flushed
(bench/RESULTS.md).

Tensors are read with `numpy.frombuffer` over the received payload, or received straight into
their destination (the worker reads them into the interpreter's own input buffers): no
per-element work and no copies beyond the socket read itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import asyncio

from modelloader_workers.wire.address import Address
from modelloader_workers.wire.tensor_types import UnsupportedDatatype, numpy_dtype, v2_datatype

PREFIX = struct.Struct("<IIddI")
MAX_HEADER_BYTES = 1 << 20


class FrameError(RuntimeError):
    """The peer sent something that is not a frame, or went away mid-frame."""


TensorEntry = list[Any]  # [name, datatype, shape, nbytes]


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """Where one tensor lies in a payload."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def datatype(self) -> str:
        return v2_datatype(self.dtype)


def layout(entries: Any) -> tuple[TensorSlot, ...]:
    """The slots a header's tensor entries describe, back to back; FrameError if they do not
    make sense (a size that does not fit its shape and type, a name given twice)."""
    if not isinstance(entries, list):
        raise FrameError("tensor entries must be a list")
    slots: list[TensorSlot] = []
    offset = 0
    for entry in entries:
        try:
            name, datatype, shape, nbytes = entry
            dtype = numpy_dtype(datatype)
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError, UnsupportedDatatype) as error:
            raise FrameError(f"bad tensor entry {entry!r}: {error}") from None
        if any(d < 0 for d in dims) or math.prod(dims) * dtype.itemsize != nbytes:
            raise FrameError(f"tensor {name!r}: {nbytes} bytes do not fit shape {list(dims)}")
        slots.append(TensorSlot(str(name), dtype, dims, offset, int(nbytes)))
        offset += int(nbytes)
    if len({s.name for s in slots}) != len(slots):
        raise FrameError("a tensor is named twice")
    return tuple(slots)


def payload_size(slots: Sequence[TensorSlot]) -> int:
    return sum(s.nbytes for s in slots)


def views(slots: Sequence[TensorSlot], payload: Any) -> dict[str, np.ndarray[Any, Any]]:
    """Arrays over `payload` (no copy), one per slot."""
    if payload_size(slots) > len(payload):
        raise FrameError("the payload is shorter than its tensors")
    return {
        s.name: np.frombuffer(
            payload, dtype=s.dtype, count=s.nbytes // s.dtype.itemsize, offset=s.offset
        ).reshape(s.shape)
        for s in slots
    }


def describe(tensors: Mapping[str, np.ndarray[Any, Any]]) -> tuple[list[TensorEntry], list[Any]]:
    """Header entries and the buffers to send, in the same order."""
    entries: list[TensorEntry] = []
    buffers: list[Any] = []
    for name, array in tensors.items():
        contiguous = np.ascontiguousarray(array)
        entries.append(
            [name, v2_datatype(contiguous.dtype), list(contiguous.shape), contiguous.nbytes]
        )
        buffers.append(contiguous)
    return entries, buffers


def encode_header(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def parse_header(raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        header = json.loads(bytes(raw))
    except ValueError as error:
        raise FrameError(f"frame header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise FrameError("frame header is not an object")
    return header


def frame_prefix(
    header: bytes,
    payload_len: int,
    service_seconds: float = 0.0,
    invoke_seconds: float = 0.0,
    batch: int = 0,
) -> bytes:
    """All a frame sends before its payload: the fixed prefix, then the header."""
    return PREFIX.pack(len(header), payload_len, service_seconds, invoke_seconds, batch) + header


def timeval(seconds: float) -> bytes:
    """A `struct timeval`, for SO_RCVTIMEO and SO_SNDTIMEO."""
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))


def _parse_prefix(
    prefix: bytes | bytearray | memoryview,
) -> tuple[int, int, float, float, int]:
    header_len, payload_len, queued, invoked, batch = PREFIX.unpack(prefix)
    if header_len > MAX_HEADER_BYTES:
        raise FrameError(f"frame header of {header_len} bytes is over the limit")
    return header_len, payload_len, queued, invoked, batch


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
    """What to hand `sendmsg`, as flat byte views; empty tensors are left out (a memoryview
    with a 0 in its shape cannot be cast)."""
    out = [memoryview(prefix)]
    for buffer in buffers:
        view = memoryview(buffer)
        if view.nbytes:
            out.append(view.cast("B") if view.ndim != 1 or view.format != "B" else view)
    return out


def advance(pending: list[memoryview], sent: int) -> None:
    """Drop what a partial gather write sent from the front of `pending`."""
    while pending and sent >= pending[0].nbytes:
        sent -= pending[0].nbytes
        pending.pop(0)
    if pending and sent:
        pending[0] = pending[0][sent:]


# Blocking side: the worker process.

# A connection keeps its receive buffer for the next frame (no allocation, no zeroing, no page
# faults per request) up to this size; a larger payload gets a buffer of its own.
KEPT_BUFFER_BYTES = 4 << 20
FIRST_READ_BYTES = 1 << 16


class FrameReader:
    """Reads frames from a blocking socket, one at a time (a peer sends its next frame only
    after the answer to the last). `read_head` takes the prefix and the header, with whatever
    part of the payload came along in the same read; then either `read_payload` receives the
    payload into the reader's buffer (reused), or `read_payload_into` straight into buffers of
    the caller's."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray(FIRST_READ_BYTES)
        self._early = memoryview(b"")  # payload bytes read along with the header
        self.payload_len = 0

    def _recv(self, view: memoryview, flags: int = 0) -> int:
        n = self._sock.recv_into(view, len(view), flags)
        if n == 0:
            raise FrameError("connection closed mid-frame")
        return n

    def _fill(self, view: memoryview) -> None:
        """Receive until `view` is full. MSG_WAITALL still returns short when a receive
        timeout (SO_RCVTIMEO) or a signal cuts the wait: then it goes on, or the timeout's
        error (OSError) ends the connection."""
        got = 0
        while got < len(view):
            got += self._recv(view[got:], socket.MSG_WAITALL)

    def read_head(self) -> memoryview:
        """The next frame's header bytes (valid until the next `read_head`)."""
        buffer = self._buffer
        view = memoryview(buffer)
        n = self._sock.recv_into(view, FIRST_READ_BYTES)
        if n == 0:
            raise FrameError("connection closed")
        while n < PREFIX.size:
            n += self._recv(view[n : PREFIX.size])
        header_len, payload_len, _, _, _ = _parse_prefix(view[: PREFIX.size])
        end = PREFIX.size + header_len
        if end > len(buffer):
            bigger = bytearray(end)
            bigger[:n] = buffer[:n]
            buffer, view = bigger, memoryview(bigger)
        while n < end:
            n += self._recv(view[n:end])
        if n - end > payload_len:
            raise FrameError("the peer sent more than one frame")
        self.payload_len = payload_len
        self._early = view[end:n]
        return view[PREFIX.size : end]

    def read_payload(self) -> memoryview:
        """The payload, received into the reader's buffer (valid until the next frame)."""
        length, early = self.payload_len, self._early
        buffer = self._buffer if length <= len(self._buffer) else bytearray(length)
        if length > len(self._buffer) and length <= KEPT_BUFFER_BYTES:
            self._buffer = buffer
        view = memoryview(buffer)
        got = len(early)
        view[:got] = early  # may overlap in the same buffer: memoryview copies like memmove
        self._early = memoryview(b"")
        self._fill(view[got:length])
        return view[:length]

    def read_payload_into(self, destinations: Sequence[memoryview]) -> None:
        """The payload, received straight into `destinations` (flat byte views whose sizes
        add up to the payload's)."""
        early = self._early
        self._early = memoryview(b"")
        for destination in destinations:
            take = min(len(early), len(destination))
            if take:
                destination[:take] = early[:take]
                early = early[take:]
            self._fill(destination[take:])

    def skip_payload(self) -> None:
        """Read the payload and drop it, a buffer's worth at a time."""
        left = self.payload_len - len(self._early)
        self._early = memoryview(b"")
        scratch = memoryview(self._buffer)
        while left > 0:
            left -= self._recv(scratch[: min(left, len(scratch))])


def write_frame(
    sock: socket.socket,
    header: bytes,
    buffers: Sequence[Any],
    service_seconds: float = 0.0,
    invoke_seconds: float = 0.0,
    batch: int = 0,
) -> None:
    payload_len = sum(memoryview(b).nbytes for b in buffers)
    prefix = frame_prefix(header, payload_len, service_seconds, invoke_seconds, batch)
    # One gather write for prefix, header and every tensor: no concatenation copy.
    pending = gather(prefix, buffers)
    while pending:
        advance(pending, sock.sendmsg(pending))


# Asynchronous side: the gateway. A raw non-blocking socket with a reader registered on the event
# loop for as long as the link is open, and completion callbacks rather than futures: the reply
# is parsed, and the caller's answer written, in the same pass of the loop that saw it arrive
# (a future would resume its task one pass later), and an idle link that the worker closes is
# noticed at once instead of at its next use.


@dataclass(frozen=True, slots=True)
class Reply:
    header: bytes
    payload: bytearray  # the reply's own buffer: views into it outlive the link's next frame
    queue_seconds: float  # the round trip less the worker's service time: waiting, mostly
    invoke_seconds: float
    batch: int = 1  # items of the invoke, on one reply per invoke; 0 on the others


Outcome = Reply | FrameError | OSError
OnReply = Callable[[Outcome], None]


class WorkerLink:
    """One gateway -> worker connection; one exchange at a time."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        """`on_close` is called once, when the link closes (by `close` or by failing)."""
        sock.setblocking(False)
        tune(sock)
        self.sock = sock
        self._on_close = on_close
        self._loop = loop
        self._fd = sock.fileno()
        self._head = bytearray(FIRST_READ_BYTES)
        self._got = 0  # bytes of the reply read so far into _head (prefix and header)
        self._header: bytes | None = None
        self._timings = (0.0, 0.0, 0)  # the reply's: service and invoke seconds, batch
        self._sent = 0.0  # when the request went out
        self._payload: bytearray | None = None
        self._payload_got = 0
        self._pending: list[memoryview] = []  # what the request still has to write
        self._on_reply: OnReply | None = None
        self.sent = False  # the current exchange's request is wholly written
        self.closed = False
        loop.add_reader(self._fd, self._readable)

    @classmethod
    async def connect(
        cls, address: Address, on_close: Callable[[], None] | None = None
    ) -> WorkerLink:
        """Connect to a worker's data-path listener; raises OSError."""
        import asyncio  # here: the model process, which imports this module, never pays for it

        loop = asyncio.get_running_loop()
        if address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = address.where
        else:
            infos = await loop.getaddrinfo(address.where, address.port, type=socket.SOCK_STREAM)
            family, _, _, _, target = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, target)
        except BaseException:
            sock.close()
            raise
        return cls(sock, loop, on_close)

    def exchange(
        self, prefix: bytes, buffers: Sequence[Any], on_reply: OnReply, since: float = 0.0
    ) -> None:
        """Send a frame (`prefix` from `frame_prefix`, then the buffers); `on_reply` gets the
        reply, or the error that ended the link, exactly once, possibly before this returns.
        `since`: when the request started waiting (`time.perf_counter`), if before now."""
        if self.closed:
            on_reply(FrameError("the connection to the worker is closed"))
            return
        assert self._on_reply is None, "one exchange at a time"
        self._on_reply = on_reply
        self._pending = gather(prefix, buffers)
        self.sent = False
        self._sent = since or time.perf_counter()
        self._write()

    def _write(self) -> None:
        pending = self._pending
        try:
            while pending:
                advance(pending, self.sock.sendmsg(pending))
            self.sent = True
        except (BlockingIOError, InterruptedError):
            self._loop.add_writer(self._fd, self._writable)  # the socket buffer is full
            return
        except OSError as error:
            self._fail(error)

    def _writable(self) -> None:
        self._loop.remove_writer(self._fd)
        self._write()

    def _readable(self) -> None:
        try:
            while True:
                if self._payload is None:
                    if not self._read_head():
                        return
                elif not self._read_payload():
                    return
        except (FrameError, OSError) as error:
            self._fail(error)

    def _recv_into(self, view: memoryview) -> int:
        """Bytes read, 0 when nothing is there now; FrameError at the end of the stream."""
        try:
            n = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return 0
        if n == 0:
            raise FrameError(
                "worker closed the connection mid-frame" if self._got else "worker closed"
            )
        return n

    def _read_head(self) -> bool:
        """Read prefix and header; True when the payload is next (or the reply done)."""
        head = self._head
        n = self._recv_into(memoryview(head)[self._got :])
        if n == 0:
            return False
        if self._on_reply is None:
            raise FrameError("the worker sent a frame nobody asked for")
        self._got += n
        if self._got < PREFIX.size:
            return False
        header_len, payload_len, served, invoked, batch = _parse_prefix(head[: PREFIX.size])
        end = PREFIX.size + header_len
        if end > len(head):  # a header bigger than the first read: grow, keep what came
            self._head = bigger = bytearray(end)
            bigger[: self._got] = head[: self._got]
            head = bigger
        if self._got < end:
            return False
        self._header = bytes(head[PREFIX.size : end])
        self._timings = (served, invoked, batch)
        early = self._got - end  # payload bytes that came with the header
        if early > payload_len:
            raise FrameError("the worker sent more than one frame")
        payload = self._payload = bytearray(payload_len)
        payload[:early] = head[end : self._got]
        self._payload_got = early
        if len(self._head) > FIRST_READ_BYTES:
            self._head = bytearray(FIRST_READ_BYTES)
        return self._finish_if_whole()

    def _read_payload(self) -> bool:
        assert self._payload is not None
        n = self._recv_into(memoryview(self._payload)[self._payload_got :])
        if n == 0:
            return False
        self._payload_got += n
        return self._finish_if_whole()

    def _finish_if_whole(self) -> bool:
        payload, header, on_reply = self._payload, self._header, self._on_reply
        assert payload is not None and header is not None and on_reply is not None
        if self._payload_got < len(payload):
            return True
        self._got, self._header, self._payload, self._on_reply = 0, None, None, None
        self._pending = []
        served, invoked, batch = self._timings
        queued = max(0.0, time.perf_counter() - self._sent - served)
        on_reply(Reply(header, payload, queued, invoked, batch))
        return False  # nothing else is due: the next frame is the next request's

    def _fail(self, error: FrameError | OSError) -> None:
        on_reply = self._on_reply
        self._on_reply = None
        self.close()
        if on_reply is not None:
            on_reply(error)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self.sock.close()
        if self._on_close is not None:
            self._on_close()
