"""The worker's serving thread with a stand-in interpreter: every connection is answered
(beyond the cap they wait, they are not refused), a frame whose payload comes late is still
read whole, and one that stalls past the frame timeout ends its connection without an answer."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from modelloader_gateway.worker_client import WorkerClients
from modelloader_workers import c_library, worker_server
from modelloader_workers.wire import ipc
from modelloader_workers.wire.address import Address
from modelloader_workers.wire.signature import Signature, TensorSpec
from modelloader_workers.worker_server import WorkerServer

from tests.support.calls import infer_worker


class Doubler:
    """An interpreter with one FP32 input of 4 values, answering it doubled after a pause."""

    signature = Signature((TensorSpec("x", "FP32", (4,)),), (TensorSpec("y", "FP32", (4,)),))
    load_seconds = 0.0

    def __init__(self, seconds: float = 0.0) -> None:
        self._input = np.zeros(4, np.float32)
        self._seconds = seconds

    def run(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        self._input[:] = inputs["x"]
        return self.invoke()

    def resize(self, shapes: Mapping[str, tuple[int, ...]], strict: bool = True) -> None:
        pass

    def input_buffers(self, names: Sequence[str]) -> list[memoryview]:
        return [self._input.view(np.uint8).data]

    def invoke(self) -> dict[str, np.ndarray[Any, Any]]:
        time.sleep(self._seconds)
        return {"y": self._input * 2}


@pytest.fixture
def address(tmp_path: Path) -> Iterator[Address]:
    yield Address("unix", str(tmp_path / "w.sock"))


def test_a_burst_beyond_the_gateways_links_waits_its_turn(address: Address) -> None:
    server = WorkerServer(Doubler(seconds=0.005), address)

    async def burst() -> list[Any]:
        clients = WorkerClients(max_links_per_worker=4)
        calls = [
            infer_worker(clients, address, {"x": np.full(4, i, np.float32)}, ["y"])
            for i in range(20)
        ]
        replies = await asyncio.gather(*calls)
        clients.close()
        return [r.outputs["y"] for r in replies]

    try:
        answers = asyncio.run(burst())
    finally:
        server.close()
    for i, y in enumerate(answers):
        np.testing.assert_array_equal(y, np.full(4, 2 * i, np.float32))


def test_connections_beyond_the_workers_cap_wait_for_one_to_close(
    address: Address, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_server, "MAX_CONNECTIONS", 2)
    server = WorkerServer(Doubler(), address)
    try:
        socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
        for i, sock in enumerate(socks):
            sock.settimeout(5)
            sock.connect(address.where)
            sock.sendall(b"".join(_request([i, i, i, i])))
        for i, sock in enumerate(socks):  # each answered once those before it have closed
            got = _reply(sock)
            assert got is not None
            np.testing.assert_array_equal(got, [2 * i] * 4)
            sock.close()
    finally:
        server.close()


def _request(values: list[float]) -> tuple[bytes, bytes]:
    entries, _ = ipc.describe({"x": np.array(values, np.float32)})
    header = ipc.encode_header({"inputs": entries, "outputs": ["y"]})
    return ipc.frame_prefix(header, 16), np.array(values, np.float32).tobytes()


def _reply(sock: socket.socket) -> np.ndarray[Any, Any] | None:
    reader = ipc.FrameReader(sock)
    try:
        header = ipc.parse_header(reader.read_head())
    except (ipc.FrameError, OSError):
        return None
    return ipc.views(ipc.layout(header["outputs"]), reader.read_payload())["y"]


def test_a_payload_that_comes_late_is_read_whole_and_a_stalled_one_ends_the_connection(
    address: Address, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_server, "FRAME_SECONDS", 0.5)
    server = WorkerServer(Doubler(), address)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(address.where)
            sock.settimeout(5)
            head, payload = _request([1, 2, 3, 4])
            sock.sendall(head + payload[:8])
            time.sleep(0.2)  # within the frame timeout: the worker waits for the rest
            sock.sendall(payload[8:])
            got = _reply(sock)
            assert got is not None
            np.testing.assert_array_equal(got, [2, 4, 6, 8])
            head, payload = _request([5, 6, 7, 8])
            sock.sendall(head + payload[:8])
            time.sleep(0.2)
            sock.sendall(payload[8:12])  # a short read for the worker's wait
            time.sleep(1.0)  # then past the timeout: the connection ends, with no answer
            with contextlib.suppress(OSError):  # made of three quarters of a frame
                sock.sendall(payload[12:])
            assert _reply(sock) is None
    finally:
        server.close()


def test_tightening_the_timer_slack_is_for_the_calling_thread_alone() -> None:
    # prctl(PR_GET_TIMERSLACK) answers for the calling thread; the serving thread of a model
    # with a queue delay tightens its own, so its waits end on time, and no other's.
    libc = c_library.handle()
    before = libc.prctl(30, 0, 0, 0, 0)  # PR_GET_TIMERSLACK
    seen: list[tuple[bool, int]] = []

    def tighten() -> None:
        seen.append((worker_server.tighten_timer_slack(), libc.prctl(30, 0, 0, 0, 0)))

    thread = threading.Thread(target=tighten)
    thread.start()
    thread.join()
    assert seen == [(True, 1)], ctypes.get_errno()
    assert libc.prctl(30, 0, 0, 0, 0) == before > 1
