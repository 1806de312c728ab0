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

import dataclasses
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import ray

from modelloader_workers import process_limits, sandbox
from modelloader_workers.accelerated_runner import Execution, load_runner
from modelloader_workers.batch_runner import check_batchable
from modelloader_workers.batching import BatchPolicy
from modelloader_workers.fetching import FetchedModel, SourceError, SourcePolicy, SourceRequest
from modelloader_workers.fetching.fetch_process import fetch_on_node
from modelloader_workers.fetching.node_cache import Lease
from modelloader_workers.gc_pauses import freeze_long_lived
from modelloader_workers.litert_runner import ExternalDelegate, ModelLoadError, Runner
from modelloader_workers.wire.address import Address
from modelloader_workers.wire.identity import WorkerIdentity
from modelloader_workers.wire.placement import Placement
from modelloader_workers.wire.signature import Signature
from modelloader_workers.worker_server import WorkerServer

log = logging.getLogger(__name__)

# Set on a node (a Ray pod's environment): its model cache, over the operator's --cache-dir.
NODE_CACHE_ENV = "MODELLOADER_CACHE_DIR"


@dataclass(frozen=True)
class LoadRequest:
    source: SourceRequest  # fetched by this node into its own cache
    sources: SourcePolicy  # the admin's rules for sources, and where the node's cache is
    listen: Address  # a Unix socket's path, or a TCP host (the port is chosen at listen)
    identity: WorkerIdentity  # whom it serves: reported back, for adoption
    threads: int = 1
    accelerator: str = "cpu"  # where the control plane placed it: cpu, gpu or npu
    delegation: str = "partitioned"
    delegate: ExternalDelegate | None = None  # a delegate library for this accelerator class
    memory_limit: int = 0  # bytes this model may add to the process; 0: unlimited
    batching: BatchPolicy | None = None  # spec.batching: stack concurrent requests
    precision: str = "fp32"  # spec.precision: fp16 takes effect where the hardware path can

    @property
    def model_id(self) -> str:
        """Which of the process's models this is."""
        return self.identity.worker_id


@dataclass(frozen=True)
class LoadedInfo:
    """What a worker reports of a model it loaded."""

    identity: WorkerIdentity
    signature: Signature
    address: Address  # where the data path answers
    placement: Placement
    load_seconds: float
    note: str = ""  # e.g. the accelerator fell back to the CPU
    model: FetchedModel | None = None  # the file: its digest, size, what a tag resolved to


def _node_id() -> str:
    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # outside Ray (unit tests of the worker itself)
        return ""


def _node_ip() -> str:
    try:
        return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    except Exception:
        return "127.0.0.1"


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


def _load(request: LoadRequest, model_path: str) -> tuple[Runner, Execution]:
    loaded = load_runner(
        model_path,
        request.threads,
        request.accelerator,
        request.delegation,
        request.delegate,
        request.precision,
    )
    if request.batching is not None:
        # Runs the model: in the sandbox, as the load does.
        check_batchable(loaded[0], request.batching.max_batch_size)
    return loaded


def _fetch(request: LoadRequest) -> tuple[FetchedModel, Lease]:
    """The model's file in this node's cache, held (see `node_cache`) until it is unloaded.
    A file evicted between the fetch and the hold is fetched once more."""
    policy = request.sources
    if NODE_CACHE_ENV in os.environ:  # the node says where its cache is (the chart's Ray pods)
        policy = dataclasses.replace(policy, cache_dir=Path(os.environ[NODE_CACHE_ENV]))
    for attempt in range(2):
        try:
            fetched = fetch_on_node(request.source, policy)
        except SourceError as error:
            raise ModelLoadError(str(error)) from None
        except OSError as error:  # the node's cache: not writable, full
            raise ModelLoadError(
                f"{request.source.uri}: the node's model cache {policy.cache_dir}: "
                f"{error.strerror or error}"
            ) from None
        try:
            return fetched, Lease(fetched.path)
        except FileNotFoundError:
            if attempt:
                raise ModelLoadError(
                    f"{request.source.uri}: the node's cache lost the file twice while loading"
                ) from None
    raise AssertionError("unreachable")


@dataclass
class _Hosted:
    server: WorkerServer
    info: LoadedInfo
    budget: int  # bytes of address space this model may take
    lease: Lease  # keeps the node's cache from evicting the file while it is served


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
        fetched, lease = _fetch(request)
        budget = process_limits.model_budget(request.memory_limit, request.threads)
        limited = self._limit_memory(budget) if budget else False
        try:
            path = str(fetched.path)
            (runner, execution), confined = _in_sandbox(lambda: _load(request, path))
            server = WorkerServer(
                runner, request.listen, thread_setup=_confine, batching=request.batching
            )
        except (ModelLoadError, MemoryError, OSError) as error:
            lease.release()
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
            identity=request.identity,
            signature=server.signature,
            address=server.address.reachable_at(_node_ip()),
            placement=Placement(
                node=socket.gethostname(),
                node_id=_node_id(),
                accelerator=execution.accelerator,
                delegate=execution.delegate,
                pid=os.getpid(),
                sandbox=sandbox.describe() if confined else "",
                delegated_ops_share=execution.delegated_ops_share,
                precision=execution.precision,
            ),
            load_seconds=runner.load_seconds,
            note=execution.note,
            model=fetched,
        )
        # A collection must not stall a serving thread mid-request; the first load may
        # collect first, later ones have models serving beside them.
        freeze_long_lived(collect=not self._hosted)
        self._hosted[request.model_id] = _Hosted(server, info, budget, lease)
        return info

    def _limit_memory(self, extra: int) -> bool:
        """Room for the hosted models plus `extra`; unlimited while any model asks no limit."""
        budgets = [h.budget for h in self._hosted.values()]
        if 0 in budgets:
            return False
        total = sum(budgets) + extra
        return process_limits.limit_memory(process_limits.MemoryBudget(self._baseline, total))

    # The control plane pings every second and gateways ask `info`: without this, Ray's GCS
    # keeps an event record of each call, and grows (bench/RESULTS.md, the soak).
    @ray.method(enable_task_events=False)
    def info(self) -> list[LoadedInfo]:
        """What this process serves, one entry per hosted model."""
        return [h.info for h in self._hosted.values()]

    def unload(self, model_id: str) -> int:
        """Stop serving one model; returns how many the process still hosts."""
        hosted = self._hosted.pop(model_id, None)
        if hosted is not None:
            hosted.server.close()
            hosted.lease.release()
            self._limit_memory(0)
        return len(self._hosted)

    @ray.method(enable_task_events=False)
    def ping(self) -> int:
        return os.getpid()

    @ray.method(enable_task_events=False)
    def node(self) -> str:
        """The Ray node this process runs on."""
        return _node_id()
