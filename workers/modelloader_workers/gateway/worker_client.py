"""The gateway's persistent connections to workers' data-path sockets.

A pool per worker address: a request takes an idle connection or opens one, and gives it back
when the answer is read. A connection that fails, or whose exchange was cancelled halfway, is
dropped, never reused. The request's tensors go from the HTTP body to the socket without a
copy (`ipc.AsyncFrameSocket` writes them with one gather write).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelloader_workers import ipc
from modelloader_workers.gateway.errors import BadRequest, InferenceFailed, WorkerUnavailable

_Connection = ipc.AsyncFrameSocket


@dataclass(frozen=True)
class WorkerReply:
    outputs: dict[str, np.ndarray[Any, Any]]
    queue_seconds: float
    invoke_seconds: float


class WorkerClients:
    def __init__(self, max_idle_per_worker: int = 64) -> None:
        self._idle: dict[str, list[_Connection]] = {}
        self._max_idle = max_idle_per_worker

    async def infer(
        self,
        address: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Sequence[str],
    ) -> WorkerReply:
        entries, buffers = ipc.describe(inputs)
        header = {"inputs": entries, "outputs": list(outputs)}
        reused, connection = await self._acquire(address)
        try:
            reply, payload = await self._exchange(connection, header, buffers)
        except (ipc.FrameError, OSError) as error:  # _exchange closed the connection
            if not reused:
                raise WorkerUnavailable(f"the model's worker went away: {error}") from None
            # An idle connection may have gone stale (the worker restarted): one fresh try.
            _, connection = await self._acquire(address, fresh=True)
            try:
                reply, payload = await self._exchange(connection, header, buffers)
            except (ipc.FrameError, OSError) as error2:
                raise WorkerUnavailable(f"the model's worker went away: {error2}") from None
        self._release(address, connection)
        if "error" in reply:
            status = int(reply.get("status", 500))
            raise (BadRequest if status == 400 else InferenceFailed)(str(reply["error"]))
        return WorkerReply(
            outputs=ipc.tensors_from(reply["outputs"], payload),
            queue_seconds=float(reply.get("queue_seconds", 0.0)),
            invoke_seconds=float(reply.get("invoke_seconds", 0.0)),
        )

    async def _exchange(
        self, connection: _Connection, header: Mapping[str, Any], buffers: Sequence[Any]
    ) -> tuple[dict[str, Any], bytearray]:
        try:
            return await connection.exchange(header, buffers)
        except BaseException:
            # Failed or cancelled halfway: what is left on the connection is out of step.
            _close(connection)
            raise

    async def _acquire(self, address: str, fresh: bool = False) -> tuple[bool, _Connection]:
        idle = self._idle.get(address)
        if idle and not fresh:
            return True, idle.pop()
        try:
            connection = await ipc.AsyncFrameSocket.connect(address)
        except ValueError:
            raise WorkerUnavailable(f"unsupported worker address {address!r}") from None
        except OSError as error:
            raise WorkerUnavailable(f"cannot reach the model's worker: {error}") from None
        return False, connection

    def _release(self, address: str, connection: _Connection) -> None:
        idle = self._idle.setdefault(address, [])
        if len(idle) < self._max_idle:
            idle.append(connection)
        else:
            _close(connection)

    def forget_except(self, addresses: set[str]) -> None:
        """Close pooled connections to workers no longer published."""
        for address in list(self._idle):
            if address not in addresses:
                for connection in self._idle.pop(address):
                    _close(connection)

    def close(self) -> None:
        self.forget_except(set())


def _close(connection: _Connection) -> None:
    with contextlib.suppress(Exception):
        connection.close()
