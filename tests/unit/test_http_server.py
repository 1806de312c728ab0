"""The gateway's HTTP/1.1 server against raw sockets: framing (Content-Length, chunked,
pipelining, keep-alive, HTTP/1.0, HEAD, Expect), answers before the body (the body read and
dropped, or the connection closed after a linger), and the bounds on slow or oversized clients.
The router here is a stand-in; the v2 routes over real workers are tested end to end."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from modelloader_gateway.http_server import (
    MAX_HEAD_BYTES,
    HttpError,
    HttpServer,
    RequestHead,
    Response,
)


def refused(message: str) -> HttpError:
    return HttpError(401, message)


@dataclass
class Echo:
    """Answers with what it got: the body's length and its first bytes."""

    max_body: int
    failed: list[int] = field(default_factory=list)
    delay: float = 0.0

    def start(self, body: memoryview, respond: Callable[[Response], None]) -> None:
        text = f"{len(body)}:{bytes(body[:16]).decode(errors='replace')}".encode()
        if self.delay:
            asyncio.get_running_loop().call_later(self.delay, respond, Response(200, text))
        else:
            respond(Response(200, text, "text/plain"))

    def fail(self, error: HttpError) -> None:
        self.failed.append(error.status)


@dataclass
class Router:
    max_body: int = 1 << 20
    calls: list[Echo] = field(default_factory=list)
    heads: list[RequestHead] = field(default_factory=list)

    def admit(self, head: RequestHead) -> Echo:
        self.heads.append(head)
        if head.headers.get("authorization") == "no":
            raise refused("who are you?")
        if head.path == "/big":
            call = Big(self.max_body)
        else:
            call = Echo(self.max_body, delay=0.2 if head.path == "/slow" else 0.0)
        self.calls.append(call)
        return call


class Big(Echo):
    def start(self, body: memoryview, respond: Callable[[Response], None]) -> None:
        respond(Response(200, b"x" * (8 << 20), "application/octet-stream"))


@dataclass
class Served:
    port: int
    router: Router
    server: HttpServer


def serve(
    scenario: Callable[[Served], Any], idle: float = 5.0, body: float = 5.0, **router: Any
) -> Any:
    """Run the server in this thread's loop and `scenario` (blocking socket code) beside it."""

    async def main() -> Any:
        routes = Router(**router)
        server = HttpServer(routes, idle_timeout=idle, body_timeout=body)
        await server.start("127.0.0.1", 0)
        try:
            return await asyncio.to_thread(scenario, Served(server.port, routes, server))
        finally:
            await server.close()

    return asyncio.run(main())


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


class Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""

    def _more(self) -> bool:
        chunk = self.sock.recv(1 << 16)
        self.data += chunk
        return bool(chunk)

    def answer(self, head_only: bool = False) -> Answer:
        while b"\r\n\r\n" not in self.data:
            if not self._more():
                raise ConnectionError(f"closed after {self.data!r}")
        head, self.data = self.data.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = 0 if head_only else int(headers.get("content-length", "0"))
        while len(self.data) < length:
            if not self._more():
                raise ConnectionError("closed mid-body")
        body, self.data = self.data[:length], self.data[length:]
        return Answer(int(status_line.split()[1]), headers, body)

    def closed(self) -> bool:
        try:
            return not self._more() and not self.data
        except (ConnectionResetError, TimeoutError):
            return True


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    def scenario(s: Served) -> list[Answer]:
        with connect(s.port) as sock:
            reader = Reader(sock)
            sock.sendall(post("/a", b"hello"))
            first = reader.answer()
            # Three at once, one of them slow: answers still come in order.
            sock.sendall(
                post("/slow", b"1") + post("/b", b"22") + b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            return [first, reader.answer(), reader.answer(), reader.answer()]

    answers = serve(scenario)
    assert [a.body for a in answers] == [b"5:hello", b"1:1", b"2:22", b"0:"]
    assert all(a.status == 200 and "date" in a.headers for a in answers)


@pytest.mark.parametrize("size", [0, 1, 65_535, 65_536 + 7, 150_528, 602_112])
def test_bodies_of_every_size_arrive_whole_in_pieces(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)

    def scenario(s: Served) -> Answer:
        with connect(s.port) as sock:
            request = post("/x", body)
            for start in range(0, len(request), 40_000):  # dribbled in 40 KB writes
                sock.sendall(request[start : start + 40_000])
                time.sleep(0.001)
            return Reader(sock).answer()

    answer = serve(scenario)
    assert answer.body == f"{size}:".encode() + body[:16]


def test_http_10_closes_unless_asked_to_keep_alive() -> None:
    def scenario(s: Served) -> tuple[Answer, bool, Answer, Answer]:
        with connect(s.port) as sock:
            reader = Reader(sock)
            sock.sendall(b"GET /a HTTP/1.0\r\n\r\n")
            plain = reader.answer()
            closed = reader.closed()
        with connect(s.port) as sock:
            reader = Reader(sock)
            sock.sendall(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            kept = reader.answer()
            sock.sendall(b"GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            return plain, closed, kept, reader.answer()

    plain, closed, kept, again = serve(scenario)
    assert plain.status == 200 and plain.headers["connection"] == "close" and closed
    assert kept.headers["connection"] == "keep-alive" and again.status == 200


def test_chunked_bodies_are_decoded_and_the_connection_closes() -> None:
    def scenario(s: Served) -> tuple[Answer, bool]:
        with connect(s.port) as sock:
            reader = Reader(sock)
            sock.sendall(
                b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            return reader.answer(), reader.closed()

    answer, closed = serve(scenario)
    assert answer.body == b"11:hello world" and answer.headers["connection"] == "close"
    assert closed


def test_expect_100_continue_gets_an_interim_answer_first() -> None:
    def scenario(s: Served) -> tuple[Answer, Answer]:
        with connect(s.port) as sock:
            reader = Reader(sock)
            sock.sendall(
                b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
            )
            interim = reader.answer(head_only=True)
            sock.sendall(b"abc")
            return interim, reader.answer()

    interim, final = serve(scenario)
    assert interim.status == 100 and final.body == b"3:abc"


def test_head_requests_get_the_length_without_the_body() -> None:
    def scenario(s: Served) -> tuple[Answer, Answer]:
        with connect(s.port) as sock:
            reader = Reader(sock)
            sock.sendall(b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n")
            head = reader.answer(head_only=True)
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            return head, reader.answer()

    head, get = serve(scenario)
    assert head.headers["content-length"] == "2" and get.body == b"0:"


def test_an_answer_before_the_body_drops_the_body_and_keeps_the_connection() -> None:
    def scenario(s: Served) -> tuple[Answer, Answer]:
        with connect(s.port) as sock:
            reader = Reader(sock)
            sock.sendall(post("/x", b"q" * 100_000, "Authorization: no\r\n") + post("/y", b"ok"))
            return reader.answer(), reader.answer()

    refused, next_one = serve(scenario)
    assert refused.status == 401 and b"who are you?" in refused.body
    assert next_one.body == b"2:ok"


def test_an_oversized_body_is_refused_unread_and_its_call_released() -> None:
    def scenario(s: Served) -> tuple[float, Answer, bool, list[int]]:
        started = time.monotonic()
        with connect(s.port) as sock:
            reader = Reader(sock)
            sock.sendall(
                b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n" + b"{" * 1024
            )
            answer = reader.answer()
            return time.monotonic() - started, answer, reader.closed(), s.router.calls[0].failed

    took, answer, closed, failed = serve(scenario, max_body=1000)
    assert answer.status == 413 and b"over the limit of 1000 bytes" in answer.body
    assert took < 1 and closed and failed == [413]


def test_a_chunked_body_over_the_limit_is_cut_off() -> None:
    def scenario(s: Served) -> tuple[Answer, list[int]]:
        with connect(s.port) as sock:
            sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            sock.sendall(b"800\r\n" + b"a" * 0x800 + b"\r\n")
            return Reader(sock).answer(), s.router.calls[0].failed

    answer, failed = serve(scenario, max_body=1000)
    assert answer.status == 413 and failed == [413]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT HTTP\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nX: " + b"y" * MAX_HEAD_BYTES, 431),
    ],
)
def test_malformed_and_oversized_heads_are_refused(request_bytes: bytes, status: int) -> None:
    def scenario(s: Served) -> Answer:
        with connect(s.port) as sock:
            sock.sendall(request_bytes)
            return Reader(sock).answer()

    answer = serve(scenario)
    assert answer.status == status and answer.headers["connection"] == "close"


def test_slow_bodies_time_out_and_idle_connections_close() -> None:
    def scenario(s: Served) -> tuple[Answer, list[int], float, float]:
        started = time.monotonic()
        idle = connect(s.port)
        dripping = connect(s.port)
        dripping.sendall(b"GET /a HTTP/1.1\r\nHo")
        with connect(s.port) as sock:
            sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
            answer = Reader(sock).answer()
            body_cut = time.monotonic() - started
        assert Reader(idle).closed() and Reader(dripping).closed()
        idle_cut = time.monotonic() - started
        idle.close()
        dripping.close()
        return answer, s.router.calls[0].failed, body_cut, idle_cut

    answer, failed, body_cut, idle_cut = serve(scenario, idle=0.6, body=0.3)
    assert answer.status == 408 and failed == [408]
    assert 0.25 < body_cut < 2 and 0.5 < idle_cut < 3


def test_a_client_gone_mid_body_releases_its_call() -> None:
    def scenario(s: Served) -> list[int]:
        with connect(s.port) as sock:
            sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
            time.sleep(0.1)
        for _ in range(100):
            if s.router.calls and s.router.calls[0].failed:
                break
            time.sleep(0.01)
        return s.router.calls[0].failed

    assert serve(scenario) == [400]


def test_a_big_answer_goes_out_whole_before_the_next_request_is_read() -> None:
    def scenario(s: Served) -> tuple[int, Answer]:
        with connect(s.port) as sock:
            reader = Reader(sock)
            sock.sendall(post("/big", b"") + post("/a", b"after"))
            time.sleep(0.2)  # the server's socket buffer fills: it must wait, not drop
            return len(reader.answer().body), reader.answer()

    size, after = serve(scenario)
    assert size == 8 << 20 and after.body == b"5:after"


def test_the_path_is_decoded_per_segment_and_the_query_dropped() -> None:
    def scenario(s: Served) -> RequestHead:
        with connect(s.port) as sock:
            sock.sendall(b"GET /v2/models/a%2Fb/ready?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            Reader(sock).answer()
        return s.router.heads[0]

    head = serve(scenario)
    assert head.segments == ["v2", "models", "a/b", "ready"] and head.method == "GET"


def test_a_head_bigger_than_the_first_buffer_is_taken() -> None:
    def scenario(s: Served) -> Answer:
        with connect(s.port) as sock:
            padding = "X-Padding: " + "p" * 20_000 + "\r\n"
            sock.sendall(post("/x", b"abc", padding))
            return Reader(sock).answer()

    assert serve(scenario).body == b"3:abc"


def test_a_client_that_stops_sending_after_its_request_still_gets_the_answer() -> None:
    def scenario(s: Served) -> tuple[Answer, bool]:
        with connect(s.port) as sock:
            sock.sendall(post("/slow", b"last"))
            sock.shutdown(socket.SHUT_WR)
            reader = Reader(sock)
            return reader.answer(), reader.closed()

    answer, closed = serve(scenario)
    assert answer.body == b"4:last" and answer.headers["connection"] == "close" and closed


def test_an_absolute_url_is_routed_by_its_path() -> None:
    def scenario(s: Served) -> RequestHead:
        with connect(s.port) as sock:
            sock.sendall(b"GET http://example.com:8080/v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            Reader(sock).answer()
        return s.router.heads[0]

    assert serve(scenario).segments == ["v2", "health", "live"]


def test_a_long_pipeline_of_refused_requests_is_answered_whole() -> None:
    def scenario(s: Served) -> list[int]:
        with connect(s.port) as sock:
            reader = Reader(sock)
            # A big head first grows the head buffer; then 2,000 requests refused at the door
            # (401) in one write: each answer goes out before the next is read, none recurses.
            sock.sendall(post("/x", b"", "X-Padding: " + "p" * 20_000 + "\r\n"))
            refused = post("/x", b"", "Authorization: no\r\n")
            sock.sendall(refused * 2000)
            return [reader.answer().status for _ in range(2001)]

    statuses = serve(scenario)
    assert statuses[0] == 200 and statuses[1:] == [401] * 2000


def test_a_client_that_does_not_read_its_answer_is_dropped() -> None:
    def scenario(s: Served) -> tuple[int, int]:
        with connect(s.port) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(post("/big", b""))  # 8 MiB back, and we do not read it
            time.sleep(0.1)
            held = len(s.server.connections)
            time.sleep(1.5)  # past the write deadline (the body timeout, here 0.3 s)
            return held, len(s.server.connections)

    held, after = serve(scenario, body=0.3)
    assert (held, after) == (1, 0)


def test_an_answer_before_an_expected_body_closes_the_connection() -> None:
    def scenario(s: Served) -> tuple[Answer, bool]:
        with connect(s.port) as sock:
            reader = Reader(sock)
            sock.sendall(
                b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n"
                b"Authorization: no\r\n\r\n"
            )
            return reader.answer(), reader.closed()

    answer, closed = serve(scenario)
    assert answer.status == 401 and answer.headers["connection"] == "close" and closed


def test_a_graceful_close_answers_what_began_and_accepts_nothing_new() -> None:
    """Shutdown (a rolling update of the gateway): stop accepting, close idle connections at
    once, answer requests under way with `Connection: close`, then close."""

    async def main() -> tuple[Answer, bool, bool, float]:
        server = HttpServer(Router(), idle_timeout=5.0, body_timeout=5.0)
        await server.start("127.0.0.1", 0)
        port = server.port

        def client() -> tuple[Answer, bool]:
            with connect(port) as busy, connect(port) as idle:
                busy.sendall(post("/slow", b"abc"))  # answered after 0.2 s
                time.sleep(0.05)
                closing.set()
                answer = Reader(busy).answer()
                return answer, Reader(idle).closed()

        closing = threading.Event()
        answered = asyncio.ensure_future(asyncio.to_thread(client))
        await asyncio.to_thread(closing.wait)
        started = time.monotonic()
        await server.close(drain_seconds=5.0)
        seconds = time.monotonic() - started
        answer, idle_closed = await answered
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            refused = False
        except OSError:
            refused = True
        return answer, idle_closed, refused, seconds

    answer, idle_closed, refused, seconds = asyncio.run(main())
    assert answer.status == 200 and answer.body == b"3:abc"
    assert answer.headers["connection"] == "close"
    assert idle_closed and refused
    assert seconds < 2.0  # the drain ends with the last answer, not at its deadline


def test_a_graceful_close_gives_up_on_a_request_past_its_deadline() -> None:
    async def main() -> tuple[bool, float]:
        server = HttpServer(Router(), idle_timeout=5.0, body_timeout=5.0)
        await server.start("127.0.0.1", 0)
        port = server.port
        sock = await asyncio.to_thread(connect, port)
        # A body that never comes whole: the request is under way until the drain's deadline.
        await asyncio.to_thread(sock.sendall, post("/a", b"x" * 10)[:-5])
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await server.close(drain_seconds=0.3)
        seconds = time.monotonic() - started
        closed = await asyncio.to_thread(Reader(sock).closed)
        sock.close()
        return closed, seconds

    closed, seconds = asyncio.run(main())
    assert closed and 0.25 < seconds < 2.0
