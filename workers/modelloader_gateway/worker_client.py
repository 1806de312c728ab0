"""The gateway's persistent connections to workers' data-path sockets.

A pool per worker address: a request takes an idle link or opens one, and gives it back when
the answer is read. A link that fails is dropped, never reused; an idle link the worker closes
drops itself. The request's tensors go from the HTTP body to the socket without a copy
(`ipc.WorkerLink` writes them with one gather write).

`submit` takes a completion callback, so a reply is turned into an answer in the same pass of
the event loop that read it. Each worker's requests in flight are counted, so the data plane
can send the next request to the least busy replica.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from modelloader_workers.wire import ipc
from modelloader_workers.wire.address import Address
from modelloader_workers.wire.memo import Memo

from modelloader_gateway.errors import (
    BadRequest,
    DataPlaneError,
    InferenceFailed,
    WorkerUnavailable,
)


@dataclass(frozen=True)
class WorkerReply:
    outputs: dict[str, np.ndarray[Any, Any]]
    queue_seconds: float
    invoke_seconds: float
    batch: int = 1  # items of the invoke, on one reply per invoke (ipc.Reply.batch)


Done = Callable[[WorkerReply | DataPlaneError], None]


@dataclass(frozen=True)
class _Waiting:
    prefix: bytes
    buffers: Sequence[Any]
    done: Done
    since: float


class WorkerClients:
    """At most `max_links_per_worker` links to one worker; more requests at once wait here,
    first come first served, for a link to come free. A worker serves its connections from
    one thread and the interpreter runs one call at a time, so more links would only move the
    queue into its sockets, and a worker must not be opened unbounded connections."""

    def __init__(self, max_links_per_worker: int = 64) -> None:
        self._idle: dict[Address, list[ipc.WorkerLink]] = {}
        self._links: dict[Address, int] = {}  # open or opening, per worker
        self._waiting: dict[Address, deque[_Waiting]] = {}
        self._in_flight: dict[Address, int] = {}  # submitted and not yet done, per worker
        self._max_links = max_links_per_worker
        self._connecting: set[asyncio.Task[None]] = set()

    def in_flight(self, address: Address) -> int:
        """Requests sent to (or waiting for) the worker at `address` and not yet answered."""
        return self._in_flight.get(address, 0)

    def submit(self, address: Address, prefix: bytes, buffers: Sequence[Any], done: Done) -> None:
        """Send a request frame (`request_prefix`, then the tensors' buffers in its order) to
        the worker at `address`; `done` gets the reply or the error, exactly once, possibly
        before this returns. The buffers must stay as they are until then."""
        in_flight = self._in_flight
        in_flight[address] = in_flight.get(address, 0) + 1

        def counted(outcome: WorkerReply | DataPlaneError) -> None:
            left = in_flight.get(address, 1) - 1
            if left > 0:
                in_flight[address] = left
            else:
                in_flight.pop(address, None)
            done(outcome)

        self._submit(address, prefix, buffers, counted)

    def _submit(self, address: Address, prefix: bytes, buffers: Sequence[Any], done: Done) -> None:
        link = self._take_idle(address)
        if link is not None:
            self._send(address, link, _Waiting(prefix, buffers, done, 0.0), retry=True)
        elif self._links.get(address, 0) < self._max_links:
            self._connect_then_send(address, _Waiting(prefix, buffers, done, 0.0))
        else:
            waiting = _Waiting(prefix, buffers, done, time.perf_counter())
            self._waiting.setdefault(address, deque()).append(waiting)

    def _take_idle(self, address: Address) -> ipc.WorkerLink | None:
        idle = self._idle.get(address)
        while idle:
            link = idle.pop()
            if not link.closed:
                return link
        return None

    def _send(self, address: Address, link: ipc.WorkerLink, request: _Waiting, retry: bool) -> None:
        def on_reply(outcome: ipc.Outcome) -> None:
            if not isinstance(outcome, ipc.Reply):
                if retry and not link.sent:
                    # An idle link that went stale (its worker restarted) before the request
                    # was all written: one fresh try. A request the worker took whole and
                    # then died on is not sent again: it may be what killed it.
                    self._connect_then_send(address, request)
                    return
                # Taken whole by the worker or not: a request it never took may go elsewhere.
                request.done(
                    WorkerUnavailable(
                        f"the model's worker went away: {outcome}", accepted=link.sent
                    )
                )
                return
            self._release(address, link)
            request.done(_reply(outcome))

        link.exchange(request.prefix, request.buffers, on_reply, request.since)

    def _connect_then_send(self, address: Address, request: _Waiting) -> None:
        self._links[address] = self._links.get(address, 0) + 1

        async def connect() -> None:
            try:
                link = await ipc.WorkerLink.connect(address, lambda: self._lost(address))
            except OSError as error:
                self._lost(address)
                request.done(WorkerUnavailable(f"cannot reach the model's worker: {error}"))
            else:
                self._send(address, link, request, retry=False)

        task = asyncio.get_running_loop().create_task(connect())
        self._connecting.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._connecting.discard)

    def _release(self, address: Address, link: ipc.WorkerLink) -> None:
        """A link whose exchange is over: the next waiting request's, or idle."""
        if link.closed:
            return
        waiting = self._waiting.get(address)
        if waiting:
            self._send(address, link, waiting.popleft(), retry=True)
            return
        idle = self._idle.setdefault(address, [])
        if len(idle) < self._max_links:
            idle.append(link)
        else:
            link.close()

    def _lost(self, address: Address) -> None:
        """A link to `address` closed (or never opened): a waiting request may open one."""
        left = self._links.get(address, 1) - 1
        if left > 0:
            self._links[address] = left
        else:
            self._links.pop(address, None)
        waiting = self._waiting.get(address)
        if waiting:
            self._connect_then_send(address, waiting.popleft())
        elif waiting is not None:
            del self._waiting[address]

    def forget_except(self, addresses: set[Address]) -> None:
        """Close pooled links to workers no longer published."""
        for address in list(self._idle):
            if address not in addresses:
                for link in self._idle.pop(address):
                    link.close()

    def close(self) -> None:
        self.forget_except(set())


def request_prefix(entries: Sequence[ipc.TensorEntry], outputs: Sequence[str]) -> bytes:
    """A request frame's prefix and header, for inputs described by `ipc.describe`."""
    header = ipc.encode_header({"inputs": list(entries), "outputs": list(outputs)})
    return ipc.frame_prefix(header, sum(int(e[3]) for e in entries))


class _WorkerError(Exception):
    def __init__(self, error: DataPlaneError) -> None:
        self.error = error


def _reply_layout(header: bytes) -> tuple[ipc.TensorSlot, ...]:
    """The outputs' layout a reply header describes; `_WorkerError` for the worker's error or
    a malformed header. Remembered per header bytes: a model's replies repeat one header."""
    try:
        parsed = ipc.parse_header(header)
        if "error" in parsed:
            status = int(parsed.get("status", 500))
            kind = BadRequest if status == 400 else InferenceFailed
            raise _WorkerError(kind(str(parsed["error"])))
        return ipc.layout(parsed["outputs"])
    except (ipc.FrameError, KeyError, TypeError, ValueError) as error:
        raise _WorkerError(InferenceFailed(f"the worker's reply is malformed: {error}")) from None


_reply_layouts = Memo(_reply_layout)  # errors are not remembered


def _reply(reply: ipc.Reply) -> WorkerReply | DataPlaneError:
    try:
        outputs = ipc.views(_reply_layouts(reply.header), reply.payload)
    except _WorkerError as failed:
        return failed.error
    except ipc.FrameError as error:
        return InferenceFailed(f"the worker's reply is malformed: {error}")
    return WorkerReply(outputs, reply.queue_seconds, reply.invoke_seconds, reply.batch)
