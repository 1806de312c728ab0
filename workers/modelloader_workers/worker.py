"""The worker: the supervisor of the model processes of one LiteRT model (perModel isolation)
or of several models of one origin (perOrigin).

The control plane runs this class as a Ray actor (Ray gives us the process, its placement and
its lifecycle). It parses no model: it fetches each model into the node's cache, makes the
model's data-path listener and hands both to a model process of its own (`model_process`), a
fresh interpreter sandboxed before it parses the file, which the gateway then talks to
directly. A model that LiteRT rejects (or that kills its process while loading) comes back as a
readable error while the worker is alive to say so. The worker remembers whom it serves
(`info`), so a restarted control plane can adopt it. A model process that dies while serving
takes its worker with it, so the control plane sees the death as before and replaces it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import ray

from modelloader_workers.batching import BatchPolicy
from modelloader_workers.fetching import FetchedModel, SourceError, SourcePolicy, SourceRequest
from modelloader_workers.fetching.fetch_process import fetch_on_node
from modelloader_workers.fetching.node_cache import Lease
from modelloader_workers.litert_runner import ExternalDelegate, ModelLoadError
from modelloader_workers.model_process import ModelProcess, ProcessLoad
from modelloader_workers.wire.address import Address
from modelloader_workers.wire.identity import WorkerIdentity
from modelloader_workers.wire.placement import Placement
from modelloader_workers.wire.signature import Signature
from modelloader_workers.worker_server import listen

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
    process: ModelProcess
    info: LoadedInfo
    lease: Lease  # keeps the node's cache from evicting the file while it is served
    socket_path: str | None  # the listener's file, removed when the model is unloaded


def _die_with(how: str) -> None:
    """A model process died while serving: the worker goes too, so the control plane sees a
    death and replaces it, as it did when the model ran in the worker's own process."""
    log.error("%s: the worker exits", how)
    logging.shutdown()
    os._exit(1)


class ModelWorker:
    def __init__(self) -> None:
        self._hosted: dict[str, _Hosted] = {}
        # A warm model process: a warm worker's first model skips the interpreter's start.
        self._spare: ModelProcess | None = ModelProcess.start()

    def load(self, request: LoadRequest) -> LoadedInfo:
        hosted = self._hosted.get(request.model_id)
        if hosted is not None:
            return hosted.info  # idempotent: a retried call finds the model loaded
        fetched, lease = _fetch(request)
        process: ModelProcess | None = None
        socket_path: str | None = None
        try:
            process, self._spare = self._spare or ModelProcess.start(), None
            listener, address = listen(request.listen)
            socket_path = address.where if address.kind == "unix" else None
            try:
                loaded = process.load(
                    ProcessLoad(
                        model=str(fetched.path),
                        threads=request.threads,
                        accelerator=request.accelerator,
                        delegation=request.delegation,
                        delegate=request.delegate,
                        memory_limit=request.memory_limit,
                        batching=request.batching,
                        precision=request.precision,
                    ),
                    listener,
                )
            finally:
                listener.close()  # the model process has its own
        except BaseException as error:
            if process is not None:
                process.stop()
            lease.release()
            if socket_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(socket_path)
            if isinstance(error, OSError):  # the listener, or the process's start
                raise ModelLoadError(f"the worker could not start the model: {error}") from None
            raise
        info = LoadedInfo(
            identity=request.identity,
            signature=loaded.signature,
            address=address.reachable_at(_node_ip()),
            placement=Placement(
                node=socket.gethostname(),
                node_id=_node_id(),
                accelerator=loaded.accelerator,
                delegate=loaded.delegate,
                pid=process.pid,
                sandbox=loaded.sandbox,
                delegated_ops_share=loaded.delegated_ops_share,
                precision=loaded.precision,
            ),
            load_seconds=loaded.load_seconds,
            note=loaded.note,
            model=fetched,
        )
        self._hosted[request.model_id] = _Hosted(process, info, lease, socket_path)
        process.watch(_die_with)
        return info

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
            hosted.process.stop()
            hosted.lease.release()
            if hosted.socket_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(hosted.socket_path)
        return len(self._hosted)

    @ray.method(enable_task_events=False)
    def ping(self) -> int:
        return os.getpid()

    @ray.method(enable_task_events=False)
    def node(self) -> str:
        """The Ray node this process runs on."""
        return _node_id()
