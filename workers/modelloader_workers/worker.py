"""The worker: one process per LoadedModel, hosting one LiteRT interpreter.

The control plane runs this class as a Ray actor (Ray gives us the process, its placement and
its lifecycle); the tensors of inference requests bypass Ray and arrive on the worker's own Unix
socket (`worker_server`). Loading happens in `load`, not in the constructor, so a model that
LiteRT rejects comes back as a readable error while the process is still alive to say so.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from modelloader_workers.litert_runner import LiteRTRunner
from modelloader_workers.worker_server import WorkerServer


@dataclass(frozen=True)
class LoadedInfo:
    signature: dict[str, Any]
    load_seconds: float
    address: str  # "unix:/path" of the data-path socket
    pid: int
    node: str


class ModelWorker:
    def __init__(self) -> None:
        self._server: WorkerServer | None = None

    def load(self, model_path: str, threads: int, socket_path: str) -> LoadedInfo:
        runner = LiteRTRunner(model_path, threads=threads)
        self._server = WorkerServer(runner, socket_path)
        return LoadedInfo(
            signature=runner.signature.to_dict(),
            load_seconds=runner.load_seconds,
            address=f"unix:{socket_path}",
            pid=os.getpid(),
            node=socket.gethostname(),
        )

    def ping(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
