"""The worker's side of the data path: answers inference frames on a Unix socket.

Runs in the worker process (the Ray actor), in threads of its own, so requests never queue
behind Ray's task machinery. One lock serialises calls into the interpreter, which is not
thread-safe; connections are persistent, one per in-flight gateway request.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelloader_workers import ipc
from modelloader_workers.litert_runner import InPlaceRunner, Runner
from modelloader_workers.signature import InvalidRequest, check_inputs, check_outputs
from modelloader_workers.tensor_types import v2_datatype

log = logging.getLogger(__name__)

# Ray starts worker processes at niceness 15 (`worker_niceness`), which is right for batch tasks
# and wrong for a data path: anything else runnable on the node at the default priority, the
# gateway included, then gets the cores first, and measured on a busy 2-core machine that added
# about 1.8 ms to a MobileNetV2 request. The threads that answer requests and run the
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


_Frame = tuple[bytes, list[Any], float, float]  # header, buffers, queue and invoke seconds
_OutputsKey = tuple[tuple[str, ...], tuple[tuple[str, tuple[int, ...]], ...]]

# Connections served at once; more wait in the listen backlog. The interpreter runs one call
# at a time anyway, and each connection's thread reserves a stack in the memory budget.
MAX_CONNECTIONS = 32


class WorkerServer:
    def __init__(
        self, runner: Runner, listen: str, thread_setup: Callable[[], object] | None = None
    ) -> None:
        """`listen` is "unix:/path" (one machine: `modelloader local`, tests) or "tcp:HOST"
        (a cluster: the gateway runs on another node; the port is chosen here, and network
        policy lets only the gateway in). `thread_setup` runs first in the accept thread,
        whose connection threads inherit what it sets (the sandbox)."""
        self._runner = runner
        self._thread_setup = thread_setup
        self._lock = threading.Lock()
        self.socket_path: str | None = None
        kind, _, where = listen.partition(":")
        if kind == "unix":
            self.socket_path = where
            with contextlib.suppress(FileNotFoundError):
                os.unlink(where)  # a stale socket of a worker that died before us
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(where)
            os.chmod(where, 0o600)  # only our user: the gateway runs as the same user
            self.address = listen
        elif kind == "tcp":
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.bind((where, 0))
            host, port = self._listener.getsockname()[:2]
            self.address = f"tcp:{host}:{port}"
        else:
            raise ValueError(f"cannot listen on {listen!r}: use unix:/path or tcp:HOST")
        self._listener.listen(128)
        if not serve_at_default_priority():
            log.info("the data path keeps Ray's worker niceness: no permission to raise it")
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._plans = ipc.Memo(self._plan)
        self._replies = ipc.Memo(self._reply_header)
        self._open: set[socket.socket] = set()  # connections being served, closed by close()
        threading.Thread(target=self._accept_loop, name="ipc-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        if self._thread_setup is not None:
            self._thread_setup()
        while True:
            self._slots.acquire()
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="ipc-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        self._open.add(conn)
        try:
            self._serve_connection(conn)
        finally:
            self._open.discard(conn)
            self._slots.release()

    def _serve_connection(self, conn: socket.socket) -> None:
        ipc.tune(conn)
        reader = ipc.FrameReader(conn)
        with conn:
            while True:
                try:
                    header = self._plans(bytes(reader.read_head()))
                    if isinstance(header, str):
                        reader.skip_payload()
                        reply = self._error(header, 400)
                    else:
                        reply = self._answer(header, reader)
                except (ipc.FrameError, OSError):
                    return
                try:
                    ipc.write_frame(conn, *reply)
                except OSError:
                    return

    def _plan(self, header: bytes) -> _Plan | str:
        """What a request header asks, checked against the model (a message when it does
        not fit). Remembered per header bytes: the same shapes send the same header."""
        signature = self._runner.signature
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
        runner = self._runner
        try:
            if isinstance(runner, InPlaceRunner):
                queued = time.perf_counter()
                with self._lock:
                    started = time.perf_counter()
                    runner.resize({s.name: s.shape for s in plan.inputs})
                    # Straight into the interpreter's input tensors: the lock is free at
                    # once when requests come one by one, and under load it is taken only
                    # after the gateway's one write of the whole frame has long landed.
                    buffers = runner.input_buffers([s.name for s in plan.inputs])
                    reader.read_payload_into(buffers)
                    del buffers
                    outputs = runner.invoke()
            else:
                inputs = ipc.views(plan.inputs, reader.read_payload())
                queued = time.perf_counter()
                with self._lock:
                    started = time.perf_counter()
                    outputs = runner.run(inputs)
            finished = time.perf_counter()
        except (ipc.FrameError, OSError):
            raise
        except Exception as error:  # LiteRT's runtime errors: the request failed, not us
            log.warning("inference failed: %s", error)
            return self._error(f"inference failed: {error}", 500)
        arrays = [outputs[name] for name in plan.outputs]
        shapes = tuple((a.dtype.str, a.shape) for a in arrays)
        return self._replies((plan.outputs, shapes)), arrays, started - queued, finished - started

    @staticmethod
    def _reply_header(key: _OutputsKey) -> bytes:
        """The reply's header for outputs of these names, types and shapes."""
        names, shapes = key
        entries = []
        for name, (dtype_str, shape) in zip(names, shapes, strict=True):
            dtype = np.dtype(dtype_str)
            nbytes = math.prod(shape) * dtype.itemsize
            entries.append([name, v2_datatype(dtype), list(shape), nbytes])
        return ipc.encode_header({"outputs": entries})

    @staticmethod
    def _error(message: str, status: int) -> _Frame:
        return ipc.encode_header({"error": message, "status": status}), [], 0.0, 0.0

    def close(self) -> None:
        """Stop serving: no new connections, and open ones are cut (an unloaded model in a
        shared process must not keep answering). shutdown() wakes a thread blocked in
        accept(), which close() alone does not on Linux."""
        for sock in [self._listener, *list(self._open)]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
