"""The transport-independent core of the gateway (after KServe's `protocol/dataplane.py`):
health, model metadata, readiness and inference, with typed errors. HTTP is a thin layer on top.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelloader_workers import ipc
from modelloader_workers.gateway.directory import ModelDirectory, ModelEntry
from modelloader_workers.gateway.errors import (
    BadRequest,
    DataPlaneError,
    ModelNotFound,
    ModelNotReady,
)
from modelloader_workers.gateway.worker_client import (
    WorkerClients,
    WorkerReply,
    completion,
    request_prefix,
)
from modelloader_workers.signature import InvalidRequest, Signature, check_inputs, check_outputs
from modelloader_workers.tensor_types import UnsupportedDatatype, v2_datatype

SERVER_NAME = "modelloader"
SERVER_VERSION = "0.1.0"
# The only version a LoadedModel has: a changed spec replaces the model in place (the rollout
# is invisible to clients), so a client pinning "1" keeps working across updates.
MODEL_VERSION = "1"
PLATFORM = "tensorflow_lite"


@dataclass(frozen=True)
class InferResult:
    model_name: str
    outputs: dict[str, np.ndarray[Any, Any]]
    queue_seconds: float
    invoke_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class _Prepared:
    signature: Signature  # of the model it was checked against
    prefix: bytes  # the worker frame's prefix and header


class DataPlane:
    def __init__(self, directory: ModelDirectory, clients: WorkerClients) -> None:
        self.directory = directory
        self.clients = clients
        # Requests checked and framed, per model, input shapes and outputs.
        self._prepared: ipc.Memo[tuple[Any, ...], _Prepared] = ipc.Memo()

    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": SERVER_NAME,
            "version": SERVER_VERSION,
            "extensions": ["binary_tensor_data"],
        }

    def _entry(self, origin: str, name: str, version: str | None) -> ModelEntry:
        entry = self.directory.lookup(origin, name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} not found")
        if version not in (None, "", MODEL_VERSION):
            raise ModelNotFound(
                f"model {name!r} has no version {version!r}; it has {MODEL_VERSION!r}"
            )
        return entry

    def model_ready(self, origin: str, name: str, version: str | None = None) -> bool:
        return self._entry(origin, name, version).ready

    def model_metadata(
        self, origin: str, name: str, version: str | None = None, details: bool = False
    ) -> dict[str, Any]:
        """`details`: include where the model runs (node, accelerator, delegate). Off unless
        the origin's policy exposes them: hardware details help fingerprint a device."""
        entry = self._entry(origin, name, version)
        if entry.signature is None:
            raise ModelNotReady(f"model {name!r} is not ready: {entry.message or 'loading'}")
        metadata = {
            "name": name,
            "versions": [MODEL_VERSION],
            "platform": PLATFORM,
            **entry.signature.to_dict(),
        }
        if details and entry.placement:
            metadata["parameters"] = {"placement": dict(entry.placement)}
        return metadata

    def submit(
        self,
        origin: str,
        name: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Sequence[str],
        done: Callable[[InferResult | DataPlaneError], None],
    ) -> None:
        """Check the request and send it to the model's worker. A request that cannot go
        raises its `DataPlaneError` here; once sent, `done` gets the result or the error,
        exactly once (possibly before this returns). `inputs` must stay as they are until
        then: they are sent from where they lie."""
        started = time.perf_counter()
        entry = self._entry(origin, name, version)
        if not entry.ready or entry.address is None or entry.signature is None:
            raise ModelNotReady(f"model {name!r} is not ready: {entry.message or 'loading'}")
        signature = entry.signature
        shapes = tuple((n, a.dtype.str, a.shape) for n, a in inputs.items())
        # The signature's id stands for it: the remembered value holds the signature, so no
        # other can take its id while the value is remembered.
        prepared = self._prepared.get(
            (id(signature), shapes, tuple(outputs)),
            lambda _: self._prepare(signature, inputs, outputs),
        )

        def replied(reply: WorkerReply | DataPlaneError) -> None:
            if isinstance(reply, DataPlaneError):
                done(reply)
                return
            done(
                InferResult(
                    model_name=name,
                    outputs=reply.outputs,
                    queue_seconds=reply.queue_seconds,
                    invoke_seconds=reply.invoke_seconds,
                    total_seconds=time.perf_counter() - started,
                )
            )

        buffers = [np.ascontiguousarray(a) for a in inputs.values()]
        self.clients.submit(entry.address, prepared.prefix, buffers, replied)

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

    async def infer(
        self,
        origin: str,
        name: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Sequence[str],
    ) -> InferResult:
        """`submit` as a coroutine."""
        return await completion(
            lambda done: self.submit(origin, name, version, inputs, outputs, done)
        )
