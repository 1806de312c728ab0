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
    socket_path: str
    threads: int = 1
    accelerator: str = "cpu"  # where the control plane placed it: cpu, gpu or npu
    delegation: str = "partitioned"
    identity: tuple[tuple[str, Any], ...] = ()  # key, fingerprint, generation: for adoption
    delegate: ExternalDelegate | None = None  # a delegate library for this accelerator class


@dataclass(frozen=True)
class LoadedInfo:
    signature: dict[str, Any]
    load_seconds: float
    address: str  # "unix:/path" of the data-path socket
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
        self._server = WorkerServer(runner, request.socket_path)
        self._info = LoadedInfo(
            signature=runner.signature.to_dict(),
            load_seconds=runner.load_seconds,
            address=f"unix:{request.socket_path}",
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
