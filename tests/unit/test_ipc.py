"""The gateway <-> worker framing: frames of every size survive the trip, back to back on one
connection, received into the reader's buffer or straight into the caller's; a peer that goes
away mid-frame is a FrameError, not a hang; headers are parsed once per distinct bytes."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import numpy as np
import pytest
from modelloader_workers.wire import ipc
from modelloader_workers.wire.memo import Memo

from tests.support.calls import infer_worker


def echo_worker(sock: socket.socket, into_destinations: bool) -> None:
    """Answers each frame with its tensors doubled, as the worker server frames its replies:
    the payload read into the reader's buffer, or into arrays of its own."""
    reader = ipc.FrameReader(sock)
    with sock:
        while True:
            try:
                header = ipc.parse_header(reader.read_head())
                slots = ipc.layout(header["inputs"])
                if into_destinations:
                    arrays = {s.name: np.empty(s.shape, s.dtype) for s in slots}
                    reader.read_payload_into(
                        [a.reshape(-1).view(np.uint8).data for a in arrays.values()]
                    )
                else:
                    arrays = ipc.views(slots, reader.read_payload())
            except ipc.FrameError:
                return
            entries, buffers = ipc.describe({n: a * 2 for n, a in arrays.items()})
            ipc.write_frame(sock, ipc.encode_header({"outputs": entries}), buffers, 0.25, 0.5)


async def round_trips(
    arrays: list[dict[str, np.ndarray[Any, Any]]], into_destinations: bool
) -> list[dict[str, Any]]:
    gateway, worker = socket.socketpair()
    threading.Thread(target=echo_worker, args=(worker, into_destinations), daemon=True).start()
    link = ipc.WorkerLink(gateway, asyncio.get_running_loop())
    answers = []
    try:
        for tensors in arrays:
            entries, buffers = ipc.describe(tensors)
            header = ipc.encode_header({"inputs": entries})
            prefix = ipc.frame_prefix(header, sum(e[3] for e in entries))
            future: asyncio.Future[ipc.Outcome] = asyncio.get_running_loop().create_future()
            link.exchange(prefix, buffers, future.set_result)
            reply = await future
            assert isinstance(reply, ipc.Reply), reply
            # The worker says it took 0.25 s of the round trip: nothing is left for queueing.
            assert (reply.queue_seconds, reply.invoke_seconds) == (0.0, 0.5)
            slots = ipc.layout(ipc.parse_header(reply.header)["outputs"])
            answers.append(ipc.views(slots, reply.payload))
    finally:
        link.close()
    return answers


@pytest.mark.parametrize("into_destinations", [False, True])
def test_frames_of_every_size_back_to_back(into_destinations: bool) -> None:
    rng = np.random.default_rng(3)
    # Around the buffers' edges; 5 Mi int32 is past the 4 MiB socket buffers (partial writes).
    sizes = [0, 1, 7, 16_000, 1 << 14, 150_528, 602_112, 5 << 20, 3]
    arrays = [
        {"x": rng.integers(0, 100, n, dtype=np.int32), "y": np.arange(3, dtype=np.float32)}
        for n in sizes
    ]
    answers = asyncio.run(round_trips(arrays, into_destinations))
    for sent, got in zip(arrays, answers, strict=True):
        for name, array in sent.items():
            np.testing.assert_array_equal(got[name], array * 2)


def test_a_peer_gone_mid_frame_is_a_frame_error() -> None:
    gateway, worker = socket.socketpair()
    entries, buffers = ipc.describe({"x": np.zeros(10, np.float32)})
    header = ipc.encode_header({"inputs": entries})
    gateway.sendall(ipc.frame_prefix(header, 40) + bytes(buffers[0].data)[:5])
    gateway.close()
    reader = ipc.FrameReader(worker)
    reader.read_head()
    with pytest.raises(ipc.FrameError, match="mid-frame"):
        reader.read_payload()

    async def gone() -> ipc.Outcome:
        a, b = socket.socketpair()
        b.sendall(ipc.PREFIX.pack(2, 0, 0.0, 0.0, 0))  # a reply cut off in its header
        b.shutdown(socket.SHUT_WR)
        link = ipc.WorkerLink(a, asyncio.get_running_loop())
        future: asyncio.Future[ipc.Outcome] = asyncio.get_running_loop().create_future()
        try:
            link.exchange(ipc.frame_prefix(b"{}", 0), [], future.set_result)
            return await future
        finally:
            link.close()
            b.close()

    assert isinstance(asyncio.run(gone()), ipc.FrameError)


def test_an_idle_link_notices_its_worker_leave() -> None:
    async def scenario() -> bool:
        a, b = socket.socketpair()
        link = ipc.WorkerLink(a, asyncio.get_running_loop())
        b.close()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if link.closed:
                break
        closed = link.closed
        link.close()
        return closed

    assert asyncio.run(scenario())


def test_layouts_refuse_sizes_that_do_not_fit() -> None:
    assert ipc.layout([["a", "FP32", [2, 3], 24], ["b", "UINT8", [4], 4]])[1].offset == 24
    for bad in (
        [["a", "FP32", [2, 3], 23]],
        [["a", "FP32", [-1, 3], -12]],
        [["a", "NOPE", [1], 1]],
        [["a", "FP32", [1], 4], ["a", "FP32", [1], 4]],
        "not a list",
    ):
        with pytest.raises(ipc.FrameError):
            ipc.layout(bad)


def test_memo_computes_once_per_key_and_stays_bounded() -> None:
    calls: list[bytes] = []

    def parse(key: bytes) -> int:
        calls.append(key)
        if key == b"bad":
            raise ValueError(key)
        return len(key)

    memo = Memo(parse, size=2)
    assert [memo(b"a"), memo(b"a"), memo(b"bb"), memo(b"a")] == [1, 1, 2, 1]
    assert calls == [b"a", b"bb"]
    for _ in range(2):  # errors are not remembered
        with pytest.raises(ValueError):
            memo(b"bad")
    memo(b"ccc")  # full: forgets everything, then remembers this
    memo(b"a")
    assert calls == [b"a", b"bb", b"bad", b"bad", b"ccc", b"a"]


def test_a_stale_link_is_retried_on_a_fresh_one_but_a_request_taken_whole_is_not(
    tmp_path: Any,
) -> None:
    from modelloader_gateway.errors import WorkerUnavailable
    from modelloader_gateway.worker_client import WorkerClients

    path = str(tmp_path / "w.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    accepted: list[int] = []
    kept: list[socket.socket] = []

    def answer(conn: socket.socket, reader: ipc.FrameReader) -> None:
        slots = ipc.layout(ipc.parse_header(reader.read_head())["inputs"])
        arrays = ipc.views(slots, reader.read_payload())
        entries, buffers = ipc.describe({k: v + 1 for k, v in arrays.items()})
        ipc.write_frame(conn, ipc.encode_header({"outputs": entries}), buffers)

    def worker() -> None:
        # 1st connection: answers once, then stops reading (a write to it fails) without
        # closing (the gateway does not see it go). 2nd: answers once, then takes a request
        # whole and dies without a byte of reply.
        conn, _ = listener.accept()
        accepted.append(0)
        answer(conn, ipc.FrameReader(conn))
        conn.shutdown(socket.SHUT_RD)
        kept.append(conn)
        conn, _ = listener.accept()
        accepted.append(1)
        reader = ipc.FrameReader(conn)
        answer(conn, reader)
        reader.read_head()
        reader.read_payload()
        conn.close()

    threading.Thread(target=worker, daemon=True).start()
    x = {"x": np.arange(4, dtype=np.float32)}

    async def scenario() -> list[Any]:
        clients = WorkerClients()
        first = await infer_worker(clients, f"unix:{path}", x, [])
        second = await infer_worker(
            clients, f"unix:{path}", x, []
        )  # the stale link, then a fresh one
        try:
            await infer_worker(clients, f"unix:{path}", x, [])
        except WorkerUnavailable as error:
            third: Any = error
        clients.close()
        return [first.outputs["x"], second.outputs["x"], third]

    first, second, third = asyncio.run(scenario())
    np.testing.assert_array_equal(first, np.arange(4) + 1)
    np.testing.assert_array_equal(second, np.arange(4) + 1)
    assert isinstance(third, WorkerUnavailable) and "went away" in str(third)
    assert accepted == [0, 1]  # the request taken whole was not sent to a third connection
    listener.close()
    for conn in kept:
        conn.close()
