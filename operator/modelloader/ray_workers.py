"""The one adapter to Ray: start a worker actor, load its model, find running ones, check they
are alive, stop them.

Each LoadedModel's worker is a named Ray actor in a Ray namespace of its origin's (two origins
never share a process or a namespace); under perOrigin isolation, several of an origin's models
share one such actor, each with its own data-path listener. A worker's name derives from
the LoadedModel's identity and spec, so a restarted operator finds ("adopts") the workers
that are already serving instead of starting duplicates. Inference tensors do not pass
through Ray (see `modelloader_workers.wire.ipc`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from modelloader_workers.batching import BatchPolicy
from modelloader_workers.fetching import SourcePolicy, SourceRequest
from modelloader_workers.loading import ExternalDelegate, ModelLoadError
from modelloader_workers.wire.address import Address
from modelloader_workers.wire.identity import WorkerIdentity
from modelloader_workers.worker import LoadedInfo, LoadRequest, ModelWorker
from ray.exceptions import (
    ActorUnschedulableError,
    GetTimeoutError,
    RayActorError,
    RayError,
    RayTaskError,
)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from modelloader.placement import Node, fits_warm_process
from modelloader.resource import Batching, LoadedModel
from modelloader.worker_names import (
    ProcessName,
    is_ours,
    is_supervisor,
    is_warm,
    supervisor_name,
    warm_name,
)
from modelloader.worker_pool import WorkerStartError

log = logging.getLogger(__name__)

NAMESPACE_PREFIX = "modelloader-origin-"
# Pre-started worker processes, each handed to one model and never reused (see start()).
WARM_NAMESPACE = "modelloader-warm"
# Unix socket paths are limited to 107 bytes; our names take 22.
MAX_SOCKET_DIR = 80


@dataclass
class WorkerHandle:
    worker_id: str  # the hosted model's worker id
    namespace: str
    actor: Any
    socket_path: Path
    process: str = ""  # the actor's name when shared by several models (perOrigin)
    warm_name: str = ""  # the actor's name when it came from the warm pool
    # The actor's name when it is the origin's supervisor on a node, hosting this model's
    # process among others (perModel): the model is unloaded, never the actor killed.
    supervisor: str = ""


def origin_namespace(origin: str) -> str:
    return f"{NAMESPACE_PREFIX}{origin}"


# What a supervisor hosts: its models whose processes serve, and how the others' died.
Hosting = tuple[frozenset[str], dict[str, str]]


async def _ask_hosting(handle: WorkerHandle, timeout: float) -> Hosting:
    try:
        method = handle.actor.hosting
    except AttributeError:  # a supervisor of the release before, adopted after an upgrade
        died = await asyncio.wait_for(handle.actor.alive.remote(handle.worker_id), timeout)
        hosted = frozenset() if died else frozenset([handle.worker_id])
        return hosted, {handle.worker_id: died} if died else {}
    serving, deaths = await asyncio.wait_for(method.remote(), timeout)
    return frozenset(serving), deaths


# How many times `start_local_ray` tries: a start under load can miss Ray's fixed 30 s wait for
# its raylet to register (once in CI, just after the GCS of the Ray before was killed).
LOCAL_RAY_ATTEMPTS = 2


def start_local_ray(
    num_cpus: int | None,
    init: Callable[..., object] | None = None,
    attempts: int = LOCAL_RAY_ATTEMPTS,
) -> str:
    """A private, local Ray for `modelloader local`; returns its temp dir (for cleanup checks).
    A start that fails leaves nothing behind and is tried again; `init` is Ray's, or a test's."""
    # Ray starts workers at niceness 15, right for batch tasks and wrong for a data path that
    # shares the cores with the gateway (bench/RESULTS.md, "What changed, and what each
    # change bought").
    os.environ.setdefault("RAY_worker_niceness", "0")
    for _ in range(attempts - 1):
        try:
            return _start_local_ray_once(num_cpus, init or ray.init)
        except Exception as error:
            log.warning("local Ray did not start (%s); trying again", error)
    return _start_local_ray_once(num_cpus, init or ray.init)


def _start_local_ray_once(num_cpus: int | None, init: Callable[..., object]) -> str:
    """`address="local"` keeps a RAY_ADDRESS in the environment from pointing us elsewhere."""
    started = time.perf_counter()
    temp_dir = tempfile.mkdtemp(prefix="mlray-", dir="/tmp")  # short: Ray's sockets live there
    try:
        init(
            address="local",
            num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            _temp_dir=temp_dir,
        )
    except Exception:
        _end_failed_start(temp_dir)
        raise
    log.info("local Ray started in %.1fs (%s)", time.perf_counter() - started, temp_dir)
    return temp_dir


def _end_failed_start(temp_dir: str) -> None:
    """What a failed `ray.init` started: it raises after starting the GCS and the raylet,
    without ending them. Each names the temp dir, fresh for this attempt, on its command line;
    what they started (workers that renamed themselves `ray::IDLE`) are their descendants."""
    with contextlib.suppress(Exception):
        ray.shutdown()
    needle = os.fsencode(temp_dir)
    parents: dict[int, int] = {}
    ended: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[pid] = int(_stat_fields(pid)[1])
            if needle in (entry / "cmdline").read_bytes():
                ended.add(pid)
    grown = True
    while grown:
        below = {pid for pid, parent in parents.items() if parent in ended} - ended
        ended |= below
        grown = bool(below)
    for pid in ended:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_running(pid) for pid in ended):
        time.sleep(0.05)  # gone (or a zombie) before their files are removed
    shutil.rmtree(temp_dir, ignore_errors=True)


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses): the
    state first, then the parent's pid."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _running(pid: int) -> bool:
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


async def connect_ray(address: str | None, role: str) -> None:
    """Join the cluster at `address` (else RAY_ADDRESS's "auto") unless already connected."""
    if not ray.is_initialized():
        await asyncio.to_thread(
            ray.init,
            address=address or "auto",
            log_to_driver=False,
            namespace=f"modelloader-{role}",
        )


def local_ray_problem() -> str | None:
    """Why the Ray this process started is gone (its raylet or GCS exited), or None. Only
    for a Ray started here (`start_local_ray`): its processes are this process's children."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not ray.is_initialized():
        return "Ray is not running"
    dead = node.dead_processes()
    if not dead:
        return None
    return "Ray's " + ", ".join(
        f"{kind} exited ({_exit(process.returncode)})" for kind, process in dead
    )


def _exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {-code}"
    return f"code {code}"


def stop_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


class RayWorkers:
    def __init__(
        self,
        socket_dir: Path,
        *,
        detached: bool = False,
        delegates: Mapping[str, ExternalDelegate] | None = None,
        tcp: bool = False,
        warm: int = 0,
        warm_resources: Mapping[str, float] | None = None,
        sources: SourcePolicy | None = None,
    ) -> None:
        if len(str(socket_dir)) > MAX_SOCKET_DIR:
            raise ValueError(
                f"{socket_dir} is too long for Unix sockets; choose a shorter --state-dir"
            )
        socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._socket_dir = socket_dir
        # The admin's source rules, sent with every load: each node fetches for itself.
        # Without: local files anywhere, cached beside the sockets (tests of this adapter).
        self._sources = sources or SourcePolicy(roots=(Path("/"),), cache_dir=socket_dir / "cache")
        # Detached workers outlive the process that started them: the operator's mode, so a
        # restart does not interrupt serving. Local mode's workers die with it.
        self._detached = detached
        # Accelerator class -> delegate library, from the operator's configuration; a class
        # not named here uses LiteRT's own accelerator support (CompiledModel).
        self._delegates = dict(delegates or {})
        # On a cluster the gateway reaches workers on other nodes over TCP; on one machine
        # a Unix socket in a private folder is enough and faster.
        self._tcp = tcp
        self._remote: Any = ray.remote(ModelWorker)
        # A non-detached actor ends when its creator's handle goes (handles from get_actor do
        # not count), so the adapter keeps the handles it made: a control loop restarted in
        # the same process then finds its workers alive.
        self._owned: dict[str, Any] = {}
        self._creating: dict[str, _Turn] = {}  # actor name -> creations of it, in turn
        # The warm pool: idle processes that have imported everything a worker needs, so
        # apply -> Ready does not wait for a process to start. Each serves one model of one
        # origin and dies with it; it is never given to anyone else. Which models may take one
        # is placement's decision (`fits_warm_process`); `warm_resources` must be what a CPU
        # model reserves in this cluster (the CPU-node resource, if there is one).
        self._warm_target = warm
        self._warm_resources = dict(warm_resources or {})
        self._warm: list[tuple[str, Any, Any]] = []  # (name, actor, its node), oldest first
        self._capacity: dict[str, float] = {}
        self._capacity_at = -float("inf")
        self._nodes: list[Node] = []
        self._nodes_at = -float("inf")
        # Each origin's supervisor on each node: (origin, node) -> (actor name, actor). Its
        # starts in flight keep an empty one from being ended under them.
        self._supervisors: dict[tuple[str, str], tuple[str, Any]] = {}
        self._supervising: dict[tuple[str, str], _Turn] = {}
        self._releases: set[asyncio.Task[None]] = set()
        # A liveness check of a supervisor in flight, shared by all its models (`_hosting`).
        self._asking: dict[str, asyncio.Future[Hosting]] = {}

    def capacity(self) -> dict[str, float]:
        resources = ray.cluster_resources()  # type: ignore[no-untyped-call]
        return {k: float(v) for k, v in resources.items()}

    async def recent_capacity(self, max_age_seconds: float = 5.0) -> dict[str, float]:
        """`capacity`, asked of the GCS at most every few seconds: the control loops run
        twice a second, and a node (with its GPUs) joining can wait that long to be seen."""
        if time.monotonic() - self._capacity_at > max_age_seconds:
            self._capacity = await asyncio.to_thread(self.capacity)
            self._capacity_at = time.monotonic()
        return self._capacity

    async def recent_nodes(self, max_age_seconds: float = 5.0) -> list[Node]:
        """The alive nodes and what each has free, asked of the GCS at most every few
        seconds (Ray's only per-node view of free resources is in `ray._private.state`)."""
        if time.monotonic() - self._nodes_at > max_age_seconds:
            free = await asyncio.to_thread(ray._private.state.available_resources_per_node)
            self._nodes = [
                Node(str(node), {k: float(v) for k, v in resources.items()})
                for node, resources in free.items()
            ]
            self._nodes_at = time.monotonic()
        return self._nodes

    def _socket_path(self, worker_id: str) -> Path:
        return self._socket_dir / f"{hashlib.sha256(worker_id.encode()).hexdigest()[:16]}.sock"

    def fill_warm_pool(self) -> None:
        """Start warm processes up to the pool's size (non-blocking)."""
        while len(self._warm) < self._warm_target:
            name = warm_name()
            options: dict[str, Any] = {
                "name": name,
                "namespace": WARM_NAMESPACE,
                "num_cpus": 0,
                "max_restarts": 0,
            }
            if self._warm_resources:
                options["resources"] = dict(self._warm_resources)
            if self._detached:
                options["lifetime"] = "detached"
            actor: Any = self._remote.options(**options).remote()
            # The process starts now, not when a model needs it, and says where it runs.
            self._owned[name] = actor
            self._warm.append((name, actor, actor.node.remote()))

    def _take_warm(
        self, model: LoadedModel, accelerator: str, process: str, node: str | None
    ) -> tuple[str, Any] | None:
        if not fits_warm_process(model.spec, accelerator, bool(process)) or not self._warm:
            return None
        for index, (name, actor, where) in enumerate(self._warm):
            # A replica meant for a node takes a warm process there, or none.
            if node is None or _resolved(where) == node:
                del self._warm[index]
                self.fill_warm_pool()
                return name, actor
        return None

    async def _create(self, options: dict[str, Any], shared: bool) -> Any:
        """Create (or, by its name, find) an actor, off the event loop: a named actor's
        creation waits on the GCS (the name looked up, then registered), and a GCS slow to
        answer, as one just started on a busy machine, must not stall the gateway served from
        this loop. Atomic, as it was on the loop: a start cancelled meanwhile (even again and
        again) finishes the creation, then kills what it made (an origin's shared process, which
        may serve its other models, is kept), and creations of one name take turns. (A later
        start can still find a killed actor that Ray has not yet ended, as before: its load
        then fails and the planner starts it again.)"""
        name = options["name"]
        turn = self._creating.setdefault(name, _Turn())
        turn.users += 1
        try:
            async with turn.lock:
                creating = asyncio.ensure_future(
                    asyncio.to_thread(self._remote.options(**options).remote)
                )
                try:
                    actor = await asyncio.shield(creating)
                except asyncio.CancelledError:
                    while not creating.done():  # cancelled again meanwhile: still wait
                        with contextlib.suppress(asyncio.CancelledError):
                            await asyncio.wait({creating})
                    if not creating.cancelled() and creating.exception() is None:
                        made = creating.result()
                        if shared:
                            self._keep(name, made)
                        else:
                            with contextlib.suppress(Exception):
                                ray.kill(made, no_restart=True)
                    raise
        finally:
            turn.users -= 1
            if not turn.users:
                del self._creating[name]
        self._keep(name, actor)
        return actor

    def _keep(self, name: str, actor: Any) -> None:
        if not self._detached:  # a handle must stay alive, or Ray ends the actor
            self._owned.setdefault(name, actor)

    async def start(
        self,
        identity: WorkerIdentity,
        model: LoadedModel,
        source: SourceRequest,
        accelerator: str,
        resources: dict[str, float],
        *,
        memory_limit: int = 0,
        process: str = "",
        node: str | None = None,
    ) -> tuple[WorkerHandle, LoadedInfo]:
        """Start the model: with `process`, in that shared process (perOrigin, started by
        whichever of the origin's models comes first); a model that reserves nothing of its
        own (`fits_warm_process`: a CPU model without cpu or memory requests) in its own
        model process under its origin's supervisor on the node; otherwise in a worker of
        its own. `node`: run there if it fits (away from the model's other replicas)."""
        if not process and fits_warm_process(model.spec, accelerator, shared=False):
            target = node or await self._only_node()
            if target is not None:
                return await self._start_supervised(
                    identity, model, source, accelerator, resources, memory_limit, target
                )
        return await self._start_own(
            identity,
            model,
            source,
            accelerator,
            resources,
            memory_limit=memory_limit,
            process=process,
            node=node,
        )

    async def _only_node(self) -> str | None:
        nodes = await self.recent_nodes()
        return nodes[0].id if len(nodes) == 1 else None

    async def _start_supervised(
        self,
        identity: WorkerIdentity,
        model: LoadedModel,
        source: SourceRequest,
        accelerator: str,
        resources: dict[str, float],
        memory_limit: int,
        node: str,
        retry: bool = True,
    ) -> tuple[WorkerHandle, LoadedInfo]:
        """Load into the origin's supervisor on `node` (a warm process, or a new actor, the
        first time), the model in a model process of its own whose death is its own."""
        worker_id = identity.worker_id
        spec = model.spec
        key = (spec.origin, node)
        turn = self._supervising.setdefault(key, _Turn())
        turn.users += 1
        try:
            async with turn.lock:  # one supervisor per origin and node, made once
                entry = self._supervisors.get(key)
                if entry is None:
                    entry = self._supervisors[key] = await self._new_supervisor(
                        model, accelerator, resources, node
                    )
            name, actor = entry
            handle = WorkerHandle(
                worker_id,
                origin_namespace(spec.origin),
                actor,
                self._socket_path(worker_id),
                supervisor=name,
            )
            request = self._load_request(
                identity, model, source, accelerator, memory_limit, handle, contained=True
            )
            try:
                info: LoadedInfo = await actor.load.remote(request)
            except RayTaskError as error:
                raise _start_error(error) from None
            except (RayActorError, ActorUnschedulableError) as error:
                # Gone (or its node went): the next start makes a new one; this one is tried
                # once more, the same way, then anywhere as a worker of its own.
                self._forget_supervisor(name)
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
                if retry and isinstance(error, RayActorError):
                    log.warning("the supervisor %s is gone; loading %s again", name, worker_id)
                    return await self._start_supervised(
                        identity,
                        model,
                        source,
                        accelerator,
                        resources,
                        memory_limit,
                        node,
                        retry=False,
                    )
                log.warning("%s: its node's supervisor failed; a worker of its own", worker_id)
                return await self._start_own(
                    identity, model, source, accelerator, resources, memory_limit=memory_limit
                )
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):  # its other models keep their worker
                    actor.unload.remote(worker_id)
                raise
            return handle, info
        finally:
            turn.users -= 1
            if not turn.users:
                del self._supervising[key]

    async def _new_supervisor(
        self, model: LoadedModel, accelerator: str, resources: dict[str, float], node: str
    ) -> tuple[str, Any]:
        warm = self._take_warm(model, accelerator, "", node)
        if warm is not None:
            return warm
        name = supervisor_name(model.spec.origin)
        options: dict[str, Any] = {
            "name": name,
            "namespace": origin_namespace(model.spec.origin),
            "num_cpus": 0,  # each model's threads are bounded by its spec
            "max_restarts": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False),
        }
        extra = {k: v for k, v in resources.items() if k != "GPU"}
        if extra:
            options["resources"] = extra
        if self._detached:
            options["lifetime"] = "detached"
        return name, await self._create(options, shared=True)

    def _supervising_now(self, name: str) -> bool:
        """Whether `name` is a supervisor this adapter uses (made, taken or adopted)."""
        return any(known == name for known, _actor in self._supervisors.values())

    def _forget_supervisor(self, name: str) -> None:
        for key, (known, _actor) in list(self._supervisors.items()):
            if known == name:
                del self._supervisors[key]
        self._owned.pop(name, None)

    def _load_request(
        self,
        identity: WorkerIdentity,
        model: LoadedModel,
        source: SourceRequest,
        accelerator: str,
        memory_limit: int,
        handle: WorkerHandle,
        contained: bool = False,
    ) -> LoadRequest:
        spec = model.spec
        listen = (
            Address("tcp", "0.0.0.0") if self._tcp else Address("unix", str(handle.socket_path))
        )
        return LoadRequest(
            source=source,
            sources=self._sources,
            listen=listen,
            identity=identity,
            threads=spec.threads,
            accelerator=accelerator,
            delegation=spec.delegation,
            delegate=self._delegates.get(accelerator),
            memory_limit=memory_limit,
            batching=_batch_policy(spec.batching),
            precision=spec.precision,
            contained=contained,
        )

    async def _start_own(
        self,
        identity: WorkerIdentity,
        model: LoadedModel,
        source: SourceRequest,
        accelerator: str,
        resources: dict[str, float],
        *,
        memory_limit: int = 0,
        process: str = "",
        node: str | None = None,
    ) -> tuple[WorkerHandle, LoadedInfo]:
        """A worker of the model's own, or with `process`, a load into that shared one."""
        worker_id = identity.worker_id
        spec = model.spec
        namespace = origin_namespace(spec.origin)
        options: dict[str, Any] = {
            "name": process or worker_id,
            "namespace": namespace,
            # No CPU reserved unless asked: LiteRT's threads are the real limit, and a laptop
            # with 2 cores must still hold more than 2 models.
            "num_cpus": spec.resources.cpu or 0,
            "max_restarts": 0,  # the reconcile core decides restarts, and sees each one
            "get_if_exists": True,  # a worker left by a previous operator is taken over
        }
        if spec.resources.memory_bytes and not process:
            options["memory"] = spec.resources.memory_bytes
        if process:
            options["num_cpus"] = 0  # shared: threads are bounded by each model's spec
        extra = dict(resources)
        if "GPU" in extra:  # Ray takes GPUs only by keyword
            options["num_gpus"] = extra.pop("GPU")
        if extra:
            options["resources"] = extra
        if self._detached:
            options["lifetime"] = "detached"
        if node is not None and not process:
            # Hard: Ray's soft affinity placed actors elsewhere though the node had room
            # (checked with ray.cluster_utils). The node had room when planned; if it went
            # since, the start is tried again without it (below).
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        warm = self._take_warm(model, accelerator, process, node)
        if warm is not None:
            taken, actor = warm
        else:
            taken = ""
            actor = await self._create(options, shared=bool(process))
        handle = WorkerHandle(
            worker_id, namespace, actor, self._socket_path(worker_id), process, taken
        )
        request = self._load_request(identity, model, source, accelerator, memory_limit, handle)
        try:
            info: LoadedInfo = await actor.load.remote(request)
        except RayTaskError as error:
            if not process:  # a shared process keeps serving the origin's other models
                self.stop(handle)
            raise _start_error(error) from None
        except ActorUnschedulableError:
            self.stop(handle)
            if node is None:
                raise WorkerStartError("Ray cannot place the worker on any node") from None
            log.warning("worker %s could not go to node %s; placing it anywhere", worker_id, node)
            return await self._start_own(
                identity,
                model,
                source,
                accelerator,
                resources,
                memory_limit=memory_limit,
                process=process,
            )
        except RayActorError as error:
            self.stop(handle)
            raise WorkerStartError(
                "the worker process died while loading the model "
                f"(LiteRT may have crashed on this file): {_short(error)}"
            ) from None
        except asyncio.CancelledError:
            if process:  # the origin's other models keep their process
                with contextlib.suppress(Exception):
                    actor.unload.remote(worker_id)
            else:
                self.stop(handle)
            raise
        return handle, info

    async def running(self) -> list[tuple[WorkerHandle, LoadedInfo | None]]:
        """Every model served in the cluster, with its worker (None: the worker has not
        loaded a model, e.g. the previous operator died while it was loading)."""
        found = await asyncio.gather(*(self._describe(n, ns) for n, ns in await self.names()))
        out: list[tuple[WorkerHandle, LoadedInfo | None]] = []
        idle_warm = {name for name, _, _ in self._warm}
        for handle, infos in (f for f in found if f is not None):
            if handle.worker_id in idle_warm:
                continue  # this adapter's own idle warm processes
            name = handle.worker_id
            if not infos and self._supervising_now(name):
                continue  # this adapter's own supervisor, empty or loading its first model
            supervises = is_supervisor(name) or (
                is_warm(name) and all(info.supervised for info in infos)
            )
            if infos and supervises:  # an origin's on a node
                for info in infos:
                    worker_id = info.identity.worker_id
                    key = (info.identity.origin, info.placement.node_id)
                    self._supervisors.setdefault(key, (name, handle.actor))
                    supervised = WorkerHandle(
                        worker_id,
                        handle.namespace,
                        handle.actor,
                        self._socket_path(worker_id),
                        supervisor=name,
                    )
                    out.append((supervised, info))
                continue
            shared = ProcessName.parse(handle.worker_id) is not None
            if not infos and shared:
                # An empty shared process: the pool decides (one of its models may be loading).
                out.append((dataclasses.replace(handle, process=handle.worker_id), None))
                continue
            if not infos:
                out.append((handle, None))
            for info in infos:
                worker_id = info.identity.worker_id
                process = handle.worker_id if shared else ""
                warm = handle.worker_id if is_warm(handle.worker_id) else ""
                out.append(
                    (
                        WorkerHandle(
                            worker_id,
                            handle.namespace,
                            handle.actor,
                            self._socket_path(worker_id),
                            process,
                            warm,
                        ),
                        info,
                    )
                )
        return out

    async def names(self) -> list[tuple[str, str]]:
        """(name, Ray namespace) of every Model Loader worker: one call to the GCS."""
        listed = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
        return [
            (e["name"], e["namespace"])
            for e in listed
            if is_ours(e["name"])
            and (e["namespace"].startswith(NAMESPACE_PREFIX) or e["namespace"] == WARM_NAMESPACE)
        ]

    async def _describe(
        self, name: str, namespace: str
    ) -> tuple[WorkerHandle, list[LoadedInfo]] | None:
        try:
            actor = await asyncio.to_thread(ray.get_actor, name, namespace)
        except ValueError:
            return None  # gone since the listing
        handle = WorkerHandle(name, namespace, actor, self._socket_path(name))
        try:
            infos: list[LoadedInfo] = await asyncio.wait_for(actor.info.remote(), 30)
        except (RayError, TimeoutError):
            # Busy (a long load ahead of this call) or dying: not the same as serving nothing.
            return None
        return handle, infos

    async def alive(self, handle: WorkerHandle, timeout: float = 5.0) -> str | None:
        """None when alive, else why not. A slow answer is not death: only Ray saying the
        actor is gone is, or a supervisor saying the model's process died."""
        try:
            if handle.supervisor:
                hosted, deaths = await self._hosting(handle, timeout)
                if handle.worker_id in hosted:
                    return None
                return deaths.get(handle.worker_id, "the worker does not host this model")
            await asyncio.wait_for(handle.actor.ping.remote(), timeout)
        except RayActorError as error:
            if handle.supervisor:
                self._forget_supervisor(handle.supervisor)
            return f"the worker process exited: {_short(error)}"
        except (TimeoutError, GetTimeoutError):
            return None
        except RayError as error:
            return f"the worker is unreachable: {_short(error)}"
        return None

    async def _hosting(self, handle: WorkerHandle, timeout: float) -> Hosting:
        """What a supervisor hosts. Asked once for all its models checked at the same time:
        one call per supervisor, not one per model (500 calls a second at 500 models)."""
        key = handle.supervisor
        asking = self._asking.get(key)
        if asking is None:
            asking = asyncio.ensure_future(_ask_hosting(handle, timeout))
            self._asking[key] = asking

            def done(finished: asyncio.Future[Hosting]) -> None:
                if self._asking.get(key) is finished:
                    del self._asking[key]
                if not finished.cancelled():
                    finished.exception()  # retrieved: its askers may all have gone

            asking.add_done_callback(done)
        return await asyncio.shield(asking)

    def stop(self, handle: WorkerHandle) -> None:
        """Kill the worker's process (for a shared one: all the models it hosts); for a
        supervised model, unload it, and end its supervisor once it hosts nothing."""
        if handle.supervisor:
            try:
                release = asyncio.get_running_loop().create_task(self._release(handle))
            except RuntimeError:  # no loop (shutting down): the unload alone
                with contextlib.suppress(Exception):
                    handle.actor.unload.remote(handle.worker_id)
            else:
                self._releases.add(release)
                release.add_done_callback(self._releases.discard)
            with contextlib.suppress(FileNotFoundError):  # at shutdown the release may not run
                handle.socket_path.unlink()
            return
        self._owned.pop(handle.warm_name or handle.process or handle.worker_id, None)
        self._forget_supervisor(handle.worker_id)  # an empty one found by a scan
        with contextlib.suppress(Exception):
            ray.kill(handle.actor, no_restart=True)
        with contextlib.suppress(FileNotFoundError):
            handle.socket_path.unlink()

    async def _release(self, handle: WorkerHandle) -> None:
        remaining = await self.unload(handle)
        busy = any(
            turn.users
            for key, turn in self._supervising.items()
            if self._supervisors.get(key, ("", None))[0] == handle.supervisor
        )
        if remaining == 0 and not busy:  # no start is loading into it either
            self._forget_supervisor(handle.supervisor)
            with contextlib.suppress(Exception):
                ray.kill(handle.actor, no_restart=True)

    async def unload(self, handle: WorkerHandle) -> int:
        """Stop serving one model of a shared process; returns how many it still hosts
        (-1: the process is gone)."""
        try:
            remaining: int = await asyncio.wait_for(
                handle.actor.unload.remote(handle.worker_id), 30
            )
        except (RayError, TimeoutError):
            return -1
        finally:
            with contextlib.suppress(FileNotFoundError):
                handle.socket_path.unlink()
        return remaining


@dataclass
class _Turn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


def _resolved(ref: Any) -> str | None:
    """An object's value if it is ready now, else None (never waits)."""
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return None
    try:
        return str(ray.get(ready[0]))
    except RayError:
        return None


def _start_error(error: RayTaskError) -> WorkerStartError:
    """A load's failure in the worker, as the pool reports it: LiteRT's (or the model
    process's) own message, else the worker's."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, ModelLoadError) or isinstance(error, ModelLoadError):
        return WorkerStartError(str(cause or error).strip())
    return WorkerStartError(f"the worker failed: {_short(cause or error)}")


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:400]


def _batch_policy(batching: Batching | None) -> BatchPolicy | None:
    if batching is None:
        return None
    return BatchPolicy(
        batching.max_batch_size,
        batching.max_queue_delay_microseconds / 1e6,
        batching.preferred_batch_sizes,
    )
