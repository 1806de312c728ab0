"""The worker: a Ray actor that supervises model processes. It is one of three things:
an origin's supervisor on a node, hosting the perModel models of that origin there that reserve
nothing of their own (each in a model process of its own); a model's own worker (a model that
reserves CPU, memory or an accelerator, which Ray accounts per actor); or a perOrigin origin's
shared process.

Ray gives us the process, its placement and its lifecycle. The worker parses no model: it
fetches each model into the node's cache, makes the model's data-path listener and hands both
to a model process (`model_process`), a fresh interpreter sandboxed before it parses the file,
which the gateway then talks to directly. A model that LiteRT rejects (or that kills its
process while loading) comes back as a readable error. The worker remembers whom it serves
(`info`), so a restarted control plane can adopt it. When a model process dies while serving,
a supervisor reports it for that model alone (`hosting`) and serves the others on; a model's own
worker, or a perOrigin process, exits with it, so the control plane sees a worker death as
before and replaces it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import ray

from modelloader_workers.batching import BatchPolicy
from modelloader_workers.fetching import FetchedModel, SourceError, SourcePolicy, SourceRequest
from modelloader_workers.fetching.fetch_process import fetch_on_node
from modelloader_workers.fetching.node_cache import Lease
from modelloader_workers.listeners import listen
from modelloader_workers.loading import ExternalDelegate, ModelLoadError
from modelloader_workers.model_process import ModelProcess, ProcessLoad
from modelloader_workers.spawner import Spawner
from modelloader_workers.wire.address import Address
from modelloader_workers.wire.identity import WorkerIdentity
from modelloader_workers.wire.placement import Placement
from modelloader_workers.wire.signature import Signature

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
    # The worker supervises model processes of several models, each its own (an origin's
    # supervisor on a node): the death of this model's process is its own, reported by
    # `hosting`, never the worker's.
    contained: bool = False

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
    supervised: bool = False  # loaded into an origin's supervisor (`LoadRequest.contained`)


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

    def release(self) -> None:
        """What the model held in the worker: its cache lease and its socket's file."""
        self.lease.release()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)


def _die_with(how: str) -> None:
    """A model process of a worker that is one model's own died while serving: the worker
    goes too, so the control plane sees the death and replaces it."""
    log.error("%s: the worker exits", how)
    logging.shutdown()
    os._exit(1)


# Deaths of contained model processes remembered until the control plane unloads the model.
MAX_DEATHS = 1024


class ModelWorker:
    def __init__(self) -> None:
        self._hosted: dict[str, _Hosted] = {}
        self._deaths: dict[str, str] = {}  # model id -> how its process died (contained)
        # The watchers of model processes run in threads of their own.
        self._lock = threading.Lock()
        # Model processes are forked by a spawner of this worker's (`spawner`): a fresh
        # interpreter's start each would cost a node starting many models most of its time.
        self._spawner = Spawner.start()
        # A warm model process: the next model skips even the fork. A supervisor of several
        # models makes another after each load.
        self._spare: ModelProcess | None = self._new_process()

    def _new_process(self) -> ModelProcess:
        """A model process from the spawner (a new spawner if it died: the OOM killer), or
        a fresh interpreter where there can be none."""
        for attempt in range(2):
            if self._spawner is None:
                break
            try:
                return self._spawner.spawn()
            except OSError as error:
                log.warning("the spawner failed (%s)", error)
                self._spawner.stop()
                # Once more with a new one; after that, fresh interpreters for good.
                self._spawner = Spawner.start() if attempt == 0 else None
        return ModelProcess.start()

    def load(self, request: LoadRequest) -> LoadedInfo:
        hosted = self._hosted.get(request.model_id)
        if hosted is not None:
            return hosted.info  # idempotent: a retried call finds the model loaded
        fetched, lease = _fetch(request)
        process: ModelProcess | None = None
        socket_path: str | None = None
        try:
            spare, self._spare = self._spare, None
            if spare is not None and not spare.running:
                spare.stop()  # killed while idle (the OOM killer): a fresh one instead
                spare = None
            process = spare or self._new_process()
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
            supervised=request.contained,
        )
        hosted = _Hosted(process, info, lease, socket_path)
        with self._lock:
            self._hosted[request.model_id] = hosted
            self._deaths.pop(request.model_id, None)
        if request.contained:
            process.watch(lambda how: self._died(request.model_id, hosted, how))
            try:  # the next model's; the loaded one serves whatever happens here
                self._spare = self._new_process()
            except OSError as error:
                log.warning("no spare model process: %s", error)
        else:
            process.watch(_die_with)
        return info

    def _died(self, model_id: str, hosted: _Hosted, how: str) -> None:
        log.error("model %s: %s", model_id, how)
        with self._lock:
            if self._hosted.get(model_id) is not hosted:
                return  # unloaded meanwhile
            del self._hosted[model_id]
            if len(self._deaths) >= MAX_DEATHS:
                self._deaths.pop(next(iter(self._deaths)))
            self._deaths[model_id] = how
        hosted.release()

    @ray.method(enable_task_events=False)
    def hosting(self) -> tuple[list[str], dict[str, str]]:
        """The models whose processes serve, and how the others' processes died: one call a
        second per supervisor, whatever the number of its models."""
        with self._lock:
            return list(self._hosted), dict(self._deaths)

    # The control plane pings every second and gateways ask `info`: without this, Ray's GCS
    # keeps an event record of each call, and grows (bench/RESULTS.md, the soak).
    @ray.method(enable_task_events=False)
    def info(self) -> list[LoadedInfo]:
        """What this process serves, one entry per hosted model."""
        with self._lock:
            return [h.info for h in self._hosted.values()]

    def unload(self, model_id: str) -> int:
        """Stop serving one model; returns how many the process still hosts."""
        with self._lock:
            hosted = self._hosted.pop(model_id, None)
            self._deaths.pop(model_id, None)
        if hosted is not None:
            hosted.process.stop()
            hosted.release()
        with self._lock:
            return len(self._hosted)

    @ray.method(enable_task_events=False)
    def ping(self) -> int:
        return os.getpid()

    @ray.method(enable_task_events=False)
    def node(self) -> str:
        """The Ray node this process runs on."""
        return _node_id()
