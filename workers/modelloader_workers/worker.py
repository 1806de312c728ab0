"""The worker: one process per LoadedModel, hosting one LiteRT model.

The control plane runs this class as a Ray actor (Ray gives us the process, its placement and
its lifecycle); the tensors of inference requests bypass Ray and arrive on the worker's own Unix
socket (`worker_server`). Loading happens in `load`, not in the constructor, so a model that
LiteRT rejects comes back as a readable error while the process is still alive to say so. The
worker remembers whom it serves (`info`), so a restarted control plane can adopt it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from modelloader_workers.accelerated_runner import load_runner
from modelloader_workers.litert_runner import ExternalDelegate, ModelLoadError
from modelloader_workers.worker_server import WorkerServer


@dataclass(frozen=True)
class LoadRequest:
    model_path: str
    listen: str  # "unix:/path" or "tcp:HOST" (see WorkerServer)
    threads: int = 1
    accelerator: str = "cpu"  # where the control plane placed it: cpu, gpu or npu
    delegation: str = "partitioned"
    identity: tuple[tuple[str, Any], ...] = ()  # key, fingerprint, generation: for adoption
    delegate: ExternalDelegate | None = None  # a delegate library for this accelerator class


@dataclass(frozen=True)
class LoadedInfo:
    signature: dict[str, Any]
    load_seconds: float
    address: str  # where the data path answers: "unix:/path" or "tcp:host:port"
    pid: int
    node_id: str  # the Ray node
    host: str
    accelerator: str  # what runs it (cpu after a fallback)
    delegate: str
    delegated_ops_share: float | None
    note: str
    identity: dict[str, Any]


def _node_id() -> str:
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # outside Ray (unit tests of the worker itself)
        return ""


def _reachable(address: str) -> str:
    """A TCP listener on every interface is reached at this node's address."""
    prefix = "tcp:0.0.0.0:"
    if not address.startswith(prefix):
        return address
    try:
        import ray

        host = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    except Exception:
        host = "127.0.0.1"
    return f"tcp:{host}:{address[len(prefix) :]}"


class ModelWorker:
    def __init__(self) -> None:
        self._server: WorkerServer | None = None
        self._info: LoadedInfo | None = None

    def load(self, request: LoadRequest) -> LoadedInfo:
        if self._info is not None:
            return self._info  # idempotent: a retried call finds the model loaded
        runner, execution = load_runner(
            request.model_path,
            request.threads,
            request.accelerator,
            request.delegation,
            request.delegate,
        )
        self._server = WorkerServer(runner, request.listen)
        self._info = LoadedInfo(
            signature=runner.signature.to_dict(),
            load_seconds=runner.load_seconds,
            address=_reachable(self._server.address),
            pid=os.getpid(),
            node_id=_node_id(),
            host=socket.gethostname(),
            accelerator=execution.accelerator,
            delegate=execution.delegate,
            delegated_ops_share=execution.delegated_ops_share,
            note=execution.note,
            identity=dict(request.identity),
        )
        return self._info

    def info(self) -> LoadedInfo:
        if self._info is None:
            raise ModelLoadError("the worker has not loaded a model")
        return self._info

    def ping(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
