"""The transport-independent core of the gateway (after KServe's `protocol/dataplane.py`):
health, model metadata, readiness and inference, with typed errors. HTTP is a thin layer on top.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelloader_workers.gateway.directory import ModelDirectory, ModelEntry
from modelloader_workers.gateway.errors import BadRequest, ModelNotFound, ModelNotReady
from modelloader_workers.gateway.worker_client import WorkerClients
from modelloader_workers.signature import InvalidRequest, check_inputs, check_outputs
from modelloader_workers.tensor_types import v2_datatype

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


class DataPlane:
    def __init__(self, directory: ModelDirectory, clients: WorkerClients) -> None:
        self.directory = directory
        self.clients = clients

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

    async def infer(
        self,
        origin: str,
        name: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Sequence[str],
    ) -> InferResult:
        started = time.perf_counter()
        entry = self._entry(origin, name, version)
        if not entry.ready or entry.address is None or entry.signature is None:
            raise ModelNotReady(f"model {name!r} is not ready: {entry.message or 'loading'}")
        try:
            check_inputs(
                entry.signature, {n: (v2_datatype(a.dtype), a.shape) for n, a in inputs.items()}
            )
            check_outputs(entry.signature, outputs)
        except InvalidRequest as error:
            raise BadRequest(str(error)) from None
        wanted = list(outputs) or [t.name for t in entry.signature.outputs]
        reply = await self.clients.infer(entry.address, inputs, wanted)
        return InferResult(
            model_name=name,
            outputs=reply.outputs,
            queue_seconds=reply.queue_seconds,
            invoke_seconds=reply.invoke_seconds,
            total_seconds=time.perf_counter() - started,
        )
