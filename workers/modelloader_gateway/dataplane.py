"""The transport-independent core of the gateway (after KServe's `protocol/dataplane.py`):
health, model metadata, readiness and inference, with typed errors. REST (and gRPC) are thin
layers on top: one place for lookup, access, limits and errors.

Requests go to the ready replica with the fewest requests in flight. One that a replica never
took (it died, or could not be reached) goes to another, and so does, once, one it took and
died on: a replica lost under load costs its clients nothing. A request that killed its replica
may kill the one it is retried on too, and no more: the control plane sees each death, and a
model whose replicas keep dying is stopped (crash loop).

A model scaled to zero has no endpoint: its requests are held (counted as load, which wakes it)
until a route table with a ready replica arrives, or for at most `hold_seconds`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
from modelloader_workers.wire import ipc
from modelloader_workers.wire.memo import Memo
from modelloader_workers.wire.signature import (
    InvalidRequest,
    Signature,
    check_inputs,
    check_outputs,
)
from modelloader_workers.wire.tensor_types import UnsupportedDatatype, v2_datatype

from modelloader_gateway.access import AccessTable, OriginAccess, OriginLimiter, authenticate
from modelloader_gateway.errors import (
    BadRequest,
    DataPlaneError,
    ModelNotFound,
    ModelNotReady,
    WorkerUnavailable,
)
from modelloader_gateway.load import LoadMeter
from modelloader_gateway.routes import MODEL_VERSION, Endpoint, Route, Routes
from modelloader_gateway.stats import Statistics
from modelloader_gateway.worker_client import WorkerClients, WorkerReply, request_prefix

SERVER_NAME = "modelloader"
PLATFORM = "tensorflow_lite"
BACKEND = "litert"
# Triton's extensions this server speaks besides the core protocol.
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics")
# How long a request waits for a model scaled to zero to have a replica again.
HOLD_SECONDS = 30.0
# A replica that could not be reached gets no new request for this long, while others can
# take it (the next route table drops it, if it died).
SUSPECT_SECONDS = 2.0

Done = Callable[["InferResult | DataPlaneError"], None]


def server_version() -> str:
    try:
        return metadata.version("modelloader")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return "0+unknown"


@dataclass(frozen=True)
class InferResult:
    outputs: dict[str, np.ndarray[Any, Any]]
    queue_seconds: float
    invoke_seconds: float
    accelerator: str  # what ran it: labels its busy time
    # The items of the invoke that ran it, on one request of each invoke (0 on the others of
    # a batch): executions and batch sizes are counted from it.
    batch: int = 1
    items: int = 1  # this request's items: its batch dimension, for a batched model


@dataclass
class _Held:
    """A request for a model scaled to zero, waiting for a replica."""

    version: str | None
    inputs: Mapping[str, np.ndarray[Any, Any]]
    outputs: Sequence[str]
    done: Done
    timer: asyncio.TimerHandle | None = None


@dataclass(frozen=True)
class _Prepared:
    signature: Signature  # of the model it was checked against
    prefix: bytes  # the worker frame's prefix and header


class DataPlane:
    def __init__(
        self,
        routes: Routes,
        clients: WorkerClients,
        limiter: OriginLimiter | None = None,
        ready: Callable[[], bool] = lambda: True,
        hold_seconds: float = HOLD_SECONDS,
        on_hold: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.routes = routes
        self.clients = clients
        self.limiter = limiter or OriginLimiter()
        self.load = LoadMeter(clock)
        self.stats = Statistics()
        self._ready = ready
        self._hold_seconds = hold_seconds
        self._on_hold = on_hold  # a request waits for a model to wake: tell the control plane
        self._clock = clock
        self._held: dict[tuple[str, str], list[_Held]] = {}
        self._suspect: dict[Any, float] = {}  # endpoint address -> until when
        self._version = server_version()
        self._turn = 0  # where the search for the least busy replica starts: ties rotate
        # Requests checked and framed, per model, input shapes and outputs.
        self._prepared: Memo[tuple[Any, ...], _Prepared] = Memo()

    # Who calls

    def caller(self, authorization: str | None) -> tuple[str, OriginAccess]:
        """The caller's origin and its limits, from one reading of the access table."""
        table: AccessTable = self.routes.access
        origin = authenticate(table, authorization)
        return origin, table.of(origin)

    # Health and metadata

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._ready()

    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": SERVER_NAME,
            "version": self._version,
            "extensions": list(EXTENSIONS),
        }

    def route(self, origin: str, name: str, version: str | None) -> Route:
        route = self.routes.lookup(origin, name)
        if route is None:
            raise ModelNotFound(f"model {name!r} not found")
        if version not in (None, "", route.version):
            raise ModelNotFound(
                f"model {name!r} has no version {version!r}; it has {route.version!r}"
            )
        return route

    def model_ready(self, origin: str, name: str, version: str | None = None) -> bool:
        return self.route(origin, name, version).ready

    def model_metadata(
        self, origin: str, name: str, version: str | None = None, details: bool = False
    ) -> dict[str, Any]:
        """`details`: include where the model runs (node, accelerator, delegate). Off unless
        the origin's policy exposes them: hardware details help fingerprint a device."""
        route = self.route(origin, name, version)
        if route.signature is None:
            raise ModelNotReady(f"model {name!r} is not ready: {route.message or 'loading'}")
        found: dict[str, Any] = {
            "name": name,
            "versions": [route.version],
            "platform": PLATFORM,
            "inputs": [t.to_dict() for t in route.signature.inputs],
            "outputs": [t.to_dict() for t in route.signature.outputs],
        }
        if details and route.placement:
            found["parameters"] = {"placement": dict(route.placement)}
        return found

    def model_config(self, origin: str, name: str, version: str | None = None) -> dict[str, Any]:
        """Triton's model configuration: what the model is (inputs, outputs, batching) and how
        many instances (ready replicas) serve it."""
        route = self.route(origin, name, version)
        if route.signature is None:
            raise ModelNotReady(f"model {name!r} is not ready: {route.message or 'loading'}")
        accelerators = {e.accelerator for e in route.endpoints if e.state == "ready"}
        signature = route.signature
        # Triton's dims leave out the batch dimension when the model batches (max_batch_size
        # above 0); without batching the shapes are whole.
        first = 1 if signature.max_batch_size else 0
        return {
            "name": name,
            "platform": PLATFORM,
            "backend": BACKEND,
            "max_batch_size": signature.max_batch_size,
            "input": [
                _tensor_config(t.name, t.datatype, t.shape[first:]) for t in signature.inputs
            ],
            "output": [
                _tensor_config(t.name, t.datatype, t.shape[first:]) for t in signature.outputs
            ],
            "instance_group": [
                {
                    "name": name,
                    "kind": "KIND_GPU" if accelerators == {"gpu"} else "KIND_CPU",
                    "count": sum(1 for e in route.endpoints if e.state == "ready"),
                }
            ],
        }

    def model_statistics(
        self, origin: str, name: str | None = None, version: str | None = None
    ) -> list[dict[str, Any]]:
        """Triton's statistics of one model, or of every model the caller may see."""
        if name:
            route = self.route(origin, name, version)
            return [self.stats.of((origin, name)).as_triton(name, route.version)]
        return [
            self.stats.of((origin, r.name)).as_triton(r.name, r.version)
            for r in self.routes.table.routes
            if r.origin == origin
        ]

    # Inference

    def admit(self, origin: str, access: OriginAccess, name: str) -> Route:
        """An inference request's door: the model exists for this origin, and the origin is
        within its limits (raises `TooManyRequests`); pair with `leave` once answered."""
        route = self.route(origin, name, None)
        self.limiter.enter(origin, access)
        self.load.enter((origin, name))
        return route

    def leave(self, origin: str, name: str) -> None:
        self.limiter.leave(origin)
        self.load.leave((origin, name))

    def submit(
        self,
        origin: str,
        name: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Sequence[str],
        done: Done,
    ) -> None:
        """Check the request and send it to a replica of the model (or hold it while the
        model wakes from zero). A request that cannot go raises its `DataPlaneError` here;
        once sent or held, `done` gets the result or the error, exactly once (possibly before
        this returns). `inputs` must stay as they are until then: they are sent from where
        they lie."""
        key = (origin, name)
        started = time.perf_counter()
        stats = self.stats

        def counted(result: InferResult | DataPlaneError) -> None:
            elapsed = time.perf_counter() - started
            if isinstance(result, InferResult):
                stats.succeeded(
                    key,
                    elapsed,
                    result.queue_seconds,
                    result.invoke_seconds,
                    result.items,
                    executed=result.batch > 0,
                )
            else:
                stats.failed(key, elapsed)
            done(result)

        try:
            self._submit(origin, name, version, inputs, outputs, counted)
        except DataPlaneError:
            stats.failed(key, time.perf_counter() - started)
            raise

    def _submit(
        self,
        origin: str,
        name: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Sequence[str],
        done: Done,
    ) -> None:
        route = self.route(origin, name, version)
        ready = self._ready_endpoints(route)
        if not ready and route.wakes:
            self._hold((origin, name), _Held(version, inputs, outputs, done))
            return
        if not ready or route.signature is None:
            raise ModelNotReady(f"model {name!r} is not ready: {route.message or 'loading'}")
        signature = route.signature
        shapes = tuple((n, a.dtype.str, a.shape) for n, a in inputs.items())
        # The signature's id stands for it: the remembered value holds the signature, so no
        # other can take its id while the value is remembered.
        prepared = self._prepared.get(
            (id(signature), shapes, tuple(outputs)),
            lambda _: self._prepare(signature, inputs, outputs),
        )
        buffers = [np.ascontiguousarray(a) for a in inputs.values()]
        items = buffers[0].shape[0] if signature.max_batch_size and buffers[0].ndim else 1
        self._send(ready, prepared.prefix, buffers, done, retried=False, items=items)

    def _ready_endpoints(self, route: Route) -> list[Endpoint]:
        ready = [e for e in route.endpoints if e.state == "ready"]
        if self._suspect and len(ready) > 1:
            now = self._clock()
            trusted = [e for e in ready if self._suspect.get(e.address, 0.0) <= now]
            return trusted or ready
        return ready

    def _send(
        self,
        candidates: list[Endpoint],
        prefix: bytes,
        buffers: list[Any],
        done: Done,
        retried: bool,
        items: int = 1,
    ) -> None:
        endpoint = self._least_busy(candidates)

        def replied(reply: WorkerReply | DataPlaneError) -> None:
            if isinstance(reply, WorkerReply):
                done(
                    InferResult(
                        reply.outputs,
                        reply.queue_seconds,
                        reply.invoke_seconds,
                        endpoint.accelerator,
                        reply.batch,
                        items,
                    )
                )
                return
            others = [e for e in candidates if e is not endpoint]
            if isinstance(reply, WorkerUnavailable) and others:
                self._suspect[endpoint.address] = self._clock() + SUSPECT_SECONDS
                # Never taken: any other replica. Taken and died on: one other, once.
                if not reply.accepted or not retried:
                    self._send(others, prefix, buffers, done, retried or reply.accepted, items)
                    return
            done(reply)

        self.clients.submit(endpoint.address, prefix, buffers, replied)

    def _least_busy(self, candidates: list[Endpoint]) -> Endpoint:
        count = len(candidates)
        if count == 1:
            return candidates[0]
        self._turn += 1
        start = self._turn % count
        in_flight = self.clients.in_flight
        # The first of the least busy from a rotating start: idle replicas take turns.
        return min(
            (candidates[(start + i) % count] for i in range(count)),
            key=lambda e: in_flight(e.address) / (e.weight or 1.0),
        )

    # Holding requests for a model scaled to zero

    def _hold(self, key: tuple[str, str], held: _Held) -> None:
        waiting = self._held.setdefault(key, [])
        waiting.append(held)
        loop = asyncio.get_running_loop()
        held.timer = loop.call_later(self._hold_seconds, self._expire, key, held)
        if len(waiting) == 1:
            self._on_hold()

    def _expire(self, key: tuple[str, str], held: _Held) -> None:
        waiting = self._held.get(key, [])
        if held in waiting:
            waiting.remove(held)
            if not waiting:
                del self._held[key]
            error = ModelNotReady(
                f"model {key[1]!r} was scaled to zero and no replica was ready within "
                f"{self._hold_seconds:g} s"
            )
            held.done(error)

    def release_held(self) -> None:
        """A new route table arrived: send what was held for models that now have a ready
        replica; answer what was held for models gone or no longer waking."""
        for key in list(self._held):
            route = self.routes.lookup(*key)
            if route is not None and route.wakes and not self._ready_endpoints(route):
                continue  # still waking
            for held in self._held.pop(key):
                if held.timer is not None:
                    held.timer.cancel()
                try:
                    self._submit(key[0], key[1], held.version, held.inputs, held.outputs, held.done)
                except DataPlaneError as error:
                    held.done(error)

    def held(self) -> int:
        return sum(len(w) for w in self._held.values())

    @staticmethod
    def _prepare(
        signature: Signature, inputs: Mapping[str, np.ndarray[Any, Any]], outputs: Sequence[str]
    ) -> _Prepared:
        """Check a request's tensors against the model and frame them for its worker: once
        per model and shapes, not once per request."""
        try:
            check_inputs(signature, {n: (v2_datatype(a.dtype), a.shape) for n, a in inputs.items()})
            check_outputs(signature, outputs)
        except (InvalidRequest, UnsupportedDatatype) as error:
            raise BadRequest(str(error)) from None
        wanted = list(outputs) or [t.name for t in signature.outputs]
        entries, _ = ipc.describe(inputs)
        return _Prepared(signature, request_prefix(entries, wanted))


def _tensor_config(name: str, datatype: str, shape: Sequence[int]) -> dict[str, Any]:
    return {"name": name, "data_type": f"TYPE_{datatype}", "dims": list(shape)}


__all__ = ["MODEL_VERSION", "DataPlane", "InferResult"]
