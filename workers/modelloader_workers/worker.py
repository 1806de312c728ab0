"""The worker: a process hosting one LiteRT model (perModel isolation) or several models of
one origin (perOrigin), each behind its own data-path listener.

The control plane runs this class as a Ray actor (Ray gives us the process, its placement and
its lifecycle); the tensors of inference requests bypass Ray and arrive on the worker's own Unix
socket (`worker_server`). Loading happens in `load`, not in the constructor, so a model that
LiteRT rejects comes back as a readable error while the process is still alive to say so. The
worker remembers whom it serves (`info`), so a restarted control plane can adopt it. Before
the first model is parsed, the process limits itself (`process_limits`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import ray

from modelloader_workers import process_limits, sandbox
from modelloader_workers.accelerated_runner import load_runner
from modelloader_workers.gc_pauses import freeze_long_lived
from modelloader_workers.litert_runner import ExternalDelegate, ModelLoadError
from modelloader_workers.worker_server import WorkerServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadRequest:
    model_path: str
    listen: str  # "unix:/path" or "tcp:HOST" (see WorkerServer)
    threads: int = 1
    accelerator: str = "cpu"  # where the control plane placed it: cpu, gpu or npu
    delegation: str = "partitioned"
    identity: tuple[tuple[str, Any], ...] = ()  # key, fingerprint, generation: for adoption
    delegate: ExternalDelegate | None = None  # a delegate library for this accelerator class
    memory_limit: int = 0  # bytes this model may add to the process; 0: unlimited
    model_id: str = ""  # which of the process's models this is (its worker id)


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
    sandbox: str = ""  # what confines the model's threads ("": nothing)


def _node_id() -> str:
    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # outside Ray (unit tests of the worker itself)
        return ""


def _reachable(address: str) -> str:
    """A TCP listener on every interface is reached at this node's address."""
    prefix = "tcp:0.0.0.0:"
    if not address.startswith(prefix):
        return address
    try:
        host = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    except Exception:
        host = "127.0.0.1"
    return f"tcp:{host}:{address[len(prefix) :]}"


T = TypeVar("T")


def _confine() -> bool:
    """Whether the calling thread now runs under the sandbox."""
    if sandbox.confine_thread():
        return True
    reason = sandbox.supported()
    if reason is not None and "turned off" not in reason:
        log.warning("models run without a seccomp sandbox: %s", reason)
    return False


def _in_sandbox(work: Callable[[], T]) -> tuple[T, bool]:
    """Run `work` (parsing a tenant's model) in a fresh thread confined by the sandbox: the
    actor's own thread keeps talking to Ray unconfined, and threads the work starts (the
    interpreter's pool) inherit the filter. Also says whether the sandbox was installed."""
    result: list[T] = []
    confined: list[bool] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            confined.append(_confine())
            result.append(work())
        except BaseException as error:  # handed to the caller's thread
            failure.append(error)

    thread = threading.Thread(target=run, name="model-load", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0], confined[0]


@dataclass
class _Hosted:
    server: WorkerServer
    info: LoadedInfo
    budget: int  # bytes of address space this model may take


class ModelWorker:
    def __init__(self) -> None:
        self._hosted: dict[str, _Hosted] = {}
        self._baseline = 0  # the address space before the first model; 0 until then
        self.hardening: list[str] = []

    def load(self, request: LoadRequest) -> LoadedInfo:
        hosted = self._hosted.get(request.model_id)
        if hosted is not None:
            return hosted.info  # idempotent: a retried call finds the model loaded
        if not self.hardening:
            self.hardening = process_limits.harden()
            self._baseline = process_limits.address_space()
        budget = process_limits.model_budget(request.memory_limit, request.threads)
        limited = self._limit_memory(budget) if budget else False
        try:
            (runner, execution), confined = _in_sandbox(
                lambda: load_runner(
                    request.model_path,
                    request.threads,
                    request.accelerator,
                    request.delegation,
                    request.delegate,
                )
            )
            server = WorkerServer(runner, request.listen, thread_setup=_confine)
        except (ModelLoadError, MemoryError, OSError) as error:
            self._limit_memory(0)
            text = str(error).strip() or type(error).__name__
            if limited:
                mib = request.memory_limit // process_limits.MiB
                text += (
                    f" (the model may use up to {mib} MiB of memory: "
                    "raise spec.resources.memory if it needs more)"
                )
            raise ModelLoadError(text) from None
        info = LoadedInfo(
            signature=runner.signature.to_dict(),
            load_seconds=runner.load_seconds,
            address=_reachable(server.address),
            pid=os.getpid(),
            node_id=_node_id(),
            host=socket.gethostname(),
            accelerator=execution.accelerator,
            delegate=execution.delegate,
            delegated_ops_share=execution.delegated_ops_share,
            note=execution.note,
            identity=dict(request.identity),
            sandbox=sandbox.describe() if confined else "",
        )
        # A collection must not stall a serving thread mid-request; the first load may
        # collect first, later ones have models serving beside them.
        freeze_long_lived(collect=not self._hosted)
        self._hosted[request.model_id] = _Hosted(server, info, budget)
        return info

    def _limit_memory(self, extra: int) -> bool:
        """Room for the hosted models plus `extra`; unlimited while any model asks no limit."""
        budgets = [h.budget for h in self._hosted.values()]
        if 0 in budgets:
            return False
        total = sum(budgets) + extra
        return process_limits.limit_memory(process_limits.MemoryBudget(self._baseline, total))

    # The control plane pings every second and gateways ask `info`: without this, Ray's GCS
    # keeps an event record of each call (measured: +49 MiB in 30 minutes of 10 workers).
    @ray.method(enable_task_events=False)
    def info(self) -> list[LoadedInfo]:
        """What this process serves, one entry per hosted model."""
        return [h.info for h in self._hosted.values()]

    def unload(self, model_id: str) -> int:
        """Stop serving one model; returns how many the process still hosts."""
        hosted = self._hosted.pop(model_id, None)
        if hosted is not None:
            hosted.server.close()
            self._limit_memory(0)
        return len(self._hosted)

    @ray.method(enable_task_events=False)
    def ping(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        for hosted in self._hosted.values():
            hosted.server.close()
        self._hosted.clear()
