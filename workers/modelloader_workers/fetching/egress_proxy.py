"""The fetch process's way out: a forward proxy on loopback that the storage clients (obstore,
Google's) must use, so every connection they make, each redirect hop, a token endpoint, a name
that re-resolves, passes the same address rules as http(s) sources (`AddressGuard`), on the
address actually connected to. CONNECT tunnels for https. For plain http (an in-cluster
endpoint), absolute-form requests, exactly one per connection: the request and its body
(Content-Length) go to the origin, its answer comes back marked `Connection: close`, and the
connection ends, so a pooled connection can never carry a request to another host. What the
rules refused, or could not be reached, is kept to be the fetch's message.
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
        self._timeout = timeout  # connect, and each read from the origin
        self.refused: list[str] = []  # what the address rules refused
        self.unreachable: list[str] = []  # host:port that could not be connected to
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
            client.settimeout(None)  # a download may take long; the origin's reads are timed
            line, _, rest = head.partition(b"\r\n")
            where = ""
            try:
                method, target, version = line.decode("latin-1").split(" ", 2)
                if method == "CONNECT":
                    host, _, port = target.rpartition(":")
                    where = f"{host}:{port}"
                    upstream = self._guard.connect(host.strip("[]"), int(port), self._timeout)
                else:
                    parsed = urllib.parse.urlsplit(target)
                    if parsed.scheme != "http" or not parsed.hostname:
                        raise BlockedAddress(f"{target[:80]!r}: only http is proxied in the clear")
                    port_number = parsed.port or 80
                    where = f"{parsed.hostname}:{port_number}"
                    upstream = self._guard.connect(parsed.hostname, port_number, self._timeout)
            except BlockedAddress as error:
                self.refused.append(str(error))
                _answer(client, b"403 Forbidden")
                return
            except (OSError, ValueError) as error:
                reason = getattr(error, "strerror", None) or error
                self.unreachable.append(f"{where or 'the store'}: {reason}")
                _answer(client, b"502 Bad Gateway")
                return
            with contextlib.closing(upstream), contextlib.suppress(OSError, ValueError):
                if method == "CONNECT":
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    if extra:
                        upstream.sendall(extra)
                    _tunnel(client, upstream)
                else:
                    _one_request(client, upstream, method, target, version, rest, extra)


def _one_request(
    client: socket.socket,
    upstream: socket.socket,
    method: str,
    target: str,
    version: str,
    rest: bytes,
    extra: bytes,
) -> None:
    parsed = urllib.parse.urlsplit(target)
    path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
    headers = [h for h in rest.split(b"\r\n") if h]
    length = 0
    for header in headers:
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        elif name.strip().lower() == b"transfer-encoding":
            _answer(client, b"501 Not Implemented")  # the fetch clients send no such body
            return
    kept = [h for h in headers if not h.lower().startswith((b"connection:", b"proxy-"))]
    lines = [f"{method} {path} {version}".encode("latin-1"), *kept, b"Connection: close"]
    upstream.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
    body = extra[:length]
    upstream.sendall(body)
    left = length - len(body)
    with contextlib.suppress(OSError):
        while left > 0 and (chunk := client.recv(min(CHUNK, left))):
            upstream.sendall(chunk)
            left -= len(chunk)
        # The answer, its head marked so the client does not reuse this connection.
        answer = _read_head(upstream)
        if answer is None:
            return
        status_and_headers, start = answer
        kept_answer = [
            h for h in status_and_headers.split(b"\r\n") if not h.lower().startswith(b"connection:")
        ]
        client.sendall(b"\r\n".join([*kept_answer, b"Connection: close"]) + b"\r\n\r\n" + start)
        while chunk := upstream.recv(CHUNK):
            client.sendall(chunk)


def _answer(client: socket.socket, status: bytes) -> None:
    with contextlib.suppress(OSError):
        client.sendall(
            b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )


def _read_head(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """A message's start line and headers, and whatever of the body came with them."""
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


def _tunnel(client: socket.socket, upstream: socket.socket) -> None:
    """Both ways until each side ends; an error on either aborts both."""

    def one_way(source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(CHUNK):
                target.sendall(chunk)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    back = threading.Thread(target=one_way, args=(upstream, client), daemon=True)
    back.start()
    one_way(client, upstream)
    back.join()
