"""The gateway's HTTP/1.1 server: asyncio and llhttp (through `httptools`), nothing in between.

Why not a framework: the data path's budget is about a millisecond, and a framework's layers
and copies take a large share of it. Here a request's head is parsed by llhttp, the same parser
uvicorn and Node.js use, and a `Content-Length` body goes from the kernel straight into its
final buffer, one `recv_into` per arrival, with no parser, chunk or stream object in between.
The buffer is the connection's and is reused by its next request. `bench/data_path.py` keeps
it measured against uvicorn on the same parser and core (bench/RESULTS.md).

What it does, as an HTTP/1.1 origin server must: keep-alive and HTTP/1.0, requests pipelined on
one connection (answered in order, one at a time), `Expect: 100-continue`, chunked request
bodies (decoded by llhttp; the connection closes after the answer), `HEAD`, and bounds on what a
client may hold: head size (431), body size (413, refused before it is read), an idle or slow
head (closed at the idle timeout), a slow body (408). An answer given before the body was read
(401, 404, 413, 429) is followed by reading and discarding what the client still sends, so the
client sees the answer instead of a reset; then the connection stays open when the rest was a
known, small length, or closes.

What a route does is not decided here: a `Router` admits each request from its head (raising a
`HttpError` answers at once, the body unread) and the admitted `Call` answers with the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol, cast
from urllib.parse import unquote

import httptools

log = logging.getLogger(__name__)

# A request line and headers beyond this are refused (431): aiohttp's and nginx's defaults are
# of this order, and nothing in the v2 protocol needs more. A connection's head buffer starts
# smaller and grows only for a head that needs it.
MAX_HEAD_BYTES = 64 << 10
HEAD_BUFFER_BYTES = 8 << 10
# A connection keeps its body buffer for its next request up to this size (a float32 224x224
# image is 600 KB); a larger body gets a buffer of its own, freed after its answer.
KEPT_BODY_BYTES = 4 << 20
# After an answer given before its body was read, up to this much of the body is read and
# discarded to keep the connection; more, or a chunked body, and the connection closes.
DISCARD_BYTES = 1 << 20
# How long a closing connection goes on reading and discarding, so the client reads the answer
# rather than a reset (the kernel resets a socket closed with unread data).
LINGER_SECONDS = 2.0
HEAD_END = b"\r\n\r\n"
# Bodies at least this big are read in one wake-up where the kernel allows (`_wake_after`), in
# pieces of at most the second.
WAKE_WHOLE_BODY_BYTES = 64 << 10
MAX_LOW_WATER_BYTES = 4 << 20
# An answer's head and body go out in one write below this size, in two above it.
JOIN_BELOW_BYTES = 64 << 10


@dataclass(slots=True)
class RequestHead:
    method: str
    segments: list[str]  # each decoded: "/v2/models/a%2Fb" -> ["v2", "models", "a/b"]
    headers: dict[str, str]  # lower-case names; a repeated header's values joined with ", "
    http_version: str
    keep_alive: bool
    content_length: int | None  # None with a chunked body
    chunked: bool

    @property
    def path(self) -> str:
        """The path, segments decoded, without the query string."""
        return "/" + "/".join(self.segments)


@dataclass(slots=True)
class Response:
    status: int
    body: bytes | bytearray | memoryview = b""
    content_type: str = "application/json"
    headers: Mapping[str, str] | None = None


def json_response(
    document: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(status, json.dumps(document, separators=(",", ":")).encode(), headers=headers)


class HttpError(Exception):
    """An answer with an error status and a reason: raised by a router to answer a request
    at the door, or made here for what the protocol itself refuses."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_response(error: HttpError) -> Response:
    return json_response({"error": error.message}, error.status, error.headers)


class Call(Protocol):
    """One admitted request."""

    @property
    def max_body(self) -> int:
        """Bytes of body it takes; a longer body is refused with 413."""
        ...

    def start(self, body: memoryview, respond: Callable[[Response], None]) -> None:
        """Work out the answer and hand it to `respond`, once, now or later (errors too: a
        `HttpError` becomes its status). `body` is valid until then."""
        ...

    def fail(self, error: HttpError) -> None:
        """The body never came whole (408, 413, 400) or the client left: account for it."""
        ...


class Router(Protocol):
    def admit(self, head: RequestHead) -> Call:
        """The call for this head, or raise a `HttpError` to answer before the body."""
        ...


class _HeadParser:
    """llhttp's callbacks for one request head (and a chunked body, when there is one)."""

    __slots__ = (
        "body",
        "complete",
        "headers",
        "headers_done",
        "keep_alive",
        "limit",
        "method",
        "parser",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.keep_alive = False
        self.method = ""
        self.version = ""
        self.complete = False
        self.body: bytearray | None = None  # a chunked body, decoded
        self.limit = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self.headers.get(key)
        self.headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        # Read now: llhttp forgets them when a message without a body completes.
        parser = self.parser
        assert parser is not None
        self.keep_alive = parser.should_keep_alive()
        self.method = parser.get_method().decode("latin-1")
        self.version = parser.get_http_version()
        self.headers_done = True

    def on_message_begin(self) -> None:
        if self.complete:  # a pipelined request after a chunked one: not read (we close)
            raise _Stop

    def on_body(self, chunk: bytes) -> None:
        if self.body is None:
            raise HttpError(400, "the request has a body where none was expected")
        if len(self.body) + len(chunk) > self.limit:
            raise HttpError(413, f"request body is over the limit of {self.limit} bytes")
        self.body += chunk

    def on_message_complete(self) -> None:
        self.complete = True


class _Stop(Exception):
    """Ends parsing where a chunked request ends."""


def _segments(url: bytes) -> list[str]:
    if url[:1] == b"/":  # origin form, as clients send it: no need for the URL parser
        raw = url.partition(b"?")[0].partition(b"#")[0]
    else:  # absolute form ("http://host/v2/..."), or "*"
        raw = httptools.parse_url(url).path or b"/"
    path = raw.decode("latin-1")
    parts = path.split("/")[1:]
    return [unquote(part) for part in parts] if "%" in path else parts


# Connection states
_HEAD, _BODY, _CHUNKED, _DISCARD, _BUSY, _CLOSED = range(6)


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._state = _HEAD
        self._head = bytearray(HEAD_BUFFER_BYTES)  # grows up to MAX_HEAD_BYTES for a big head
        self._head_view = memoryview(self._head)
        self._head_end = 0  # bytes of _head filled
        self._searched = 0  # where the search for the head's end resumes
        self._body_buffer: bytearray | None = None  # kept between requests
        self._body: memoryview = memoryview(b"")
        self._got = 0
        self._discard = 0  # body bytes still to read and drop
        self._keep_after_discard = False
        self._call: Call | None = None
        self._parser: httptools.HttpRequestParser | None = None
        self._callbacks: _HeadParser | None = None
        self._head_info: RequestHead | None = None
        self.deadline = 0.0  # when the current state times out (monotonic); 0: never
        self._write_paused = False
        self._next_when_drained = False
        self._answering: RequestHead | None = None  # the request whose answer is awaited
        self._socket: Any = None  # for SO_RCVLOWAT
        self._low_water = 1
        self._eof = False  # the client stopped sending while its answer was being made

    # asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        self._socket = sock if sock is not None and sock.family != socket.AF_UNIX else None
        self._server.connections.add(self)
        self._expect_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._call is not None and self._state in (_BODY, _CHUNKED):
            self._call.fail(HttpError(400, "the client went away before its body arrived"))
            self._call = None
        self._state = _CLOSED
        self._answering = None
        self._server.connections.discard(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        state = self._state
        if state == _BODY:
            return self._body[self._got :]
        if state in (_HEAD, _BUSY):  # while busy: a pipelined request, kept for later
            return self._head_view[self._head_end :]
        return self._head_view  # scratch: chunked bodies are copied out by the parser

    def buffer_updated(self, nbytes: int) -> None:
        state = self._state
        if state == _BODY:
            self._got += nbytes
            missing = len(self._body) - self._got
            if missing == 0:
                self._dispatch()
            elif missing < self._low_water:
                self._wake_after(missing)
        elif state == _HEAD:
            self._head_end += nbytes
            self._take_head()
        elif state == _BUSY:
            # A client sending ahead of its answer: kept until then. Reading stops only
            # when the head buffer is full, so the usual request costs no pause and resume
            # (two epoll_ctl calls and the selector's bookkeeping).
            self._head_end += nbytes
            if self._head_end == len(self._head) and self._transport is not None:
                self._transport.pause_reading()
        elif state == _CHUNKED:
            self._feed_chunked(self._head_view[:nbytes])
        elif state == _DISCARD:
            self._discard -= nbytes
            if self._discard <= 0 and self._keep_after_discard:
                extra = -self._discard  # the next request's first bytes came along
                self._head[:extra] = self._head[nbytes - extra : nbytes]
                self._head_end = extra
                self._after_answer(keep=True)

    def eof_received(self) -> bool | None:
        if self._state == _BUSY:  # it has sent its request and stopped: answer, then close
            self._eof = True
            return True
        return None  # close: a client that stops sending is done

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._next_when_drained and self._state == _BUSY:
            self._next_when_drained = False
            self._next_request()

    # Heads

    def _expect_head(self) -> None:
        self._state = _HEAD
        self._searched = 0
        self._head_info = None
        self._call = None
        self.deadline = time.monotonic() + self._server.idle_timeout

    def _take_head(self) -> None:
        """Parse a whole head in the buffer, if one is there, and act on it."""
        end = self._head.find(HEAD_END, max(0, self._searched - 3), self._head_end)
        if end < 0:
            self._searched = self._head_end
            if self._head_end < len(self._head):
                return
            if len(self._head) < MAX_HEAD_BYTES:  # a new buffer: the old one is still exported
                bigger = bytearray(min(2 * len(self._head), MAX_HEAD_BYTES))
                bigger[: self._head_end] = self._head
                self._head, self._head_view = bigger, memoryview(bigger)
                return
            over = f"the request line and headers are over {MAX_HEAD_BYTES} bytes"
            self._early_answer(HttpError(431, over), keep=False)
            return
        end += len(HEAD_END)
        callbacks = _HeadParser()
        parser = callbacks.parser
        assert parser is not None
        try:
            parser.feed_data(self._head_view[:end])
        except httptools.HttpParserUpgrade:
            pass  # an Upgrade we do not take: the request is answered as plain HTTP/1.1
        except httptools.HttpParserError as error:
            self._early_answer(HttpError(400, f"malformed HTTP request: {error}"), keep=False)
            return
        finally:
            callbacks.parser = None  # no cycle left for the garbage collector to find
        if not callbacks.headers_done:
            self._early_answer(HttpError(400, "malformed HTTP request head"), keep=False)
            return
        headers = callbacks.headers
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        try:
            # llhttp has checked the value (digits, no conflicting repeats, no overflow).
            length = None if chunked else int(headers.get("content-length") or 0)
            segments = _segments(callbacks.url)
        except (ValueError, httptools.HttpParserError) as error:
            self._early_answer(HttpError(400, f"malformed HTTP request: {error}"), keep=False)
            return
        head = RequestHead(
            method=callbacks.method,
            segments=segments,
            headers=headers,
            http_version=callbacks.version,
            keep_alive=callbacks.keep_alive and not chunked,
            content_length=length,
            chunked=chunked,
        )
        self._head_info = head
        leftover = self._head_end - end  # body bytes, or a pipelined request, that came along
        try:
            call = self._server.router.admit(head)
        except HttpError as error:
            self._discard_body_then_answer(head, error, end, leftover)
            return
        except Exception:
            log.exception("admitting a request failed")
            self._discard_body_then_answer(head, HttpError(500, "internal error"), end, leftover)
            return
        if length is not None and length > call.max_body:
            too_large = HttpError(413, f"request body is over the limit of {call.max_body} bytes")
            call.fail(too_large)
            self._discard_body_then_answer(head, too_large, end, leftover)
            return
        self._call = call
        if (
            (chunked or leftover < (length or 0))
            and head.http_version == "1.1"
            and "100-continue" in headers.get("expect", "").lower()
        ):
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.deadline = time.monotonic() + self._server.body_timeout
        if chunked:
            self._state = _CHUNKED
            callbacks.body = bytearray()
            callbacks.limit = call.max_body
            self._parser, self._callbacks = parser, callbacks
            pending = bytes(self._head_view[end : self._head_end])
            self._head_end = 0
            self._feed_chunked(pending)
            return
        assert length is not None
        body = self._body_for(length)
        take = min(leftover, length)
        body[:take] = self._head_view[end : end + take]
        self._keep_pipelined(end + take)
        self._body, self._got = body, take
        self._state = _BODY
        if take == length:
            self._dispatch()
        elif length - take >= WAKE_WHOLE_BODY_BYTES:
            self._wake_after(length - take)

    def _wake_after(self, nbytes: int) -> None:
        """Have the kernel wake us when `nbytes` have arrived (SO_RCVLOWAT; Linux grows the
        receive buffer to fit), not at every 64 KB segment: each wake-up of the event loop
        costs more than the read it does (bench/RESULTS.md)."""
        low_water = min(nbytes, MAX_LOW_WATER_BYTES)
        if self._socket is not None and low_water != self._low_water:
            try:
                self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, low_water)
            except OSError:
                self._socket = None  # not a TCP socket here: read as the data comes
                return
            self._low_water = low_water

    def _body_for(self, length: int) -> memoryview:
        kept = self._body_buffer
        if kept is not None and len(kept) >= length:
            return memoryview(kept)[:length]
        buffer = bytearray(length)
        if length <= KEPT_BODY_BYTES:
            self._body_buffer = buffer
        return memoryview(buffer)

    def _keep_pipelined(self, start: int) -> None:
        """Move what follows the current request to the front of the head buffer."""
        rest = self._head_end - start
        if rest > 0:
            self._head[:rest] = self._head[start : self._head_end]
        self._head_end = rest

    def _feed_chunked(self, data: bytes | memoryview) -> None:
        callbacks = self._callbacks
        assert self._parser is not None and callbacks is not None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            cause = error.__context__
            if not callbacks.complete:
                if isinstance(cause, HttpError):
                    self._fail_body(cause)
                else:
                    self._fail_body(HttpError(400, f"malformed chunked body: {error}"))
                return
        if callbacks.complete:
            body = callbacks.body or bytearray()
            self._parser = self._callbacks = None
            self._body, self._got = memoryview(body), len(body)
            self._dispatch()

    def _fail_body(self, error: HttpError) -> None:
        """The body cannot be taken: answer now and close."""
        if self._call is not None:
            self._call.fail(error)
            self._call = None
        self._parser = self._callbacks = None
        self._early_answer(error, keep=False)

    # Answers

    def _dispatch(self) -> None:
        """The body is whole: answer it (reading pauses until the answer is written)."""
        call, head = self._call, self._head_info
        assert call is not None and head is not None and self._transport is not None
        if self._low_water > 1:
            self._wake_after(1)
        self._state = _BUSY
        self.deadline = 0.0
        body = self._body
        self._body = memoryview(b"")
        self._call = None
        self._answering = head
        try:
            call.start(body, self._answered)
        except Exception:
            log.exception("answering %s %s failed", head.method, head.path)
            self._answered(error_response(HttpError(500, "internal error")))

    def _answered(self, response: Response) -> None:
        """The call's answer: write it, then go on to the connection's next request."""
        head = self._answering
        if head is None:
            return  # the connection closed meanwhile
        self._answering = None
        keep = head.keep_alive and not self._eof and not self._server.draining
        self._respond(head, response, keep=keep)
        self._after_answer(keep)

    def _after_answer(self, keep: bool) -> None:
        """An answer is written: close, or take the next request once the answer has gone
        out (a client that sends and does not read must not make us buffer answers)."""
        if self._state == _CLOSED:
            return
        if not keep:
            self._close_soon()
            return
        self._state = _BUSY  # what comes meanwhile is kept in the head buffer, unanswered
        if self._write_paused:
            self._next_when_drained = True
            self.deadline = time.monotonic() + self._server.body_timeout  # then dropped
        else:
            self._next_request()

    def _next_request(self) -> None:
        assert self._transport is not None
        self._expect_head()
        self._transport.resume_reading()
        if self._head_end:  # a pipelined request came along: taken in the next pass, so that
            self._loop.call_soon(self._take_pipelined)  # a long pipeline does not recurse

    def _take_pipelined(self) -> None:
        if self._state == _HEAD and self._head_end:
            self._take_head()

    def _discard_body_then_answer(
        self, head: RequestHead, error: HttpError, end: int, leftover: int
    ) -> None:
        """Answer before reading the body; keep the connection when the body is known and
        small enough to read and drop, else answer, linger and close."""
        length = head.content_length
        keep = head.keep_alive and length is not None and length <= DISCARD_BYTES
        expects = "100-continue" in head.headers.get("expect", "").lower()
        if keep and expects and leftover < (length or 0):
            keep = False  # the client may never send the body it was not asked for
        self._respond(head, error_response(error), keep=keep)
        if not keep:
            self._close_soon()
            return
        assert length is not None
        take = min(leftover, length)
        self._keep_pipelined(end + take)
        self._discard = length - take
        if self._discard == 0:
            self._after_answer(keep=True)
            return
        self._state = _DISCARD
        self._keep_after_discard = True
        self.deadline = time.monotonic() + self._server.body_timeout

    def _early_answer(self, error: HttpError, keep: bool) -> None:
        """An answer with no head to go by (malformed, too large, timed out)."""
        head = self._head_info or RequestHead("GET", [], {}, "1.1", False, 0, False)
        self._respond(head, error_response(error), keep=keep)
        if not keep:
            self._close_soon()

    def _respond(self, head: RequestHead, response: Response, keep: bool) -> None:
        if self._state == _CLOSED:
            return
        status = response.status
        reason = _REASONS.get(status) or "Unknown"
        lines = [
            f"HTTP/1.1 {status} {reason}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            f"Date: {self._server.date()}\r\n"
            "Server: modelloader\r\n"
        ]
        if response.headers:
            lines += [f"{name}: {value}\r\n" for name, value in response.headers.items()]
        if not keep:
            lines.append("Connection: close\r\n")
        elif head.http_version == "1.0":
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        prefix = "".join(lines).encode("latin-1")
        body = response.body
        if head.method == "HEAD" or not body:
            self._write(prefix)
        elif len(body) <= JOIN_BELOW_BYTES:
            self._write(prefix + body)  # one send; the copy is cheap at this size
        else:
            self._write(prefix)
            self._write(body)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _close_soon(self) -> None:
        """Stop writing, read and drop what the client still sends for a while, then close:
        a close with unread data would reset the connection and lose the answer."""
        transport = self._transport
        self._state = _DISCARD
        self._keep_after_discard = False
        self._discard = 1 << 62
        if self._low_water > 1:  # a body cut off: wake for any byte, to drop it
            self._wake_after(1)
        if transport is None or transport.is_closing():
            return
        if self._eof:  # the client has stopped sending: nothing to linger for
            transport.close()
            return
        if transport.can_write_eof():
            with contextlib.suppress(OSError):
                transport.write_eof()
        transport.resume_reading()
        self.deadline = time.monotonic() + LINGER_SECONDS

    def expire(self) -> None:
        """The sweeper found this connection past its deadline."""
        state = self._state
        self.deadline = 0.0
        if state in (_HEAD, _DISCARD) or (state == _BUSY and self._next_when_drained):
            self.abort()  # idle, a head dripping in, lingering, or not reading its answer
        elif state in (_BODY, _CHUNKED):
            seconds = self._server.body_timeout
            error = HttpError(408, f"the request body did not arrive within {seconds:g} s")
            self._fail_body(error)

    def abort(self) -> None:
        """Close now, dropping what is still to be written (`close` would wait for a client
        that does not read)."""
        if self._transport is not None:
            self._transport.abort()

    @property
    def in_flight(self) -> bool:
        """Whether a request has begun and its answer is not yet out: a head or body
        arriving, an answer being made or still being sent. Lingering does not count."""
        state = self._state
        transport = self._transport
        unsent = transport is not None and transport.get_write_buffer_size() > 0
        return (
            unsent
            or state in (_BODY, _CHUNKED)
            or (state == _BUSY and self._answering is not None)
            or (state == _HEAD and self._head_end > 0)
        )

    def drain(self) -> None:
        """The server is shutting down: an idle connection closes now; one with a request
        under way answers it (with `Connection: close`) and then closes."""
        if self._state == _HEAD and self._head_end == 0:
            self.abort()


_REASONS = {s.value: s.phrase for s in HTTPStatus}


class HttpServer:
    def __init__(
        self,
        router: Router,
        *,
        idle_timeout: float,
        body_timeout: float,
    ) -> None:
        self.router = router
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        self.connections: set[_Connection] = set()
        self.draining = False  # shutting down: every answer closes its connection
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._date_second = 0
        self._date = ""

    def date(self) -> str:
        now = int(time.time())
        if now != self._date_second:
            self._date_second, self._date = now, formatdate(now, usegmt=True)
        return self._date

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True, backlog=1024
        )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())

    @property
    def port(self) -> int:
        """The port of the first listening socket (useful with port 0)."""
        return int(self._servers[0].sockets[0].getsockname()[1])

    async def _sweep(self) -> None:
        """Deadlines are checked here, a few times per shortest timeout, rather than with a
        timer per request: a timer costs a heap push and a cancel on every request."""
        period = max(0.05, min(0.5, self.idle_timeout / 4, self.body_timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for connection in list(self.connections):
                if connection.deadline and connection.deadline <= now:
                    connection.expire()

    async def close(self, drain_seconds: float = 0.0) -> None:
        """Stop accepting, let requests under way be answered for up to `drain_seconds`
        (a rolling update of the gateway then drops none), then close what is left."""
        for server in self._servers:
            server.close()
        self.draining = True
        for connection in list(self.connections):
            connection.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_seconds
        while any(c.in_flight for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for connection in list(self.connections):
            connection.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
