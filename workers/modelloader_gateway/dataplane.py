"""The transport-independent core of the gateway (after KServe's `protocol/dataplane.py`):
health, model metadata, readiness and inference, with typed errors. REST (and gRPC) are thin
layers on top: one place for lookup, access, limits and errors.

Requests go to the ready replica with the fewest requests in flight; one that a replica never
took (it died, or could not be reached) goes to another, so a replica lost under load costs its
clients nothing but the requests it had already taken.
"""

from __future__ import annotations

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
from modelloader_gateway.routes import MODEL_VERSION, Endpoint, Route, Routes
from modelloader_gateway.worker_client import WorkerClients, WorkerReply, request_prefix

SERVER_NAME = "modelloader"
PLATFORM = "tensorflow_lite"


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
    ) -> None:
        self.routes = routes
        self.clients = clients
        self.limiter = limiter or OriginLimiter()
        self._ready = ready
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
            "extensions": ["binary_tensor_data"],
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
        found = {
            "name": name,
            "versions": [route.version],
            "platform": PLATFORM,
            **route.signature.to_dict(),
        }
        if details and route.placement:
            found["parameters"] = {"placement": dict(route.placement)}
        return found

    # Inference

    def admit(self, origin: str, access: OriginAccess, name: str) -> Route:
        """An inference request's door: the model exists for this origin, and the origin is
        within its limits (raises `TooManyRequests`); pair with `leave` once answered."""
        route = self.route(origin, name, None)
        self.limiter.enter(origin, access)
        return route

    def leave(self, origin: str) -> None:
        self.limiter.leave(origin)

    def submit(
        self,
        origin: str,
        name: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Sequence[str],
        done: Callable[[InferResult | DataPlaneError], None],
    ) -> None:
        """Check the request and send it to a replica of the model. A request that cannot go
        raises its `DataPlaneError` here; once sent, `done` gets the result or the error,
        exactly once (possibly before this returns). `inputs` must stay as they are until
        then: they are sent from where they lie."""
        route = self.route(origin, name, version)
        ready = [e for e in route.endpoints if e.state == "ready"]
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
        self._send(ready, prepared.prefix, buffers, done)

    def _send(
        self,
        candidates: list[Endpoint],
        prefix: bytes,
        buffers: list[Any],
        done: Callable[[InferResult | DataPlaneError], None],
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
                    )
                )
                return
            others = [e for e in candidates if e is not endpoint]
            if isinstance(reply, WorkerUnavailable) and not reply.accepted and others:
                self._send(others, prefix, buffers, done)  # it never took the request
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


__all__ = ["MODEL_VERSION", "DataPlane", "InferResult"]
