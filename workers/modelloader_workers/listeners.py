"""The data path's listening socket, made by the supervisor for a model process (which may make
no socket of its own). Apart from the server so the supervisor imports neither numpy nor
LiteRT to make one."""

from __future__ import annotations

import contextlib
import os
import socket

from modelloader_workers.wire.address import Address


def listen(address: Address) -> tuple[socket.socket, Address]:
    """A listening socket for a model's data path, and where it answers. `address` is a Unix
    socket's path (one machine: `modelloader local`, tests) or a TCP host (a cluster: the
    gateway runs on another node; the port is chosen here, and network policy lets only the
    gateway in). Made by the supervisor and handed to the model process, which may make no
    socket of its own."""
    if address.kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.where)  # a stale socket of a worker that died before us
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address.where)
        os.chmod(address.where, 0o600)  # only our user: the gateway runs as the same user
        bound = address
    else:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((address.where, address.port))
        host, port = listener.getsockname()[:2]
        bound = Address("tcp", host, port)
    listener.listen(128)
    return listener, bound
