"""The private channel between `modelloader status` and a running `modelloader local`.

HTTP over a Unix socket in a folder only the user can enter (0700), never over the public
gateway: status shows every origin's models, which a tenant must not see.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from pathlib import Path
from typing import Any

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
