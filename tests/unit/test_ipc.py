"""The gateway <-> worker framing: frames of every size survive the trip, back to back on one
connection, and a peer that goes away mid-frame is a FrameError, not a hang."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import numpy as np
import pytest
from modelloader_workers import ipc


def echo_worker(sock: socket.socket) -> None:
    """Answers each frame with its tensors doubled, as the worker server frames its replies."""
    reader = ipc.FrameReader(sock)
    with sock:
        while True:
            try:
                header, payload = reader.read()
            except ipc.FrameError:
                return
            tensors = ipc.tensors_from(header["inputs"], payload)
            entries, buffers = ipc.describe({n: a * 2 for n, a in tensors.items()})
            ipc.write_frame(sock, {"outputs": entries}, buffers)


async def round_trips(arrays: list[dict[str, np.ndarray[Any, Any]]]) -> list[dict[str, Any]]:
    gateway, worker = socket.socketpair()
    threading.Thread(target=echo_worker, args=(worker,), daemon=True).start()
    connection = ipc.AsyncFrameSocket(gateway)
    answers = []
    try:
        for tensors in arrays:
            entries, buffers = ipc.describe(tensors)
            reply, payload = await connection.exchange({"inputs": entries}, buffers)
            answers.append(ipc.tensors_from(reply["outputs"], payload))
    finally:
        connection.close()
    return answers


def test_frames_of_every_size_back_to_back() -> None:
    rng = np.random.default_rng(3)
    sizes = [0, 1, 7, 65_000, 1 << 16, 602_112, 5 << 20, 3]  # around the buffers' edges
    arrays = [
        {"x": rng.integers(0, 100, n, dtype=np.int32), "y": np.arange(3, dtype=np.float32)}
        for n in sizes
    ]
    answers = asyncio.run(round_trips(arrays))
    for sent, got in zip(arrays, answers, strict=True):
        for name, array in sent.items():
            np.testing.assert_array_equal(got[name], array * 2)


def test_a_peer_gone_mid_frame_is_a_frame_error() -> None:
    gateway, worker = socket.socketpair()
    entries, buffers = ipc.describe({"x": np.zeros(10, np.float32)})
    prefix, _ = ipc.encode_prefix({"inputs": entries}, buffers)
    gateway.sendall(prefix + bytes(buffers[0])[:5])
    gateway.close()
    with pytest.raises(ipc.FrameError, match="mid-frame"):
        ipc.FrameReader(worker).read()

    async def gone() -> None:
        a, b = socket.socketpair()
        b.sendall(ipc.PREFIX.pack(2, 0))  # a reply cut off in its header
        b.shutdown(socket.SHUT_WR)
        try:
            await ipc.AsyncFrameSocket(a).exchange({"inputs": []}, [])
        finally:
            a.close()
            b.close()

    with pytest.raises(ipc.FrameError):
        asyncio.run(gone())


class Chunks:
    """A body stream as aiohttp's `readchunk` gives it: (b"", True) ends a transfer-encoding
    chunk, (b"", False) ends the body."""

    def __init__(self, *parts: tuple[bytes, bool]) -> None:
        self._parts = [*parts, (b"", False)]

    async def readchunk(self) -> tuple[bytes, bool]:
        return self._parts.pop(0)


def test_read_body_gathers_chunks_once_and_checks_the_length() -> None:
    from modelloader_workers.gateway.codec import read_body
    from modelloader_workers.gateway.errors import BadRequest, PayloadTooLarge

    parts = ((b"abc", False), (b"", True), (b"de", False))
    assert asyncio.run(read_body(Chunks(*parts), 5, 10)) == b"abcde"
    assert asyncio.run(read_body(Chunks(*parts), None, 10)) == b"abcde"  # chunked transfer
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(Chunks(*parts), None, 4))
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(Chunks(*parts), 11, 10))
    with pytest.raises(BadRequest, match="longer"):
        asyncio.run(read_body(Chunks(*parts), 4, 10))
    with pytest.raises(BadRequest, match="after 5 of its 6"):
        asyncio.run(read_body(Chunks(*parts), 6, 10))
