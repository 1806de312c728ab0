"""The private channel between `modelloader status` and a running `modelloader local`.

HTTP over a Unix socket in a folder only the user can enter (0700), never over the public
gateway: status shows every origin's models, which a tenant must not see.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

SOCKET_NAME = "control.sock"


class ControlUnavailable(RuntimeError):
    pass


def prepare_state_dir(state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


def fetch(state_dir: Path, path: str = "/status", timeout: float = 10.0) -> Any:
    connection = _UnixConnection(state_dir / SOCKET_NAME, timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        # The standard decoder: it reads all the server may write (the fallback's lone
        # surrogates and big integers included), and it runs once per `modelloader status`.
        return json.loads(response.read())
    except (OSError, ValueError) as error:
        raise ControlUnavailable(
            f"no modelloader local is answering at {state_dir / SOCKET_NAME} ({error}); "
            "is it running with the same --state-dir?"
        ) from None
    finally:
        connection.close()


def is_running(state_dir: Path) -> bool:
    try:
        fetch(state_dir, "/status", timeout=2.0)
    except ControlUnavailable:
        return False
    return True


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, report: Callable[[], Any]) -> None:
        self.report = report
        super().__init__(path, _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.path != "/status":
            self.send_error(404)
            return
        body = encode(self.server.report())
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return "control socket"  # a Unix socket's peer has no address

    def log_message(self, format: str, *args: Any) -> None:
        pass


def encode(report: Any) -> bytes:
    """The status as JSON: by orjson, a twelfth of the standard encoder's time for the 1 MB
    of 500 models (11.3 against 0.9 ms here), asked every half second while they load
    (bench/model_process.py). What orjson refuses (text with a lone surrogate, as a file name
    that is not UTF-8 or a failed model's message can hold; an integer past 64 bits) goes to
    the standard encoder, which `fetch`'s decoder reads back. A NaN, which no status holds,
    would be written as null by orjson."""
    try:
        return orjson.dumps(report)
    except TypeError:
        return json.dumps(report).encode()


class ControlServer:
    """The channel's server: answers on threads of its own, not on the event loop, so
    `modelloader status` is answered within a second while the loop is busy (a pass over
    hundreds of models, their loads finishing: bench/RESULTS.md). `report` must be safe to
    call from another thread (it reads what the loop last published)."""

    def __init__(self, state_dir: Path, report: Callable[[], Any]) -> None:
        self._path = state_dir / SOCKET_NAME
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        self._server = _Server(str(self._path), report)
        self._path.chmod(0o600)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="control-channel", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
