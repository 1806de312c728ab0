"""The worker's side of the data path: answers inference frames on a Unix (or TCP) socket.

Runs in the model process (`model_process`), in a thread of its own: the gateway talks to
it directly, one hop, never through Ray. One thread serves every connection to a model: it
waits for any of them to have a frame, reads it, runs the interpreter and answers, then looks
again. Nothing else in the process wakes while the interpreter runs: on a small machine every
other thread scheduled beside the interpreter's stalls an invoke for far longer than it runs
itself (a thread per connection cost about a quarter of the throughput under load:
bench/RESULTS.md). Requests that arrive meanwhile wait in their sockets, and the gateway
counts that wait (`queue_seconds`).

With `spec.batching` the same thread reads every request that is ready, holds them as the
batching rules say (`batching.next_batch`: full, a preferred size, or the queue delay passed)
and runs each batch as one invoke (`batch_runner`); a request's connection is not read again
until it is answered, as the gateway sends one request per connection at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from modelloader_workers import c_library
from modelloader_workers.batch_runner import BatchRunner
from modelloader_workers.batching import BatchPolicy, Run, Wait, Waiting, next_batch
from modelloader_workers.listeners import listen
from modelloader_workers.litert_runner import InPlaceRunner, Runner
from modelloader_workers.wire import ipc
from modelloader_workers.wire.address import Address
from modelloader_workers.wire.memo import Memo
from modelloader_workers.wire.signature import InvalidRequest, check_inputs, check_outputs

log = logging.getLogger(__name__)

# Ray starts worker processes at niceness 15 (`worker_niceness`), which is right for batch tasks
# and wrong for a data path: anything else runnable on the node at the default priority, the
# gateway included, then gets the cores first (bench/RESULTS.md). The threads that answer
# requests and run the
# interpreter (its XNNPACK pool threads too) go back to the default where the process may.
SERVING_NICENESS = 0


def serve_at_default_priority() -> bool:
    """Every thread of this process at SERVING_NICENESS, where the process may raise its own
    priority (CAP_SYS_NICE or RLIMIT_NICE); threads started later inherit it. False where it
    may not: the data path then runs as Ray started it."""
    done = True
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        tid = int(task)
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > SERVING_NICENESS:
                os.setpriority(os.PRIO_PROCESS, tid, SERVING_NICENESS)
        except PermissionError:
            done = False
        except OSError:
            continue  # the thread ended meanwhile
    return done


@dataclass(frozen=True, slots=True)
class _Plan:
    inputs: tuple[ipc.TensorSlot, ...]
    outputs: tuple[str, ...]


_Frame = tuple[bytes, list[Any], float, int]  # header, buffers, invoke seconds, batch items


@dataclass(slots=True)
class _Queued:
    """A request read and held for a batch."""

    conn: socket.socket
    plan: _Plan
    inputs: dict[str, Any]
    waiting: Waiting


# Connections served at once; more wait in the listen backlog until one closes. A gateway
# keeps at most 64 links to a worker (`WorkerClients`), so this leaves room for eight.
MAX_CONNECTIONS = 512
# A frame whose rest does not arrive this long after its start drops its connection: the
# gateway writes a frame whole, so only a broken peer takes that long, and meanwhile it would
# hold up every other connection of this one serving thread.
FRAME_SECONDS = 10


# How late a timed wait of the serving thread wakes, at the median, on the machines measured
# (bench/RESULTS.md, "Batching"), its timer slack tightened: a batch's wait is cut short by
# this much.
WAKE_LATE = 0.00009

_PR_SET_TIMERSLACK = 29


def tighten_timer_slack() -> bool:
    """End the calling thread's timed waits on time. Linux lets a thread's timer fire up to
    its timer slack late (50 us by default) to wake several at once; a batch's queue delay is
    one or two timed waits of the serving thread, each otherwise that much later. Per thread
    (`prctl(PR_SET_TIMERSLACK)`); False where it cannot be set."""
    if not c_library.name():
        return False
    libc = c_library.handle()
    return hasattr(libc, "prctl") and libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0


def _whole_ms(timeout: float | None) -> float | None:
    """A wait for epoll, which rounds up to whole milliseconds: rounded down instead, so a
    batch's delay is not overshot (the rest is slept: `_serve_batches`)."""
    if timeout is None:
        return None
    return int(timeout * 1000) / 1000


class WorkerServer:
    def __init__(
        self,
        runner: Runner,
        listen_at: Address | tuple[socket.socket, Address],
        batching: BatchPolicy | None = None,
    ) -> None:
        """Serves `runner` on a listener (see `listen`): one already made, with its address,
        or made here from an address. With `batching`, the runner must have passed
        `batch_runner.check_batchable`."""
        self._runner = runner
        self._batching = batching
        self._batcher = BatchRunner(runner) if batching is not None else None
        # What requests are checked against (and what the worker publishes).
        self.signature = (
            runner.signature.batched(batching.max_batch_size)
            if batching is not None
            else runner.signature
        )
        self._queued: list[_Queued] = []
        # Decided once: a check against a runtime protocol costs tens of microseconds.
        self._in_place = runner if isinstance(runner, InPlaceRunner) else None
        # A socket file made here is removed here; one handed over is its maker's to remove.
        self.socket_path: str | None = None
        if isinstance(listen_at, Address):
            listen_at = listen(listen_at)
            if listen_at[1].kind == "unix":
                self.socket_path = listen_at[1].where
        self._listener, self.address = listen_at
        if not serve_at_default_priority():
            log.info("the data path keeps its inherited niceness: no permission to raise it")
        self._plans = Memo(self._plan)
        self._replies: Memo[tuple[Any, ...], bytes] = Memo()
        self._readers: dict[socket.socket, ipc.FrameReader] = {}
        self._closed = False
        threading.Thread(target=self._serve, name="ipc-serve", daemon=True).start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector, contextlib.ExitStack() as cleanup:
            cleanup.callback(self._close_connections)
            selector.register(self._listener, selectors.EVENT_READ)
            if self._batching is not None:
                self._serve_batches(selector)
                return
            while not self._closed:
                for key, _ in selector.select():
                    if key.fileobj is self._listener:
                        if not self._accept(selector):
                            return  # closed
                    else:
                        conn = key.fileobj
                        assert isinstance(conn, socket.socket)
                        if not self._serve_frame(conn):
                            self._drop(selector, conn)

    def _serve_batches(self, selector: selectors.BaseSelector) -> None:
        policy = self._batching
        assert policy is not None
        if policy.max_queue_delay_seconds:
            tighten_timer_slack()
        timeout: float | None = None
        while not self._closed:
            ready = selector.select(_whole_ms(timeout))
            if (
                len(ready) == 1
                and not self._queued
                and not policy.max_queue_delay_seconds
                and ready[0][0].fileobj is not self._listener
            ):
                # A lone request with no delay to wait: it would be a batch of one, so it
                # takes the unbatched path, straight into the interpreter's inputs.
                conn = ready[0][0].fileobj
                assert isinstance(conn, socket.socket)
                if not self._serve_frame(conn):
                    self._drop(selector, conn)
                continue
            for key, _ in ready:
                if key.fileobj is self._listener:
                    if not self._accept(selector):
                        return  # closed
                else:
                    conn = key.fileobj
                    assert isinstance(conn, socket.socket)
                    if not self._take_frame(conn, selector):
                        self._drop(selector, conn)
            timeout = None
            while self._queued:
                # As of when a wait would end: a timer wakes this thread late (see
                # WAKE_LATE), so the queue delay, a maximum, is kept on average too.
                decision = next_batch(
                    [q.waiting for q in self._queued], policy, time.perf_counter() + WAKE_LATE
                )
                if isinstance(decision, Wait):
                    timeout = max(0.0, decision.seconds)
                    if timeout < 0.001:
                        # epoll waits in whole milliseconds (rounded up): the last fraction
                        # of a delay is slept, and what arrived meanwhile is read next.
                        time.sleep(timeout)
                        timeout = 0.0
                    break
                assert isinstance(decision, Run)
                self._run_batch(selector, decision.take)

    def _close_connections(self) -> None:
        for conn in list(self._readers):
            conn.close()
        self._readers.clear()

    def _accept(self, selector: selectors.BaseSelector) -> bool:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return not self._closed  # closed, or a connection gone before we took it
        ipc.tune(conn)
        with contextlib.suppress(OSError):  # a blocking read mid-frame gives up after this
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, ipc.timeval(FRAME_SECONDS))
        self._readers[conn] = ipc.FrameReader(conn)
        selector.register(conn, selectors.EVENT_READ)
        if len(self._readers) >= MAX_CONNECTIONS:  # the next wait in the backlog
            selector.unregister(self._listener)
        return True

    def _drop(self, selector: selectors.BaseSelector, conn: socket.socket) -> None:
        selector.unregister(conn)
        self._forget(selector, conn)

    def _forget(self, selector: selectors.BaseSelector, conn: socket.socket) -> None:
        """Close a connection the selector no longer watches; take new ones again if full."""
        self._readers.pop(conn, None)
        conn.close()
        if len(self._readers) == MAX_CONNECTIONS - 1 and not self._closed:
            selector.register(self._listener, selectors.EVENT_READ)

    def _take_frame(self, conn: socket.socket, selector: selectors.BaseSelector) -> bool:
        """Read one frame of `conn`: answer it now if it is wrong, else hold it for a batch
        (and leave `conn` unread until then). False when the connection is done."""
        reader = self._readers[conn]
        try:
            received = time.perf_counter()
            plan = self._plans(bytes(reader.read_head()))
            if isinstance(plan, str):
                reader.skip_payload()
                body, buffers, invoke_seconds, batch = self._error(plan, 400)
                service = time.perf_counter() - received
                ipc.write_frame(conn, body, buffers, service, invoke_seconds, batch)
                return True
            if reader.payload_len != ipc.payload_size(plan.inputs):
                raise ipc.FrameError("the payload does not match its header")
            # Valid until this connection's next frame, which comes after the answer.
            inputs = ipc.views(plan.inputs, reader.read_payload())
        except (ipc.FrameError, OSError):
            return False
        shapes = tuple((s.name, s.dtype.str, s.shape[1:]) for s in plan.inputs)
        items = plan.inputs[0].shape[0] if plan.inputs and plan.inputs[0].shape else 1
        waiting = Waiting((shapes, plan.outputs), items, received)
        self._queued.append(_Queued(conn, plan, inputs, waiting))
        selector.unregister(conn)
        return True

    def _run_batch(self, selector: selectors.BaseSelector, take: tuple[int, ...]) -> None:
        chosen = set(take)
        batch = [q for i, q in enumerate(self._queued) if i in chosen]
        self._queued = [q for i, q in enumerate(self._queued) if i not in chosen]
        assert self._batcher is not None
        started = time.perf_counter()
        results, invoked = self._batcher.run([q.inputs for q in batch])
        items = sum(q.waiting.items for q in batch)
        lead = True
        for queued, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                log.warning("inference failed: %s", result)
                frame = self._error(f"inference failed: {result}", 500)
            else:
                frame = self._reply(queued.plan, result, invoked, items if lead else 0)
                lead = False
            body, buffers, invoke_seconds, count = frame
            conn = queued.conn
            try:
                ipc.write_frame(
                    conn, body, buffers, time.perf_counter() - started, invoke_seconds, count
                )
            except OSError:
                self._forget(selector, conn)  # held for the batch: not in the selector
                continue
            if not self._closed:
                selector.register(conn, selectors.EVENT_READ)

    def _serve_frame(self, conn: socket.socket) -> bool:
        """Read one frame of `conn` and answer it; False when the connection is done."""
        reader = self._readers[conn]
        try:
            received = time.perf_counter()
            header = self._plans(bytes(reader.read_head()))
            if isinstance(header, str):
                reader.skip_payload()
                reply = self._error(header, 400)
            else:
                reply = self._answer(header, reader)
            body, buffers, invoke_seconds, batch = reply
            service = time.perf_counter() - received
            ipc.write_frame(conn, body, buffers, service, invoke_seconds, batch)
        except (ipc.FrameError, OSError):
            return False
        return True

    def _plan(self, header: bytes) -> _Plan | str:
        """What a request header asks, checked against the model (a message when it does
        not fit). Remembered per header bytes: the same shapes send the same header."""
        signature = self.signature
        try:
            parsed = ipc.parse_header(header)
            slots = ipc.layout(parsed.get("inputs", []))
            # The gateway checked already; checking again costs microseconds (once per
            # header) and means a confused peer gets a message instead of a LiteRT crash.
            check_inputs(signature, {s.name: (s.datatype, s.shape) for s in slots})
            wanted = parsed.get("outputs") or [t.name for t in signature.outputs]
            check_outputs(signature, wanted)
        except (InvalidRequest, ipc.FrameError, ValueError, TypeError) as error:
            return str(error)
        return _Plan(slots, tuple(str(w) for w in wanted))

    def _answer(self, plan: _Plan, reader: ipc.FrameReader) -> _Frame:
        if reader.payload_len != ipc.payload_size(plan.inputs):
            raise ipc.FrameError("the payload does not match its header")
        runner = self._in_place
        try:
            if runner is not None:
                try:
                    # With batching, the first dimension may differ from the model's own.
                    strict = self._batching is None
                    runner.resize({s.name: s.shape for s in plan.inputs}, strict=strict)
                    # Straight into the interpreter's input tensors: no copy through a buffer
                    # of our own, then into the tensors.
                    buffers = runner.input_buffers([s.name for s in plan.inputs])
                except Exception:
                    reader.skip_payload()  # the connection stays in step
                    raise
                reader.read_payload_into(buffers)
                del buffers
                started = time.perf_counter()
                outputs = runner.invoke()
            else:
                inputs = ipc.views(plan.inputs, reader.read_payload())
                started = time.perf_counter()
                outputs = self._runner.run(inputs)
            finished = time.perf_counter()
        except (ipc.FrameError, OSError):
            raise
        except Exception as error:  # LiteRT's runtime errors: the request failed, not us
            log.warning("inference failed: %s", error)
            return self._error(f"inference failed: {error}", 500)
        items = plan.inputs[0].shape[0] if self._batching and plan.inputs[0].shape else 1
        return self._reply(plan, outputs, finished - started, items)

    def _reply(
        self, plan: _Plan, outputs: dict[str, Any], invoke_seconds: float, batch: int
    ) -> _Frame:
        wanted = {name: outputs[name] for name in plan.outputs}
        entries, arrays = ipc.describe(wanted)
        # The reply's header, made once per output names, types and shapes.
        key = (plan.outputs, tuple((a.dtype.str, a.shape) for a in arrays))
        header = self._replies.get(key, lambda _: ipc.encode_header({"outputs": entries}))
        return header, arrays, invoke_seconds, batch

    @staticmethod
    def _error(message: str, status: int) -> _Frame:
        return ipc.encode_header({"error": message, "status": status}), [], 0.0, 0

    def close(self) -> None:
        """Stop serving: no new connections, and open ones are cut (an unloaded model in a
        shared process must not keep answering). shutdown() wakes the serving thread from
        its wait, which close() alone does not on Linux."""
        self._closed = True
        for sock in [self._listener, *list(self._readers)]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
