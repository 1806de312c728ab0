"""The data plane's callback-taking calls as coroutines, for tests that drive them directly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from modelloader.resource import LoadedModel
from modelloader.worker_names import WorkerName
from modelloader_gateway.dataplane import DataPlane, InferResult
from modelloader_gateway.errors import DataPlaneError
from modelloader_gateway.worker_client import WorkerClients, WorkerReply, request_prefix
from modelloader_workers.fetching import SourceRequest
from modelloader_workers.wire import ipc
from modelloader_workers.wire.address import Address
from modelloader_workers.wire.identity import WorkerIdentity

T = TypeVar("T")


async def completion(start: Callable[[Callable[[T | DataPlaneError], None]], None]) -> T:
    """What a callback-taking call (`start(done)`) gives `done`, awaited; its error raised."""
    future: asyncio.Future[T | DataPlaneError] = asyncio.get_running_loop().create_future()

    def settle(got: T | DataPlaneError) -> None:
        if not future.done():
            future.set_result(got)

    start(settle)
    got = await future
    if isinstance(got, DataPlaneError):
        raise got
    return got


async def infer_worker(
    clients: WorkerClients,
    address: Address | str,
    inputs: Mapping[str, np.ndarray[Any, Any]],
    outputs: Sequence[str] = (),
) -> WorkerReply:
    """One request to the worker at `address`, through the gateway's links."""
    where = address if isinstance(address, Address) else Address.parse(address)
    entries, buffers = ipc.describe(inputs)
    prefix = request_prefix(entries, outputs)
    return await completion(lambda done: clients.submit(where, prefix, buffers, done))


async def infer(
    dataplane: DataPlane,
    origin: str,
    name: str,
    inputs: Mapping[str, np.ndarray[Any, Any]],
    outputs: Sequence[str] = (),
) -> InferResult:
    """One request through the data plane's core, as a transport would send it."""
    return await completion(
        lambda done: dataplane.submit(origin, name, None, inputs, outputs, done)
    )


def from_file(path: Path) -> SourceRequest:
    """A worker's source for a model file on this machine."""
    return SourceRequest(f"file://{path}")


def identity(model: LoadedModel, worker_id: str | None = None, replica: int = 0) -> WorkerIdentity:
    """Whom a worker started directly through the Ray adapter serves."""
    name = worker_id or WorkerName(model.key, model.fingerprint, replica).format()
    return WorkerIdentity(
        model.key, model.spec.origin, model.fingerprint, model.generation, name, replica
    )
