"""Free TCP ports for servers the tests start.

A port the kernel hands out for `bind(0)` comes from the ephemeral range, the same range Ray's
processes and every outgoing connection draw from, so between picking it and the server binding
it, something else may take it (seen in CI: the gateway's port taken by a Ray process started
in between). These ports come from below the ephemeral range and above Ray's worker ports
(10002-19999 by default), where nothing binds unasked."""

from __future__ import annotations

import random
import socket

LOW, HIGH = 20000, 32000


def free_port() -> int:
    for _ in range(200):
        port = random.randint(LOW, HIGH)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {LOW}-{HIGH}")
