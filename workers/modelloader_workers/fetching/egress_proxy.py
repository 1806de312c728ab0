"""The fetch process's way out: a forward proxy on loopback that the storage clients (obstore,
Google's) must use, so every connection they make, each redirect hop, a token endpoint, a name
that re-resolves, passes the same address rules as http(s) sources (`AddressGuard`), on the
address actually connected to. CONNECT tunnels for https; absolute-form requests for http, one
request per connection (`Connection: close`), so a kept-alive connection cannot carry a
request to another host. What it refused is kept, to be the fetch's message.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.parse

from modelloader_workers.fetching.http_source import AddressGuard, BlockedAddress

MAX_HEAD = 64 << 10
CHUNK = 1 << 16


class EgressProxy:
    def __init__(self, guard: AddressGuard, timeout: float) -> None:
        self._guard = guard
        self._timeout = timeout
        self.refused: list[str] = []  # what the address rules refused
        self.unreachable: list[str] = []  # what could not be connected to
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="egress-proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with contextlib.closing(client):
            client.settimeout(self._timeout)
            read = _read_head(client)
            if read is None:
                return
            head, extra = read
            line, _, rest = head.partition(b"\r\n")
            target = ""
            try:
                method, target, version = line.decode("latin-1").split(" ", 2)
                if method == "CONNECT":
                    host, _, port = target.rpartition(":")
                    upstream = self._guard.connect(host.strip("[]"), int(port), self._timeout)
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    first = extra
                else:
                    upstream, first = self._forward(method, target, version, rest, extra)
            except BlockedAddress as error:
                self.refused.append(str(error))
                _answer(client, b"403 Forbidden")
                return
            except (OSError, ValueError) as error:
                self.unreachable.append(
                    f"{target[:100]}: {getattr(error, 'strerror', None) or error}"
                )
                _answer(client, b"502 Bad Gateway")
                return
            with contextlib.closing(upstream):
                if first:
                    upstream.sendall(first)
                _pipe(client, upstream)

    def _forward(
        self, method: str, target: str, version: str, rest: bytes, extra: bytes
    ) -> tuple[socket.socket, bytes]:
        """An absolute-form http request, rewritten for the origin, one per connection."""
        parsed = urllib.parse.urlsplit(target)
        if parsed.scheme != "http" or not parsed.hostname:
            raise BlockedAddress(f"{target[:80]!r}: only http is proxied in the clear")
        upstream = self._guard.connect(parsed.hostname, parsed.port or 80, self._timeout)
        path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
        headers = [
            h
            for h in rest.split(b"\r\n")
            if h and not h.lower().startswith((b"connection:", b"proxy-"))
        ]
        lines = [f"{method} {path} {version}".encode("latin-1"), *headers, b"Connection: close"]
        return upstream, b"\r\n".join(lines) + b"\r\n\r\n" + extra


def _answer(client: socket.socket, status: bytes) -> None:
    with contextlib.suppress(OSError):
        client.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")


def _read_head(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """The request line and headers, and whatever of the body came with them."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(4096)
        except OSError:
            return None
        if not chunk or len(data) > MAX_HEAD:
            return None
        data += chunk
    head, _, extra = data.partition(b"\r\n\r\n")
    return head, extra


def _pipe(client: socket.socket, upstream: socket.socket) -> None:
    def one_way(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(CHUNK):
                target.sendall(chunk)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    back = threading.Thread(target=one_way, args=(upstream, client), daemon=True)
    back.start()
    one_way(client, upstream)
    back.join()
