"""A test-only model process: takes its load like the real one (`model_process`), sandboxes
itself the same way (`enter_sandbox`), then, instead of parsing a model, tries what a hostile
model would and reports each outcome on the control socket as JSON.

    python -m tests.support.sandbox_probe CONTROL_FD ATTEMPT [ARG]

ATTEMPT `report` runs every harmless attempt (files, sockets, connect to ARG's port, the
environment) and answers on one connection to the listener; `exec` and `fork` try to start a
process (the filter kills the probe for it); `hang` never answers, as a parse that spins;
`nonsense` and `big` answer what a hostile process might.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

from modelloader_workers.model_process import enter_sandbox, receive_load, send_message


def _outcome(attempt: Any) -> str:
    try:
        attempt()
    except OSError as error:
        return type(error).__name__
    return "allowed"


def _read(path: str) -> None:
    with open(path, "rb") as stream:
        stream.read(1)


def main(argv: list[str]) -> int:
    control = socket.socket(fileno=int(argv[1]))
    attempt = argv[2]
    received = receive_load(control)
    assert received is not None
    request, listener = received
    extra = json.loads(argv[3]) if len(argv) > 3 else {}
    early = socket.socket(socket.AF_INET)  # made before the sandbox: may it still connect?
    sandbox, _limited = enter_sandbox(request)
    if attempt == "hang":  # a parse that never ends
        time.sleep(3600)
    if attempt == "nonsense":  # a reply made to break the supervisor's parser
        send_message(control, b"[" * 100_000 + b"]" * 100_000)
        return 0
    if attempt == "big":  # a reply past a SEQPACKET message's size
        send_message(control, json.dumps({"error": "x" * 500_000}).encode())
        return 0
    if attempt == "exec":
        control.send(b'{"about": "exec"}')
        os.execv("/bin/true", ["true"])
    if attempt == "fork":
        control.send(b'{"about": "fork"}')
        os.fork()
    outcomes = {
        "sandbox": sandbox,
        "own model": _outcome(lambda: _read(request.model)),
        "tcp socket": _outcome(lambda: socket.socket(socket.AF_INET).close()),
        "unix socket": _outcome(lambda: socket.socket(socket.AF_UNIX).close()),
        "socketpair": _outcome(socket.socketpair),
        "connect": _outcome(lambda: early.connect(("127.0.0.1", int(extra["port"])))),
        "environment": sorted(os.environ),
    }
    for name, path in extra.get("files", {}).items():
        outcomes[name] = _outcome(lambda path=path: _read(path))
    conn, _ = listener.accept()  # the one thing it may do on the network
    conn.sendall(b"answered")
    conn.close()
    control.send(json.dumps(outcomes).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
