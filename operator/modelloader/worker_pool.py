"""Carries out the planner's effects on the workers and reports what it observes.

It owns the workers' records: a `WorkerView` for the planner, the runtime's handle, and the task
that fetches and loads the model. Nothing here decides anything: starts and stops come from
`planner.plan`, and every state change is an observation (loaded, failed, died). The runtime
is reached through the `Workers` protocol only (the Ray adapter in production, a fake in unit
tests, as Ray Serve tests its deployment state).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from modelloader_workers.fetching import SourceError, SourceRequest
from modelloader_workers.wire.identity import ModelKey, WorkerIdentity
from modelloader_workers.wire.signature import Signature
from modelloader_workers.worker import LoadedInfo

from modelloader.control_metrics import ControlMetrics
from modelloader.planner import Effect, ProcessSlot, StartWorker, StopWorker, WorkerView
from modelloader.resource import LoadedModel
from modelloader.worker_names import ProcessName, WorkerName

log = logging.getLogger(__name__)

# Requests already sent to a replaced worker get this long to finish before it is killed.
DRAIN_SECONDS = 2.0
# Deaths of one spec's workers counted towards a crash loop (see planner.CRASH_LOOP_DEATHS).
CRASH_WINDOW_SECONDS = 300.0


class WorkerStartError(RuntimeError):
    """The worker could not be started or could not load its model; the message says why."""


class Handle(Protocol):
    """What the pool needs of the runtime's handle on one hosted model."""

    @property
    def worker_id(self) -> str: ...

    @property
    def process(self) -> str:
        """The shared process's actor name ("" for a process of its own)."""
        ...


H = TypeVar("H", bound=Handle)


class Workers(Protocol[H]):
    """The runtime the pool drives (`ray_workers.RayWorkers`)."""

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
    ) -> tuple[H, LoadedInfo]:
        """Start the worker (or load into the shared process named `process`), on `node`
        where it fits there; raises `WorkerStartError` with a readable message."""
        ...

    async def running(self) -> Sequence[tuple[H, LoadedInfo | None]]:
        """Every hosted model in the cluster (None: its process has loaded nothing)."""
        ...

    async def alive(self, handle: H) -> str | None:
        """None while alive, else why not."""
        ...

    def stop(self, handle: H) -> None:
        """Kill the process (for a shared one: every model in it)."""
        ...

    async def unload(self, handle: H) -> int:
        """Unload one model of a shared process; how many it still hosts (-1: gone)."""
        ...


class Sources(Protocol):
    async def request(self, model: LoadedModel, max_bytes: int | None) -> SourceRequest:
        """What the worker's node is to fetch, credentials included; raises SourceError
        (e.g. the credentials Secret is missing)."""
        ...


@dataclass
class _Record(Generic[H]):
    view: WorkerView
    handle: H | None = None
    task: asyncio.Task[None] | None = None


class WorkerPool(Generic[H]):
    def __init__(
        self,
        workers: Workers[H],
        sources: Sources,
        metrics: ControlMetrics,
        on_change: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        drain_seconds: float = DRAIN_SECONDS,
    ) -> None:
        self._workers = workers
        self._sources = sources
        self._metrics = metrics
        self._on_change = on_change  # wake the control loop: an observation changed
        self._clock = clock
        self._drain_seconds = drain_seconds
        self._records: dict[str, _Record[H]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._restarts: dict[tuple[ModelKey, str, int], int] = {}  # (key, fp, replica) ->
        self._deaths: dict[tuple[ModelKey, str], list[float]] = {}  # (key, fingerprint) ->
        # A shared process that died is started again under a new name (as for `.rN` workers:
        # Ray may not have released the dead one's yet).
        self._process_epochs: dict[ProcessSlot, int] = {}
        self._abandoned = False
        # What each (model, spec) loaded, remembered after its workers stop: a model scaled
        # to zero still answers metadata, and the gateway checks the requests it holds.
        self.signatures: dict[tuple[ModelKey, str], Signature] = {}

    def views(self) -> list[WorkerView]:
        return [r.view for r in self._records.values()]

    def forget_signatures(self, keep: set[tuple[ModelKey, str]]) -> None:
        """Drop what was remembered of specs no longer wanted."""
        for gone in set(self.signatures) - keep:
            del self.signatures[gone]

    def serves(self, key: ModelKey) -> bool:
        """Whether any worker of this LoadedModel is still known."""
        return any(r.view.key == key for r in self._records.values())

    def apply(self, effects: Sequence[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, StartWorker):
                self._start(effect)
            else:
                self._stop(effect)

    def _start(self, effect: StartWorker) -> None:
        model = effect.model
        restarts = self._restarts.get((model.key, model.fingerprint, effect.replica), 0)
        name = WorkerName(model.key, model.fingerprint, effect.replica, restarts)
        view = WorkerView(
            name.format(),
            model.key,
            model.fingerprint,
            model.generation,
            "starting",
            origin=model.spec.origin,
            restarts=restarts,
            process=effect.process,
            replica=effect.replica,
        )
        record: _Record[H] = _Record(view)
        self._records[view.id] = record
        record.task = self._spawn(self._load(record, effect))

    async def _load(self, record: _Record[H], effect: StartWorker) -> None:
        model = effect.model
        started = time.perf_counter()
        identity = WorkerIdentity(
            model.key,
            model.spec.origin,
            model.fingerprint,
            model.generation,
            record.view.id,
            effect.replica,
        )
        try:
            source = await self._sources.request(model, effect.max_model_bytes)
            handle, info = await self._workers.start(
                identity,
                model,
                source,
                effect.accelerator,
                dict(effect.resources),
                memory_limit=effect.memory_limit,
                process=self._process_name(effect.process),
                node=effect.node,
            )
        except (SourceError, WorkerStartError) as error:
            self._observe(record, state="failed", message=str(error))
            return
        except Exception as error:  # never let one model's surprise stop the loop
            log.exception("starting worker %s failed", record.view.id)
            self._observe(record, state="failed", message=f"internal error: {error}")
            return
        record.handle = handle
        seconds = time.perf_counter() - started
        self._metrics.load_duration.labels(
            model.spec.origin, model.name, effect.accelerator
        ).observe(seconds)
        self._observe(record, **(_loaded(info) | {"load_seconds": seconds}))

    def _observe(self, record: _Record[H], **changes: object) -> None:
        if record.view.id not in self._records:
            return  # stopped meanwhile
        view = record.view = dataclasses.replace(record.view, **changes)  # type: ignore[arg-type]
        if view.signature is not None:
            self.signatures[(view.key, view.fingerprint)] = view.signature
        self._on_change()

    def _stop(self, effect: StopWorker) -> None:
        record = self._records.pop(effect.worker_id, None)
        if record is None:
            return
        view = record.view
        if view.state == "dead":
            restarted = (view.key, view.fingerprint, view.replica)
            self._restarts[restarted] = self._restarts.get(restarted, 0) + 1
            self._metrics.worker_restarts.labels(view.origin, view.key.name).inc()
        if record.task is not None and not record.task.done():
            record.task.cancel()
        if record.handle is not None:
            handle = record.handle
            delay = self._drain_seconds if view.state == "ready" else 0.0
            self._spawn(self._kill_later(handle, delay))

    async def _kill_later(self, handle: H, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:  # cancelled at shutdown: kill now
            # Unless the same worker was asked for again meanwhile (a spec edited and reverted
            # within the drain time): then it was taken over, not left behind.
            if handle.worker_id not in self._records and not self._abandoned:
                if handle.process:
                    await self._release_shared(handle)
                else:
                    self._workers.stop(handle)

    async def _release_shared(self, handle: H) -> None:
        """Unload one model from a shared process; the process goes when nobody uses it."""
        remaining = await self._workers.unload(handle)
        if remaining <= 0 and not self._in_use(handle.process):
            # A later model for this slot gets a new process name: Ray may still hand out the
            # dying actor under the old one.
            parsed = ProcessName.parse(handle.process)
            if parsed is not None:
                slot = parsed.slot
                self._process_epochs[slot] = self._process_epochs.get(slot, 0) + 1
            self._workers.stop(handle)

    def _in_use(self, actor_name: str) -> bool:
        """Whether a model of this pool is loading or served in that shared process."""
        return any(
            self._process_name(r.view.process) == actor_name
            for r in self._records.values()
            if r.view.process and r.view.state in ("starting", "ready")
        )

    def _process_name(self, slot: ProcessSlot | None) -> str:
        if slot is None:
            return ""
        return ProcessName(slot, self._process_epochs.get(slot, 0)).format()

    async def adopt(self) -> int:
        """Take over the workers a previous control plane left running (detached actors).
        Those that never finished loading are stopped; the planner decides about the rest."""
        adopted = 0
        for handle, info in await self._workers.running():
            if handle.worker_id in self._records:
                continue
            if info is None:
                if not (handle.process and self._in_use(handle.process)):
                    self._workers.stop(handle)
                continue
            process = ProcessName.parse(handle.process) if handle.process else None
            identity = info.identity
            view = WorkerView(
                handle.worker_id,
                identity.key,
                identity.fingerprint,
                identity.generation,
                origin=identity.origin,
                process=process.slot if process else None,
                replica=identity.replica,
                **_loaded(info),
            )
            if process is not None:  # new models join the process adopted, not an older name
                slot = process.slot
                self._process_epochs[slot] = max(self._process_epochs.get(slot, 0), process.epoch)
            self._records[handle.worker_id] = _Record(view, handle)
            if view.signature is not None:
                self.signatures[(view.key, view.fingerprint)] = view.signature
            adopted += 1
            # A replacement must not reuse this worker's name (`.rN`): Ray may hold a dead
            # actor's name for a while.
            name = WorkerName.parse(handle.worker_id)
            if name is not None and name.restarts:
                restarted = (view.key, view.fingerprint, view.replica)
                self._restarts[restarted] = max(self._restarts.get(restarted, 0), name.restarts)
        return adopted

    async def check_liveness(self) -> None:
        """Observe deaths of ready workers (a crash, an OOM kill, a `kill -9`)."""
        now = self._clock()
        self._deaths = {
            k: recent
            for k, v in self._deaths.items()
            if (recent := [t for t in v if now - t < CRASH_WINDOW_SECONDS])
        }
        ready = [r for r in self._records.values() if r.view.state == "ready" and r.handle]
        verdicts = await asyncio.gather(
            *(self._workers.alive(r.handle) for r in ready if r.handle is not None)
        )
        for record, verdict in zip(ready, verdicts, strict=True):
            if verdict is not None:
                placement = record.view.placement
                if placement is not None and placement.sandbox:
                    verdict += (
                        "; its model ran sandboxed, and the sandbox kills a process whose "
                        "model tries exec, fork or ptrace"
                    )
                log.warning("worker %s died: %s", record.view.id, verdict)
                spec = (record.view.key, record.view.fingerprint)
                deaths = [*self._deaths.get(spec, []), now]  # pruned to the window above
                self._deaths[spec] = deaths
                slot = record.view.process
                if (
                    slot is not None
                    and record.handle is not None
                    and record.handle.process == self._process_name(slot)
                ):
                    self._process_epochs[slot] = self._process_epochs.get(slot, 0) + 1
                self._observe(
                    record,
                    state="dead",
                    message=verdict,
                    address=None,
                    recent_deaths=len(deaths),
                )

    async def abandon(self) -> None:
        """Forget everything without stopping anything, as a crashed control plane would: a
        successor adopts the running workers (`adopt`)."""
        self._abandoned = True
        for record in self._records.values():
            if record.task is not None:
                record.task.cancel()
        self._records.clear()
        await self._cancel_background()

    async def close(self) -> None:
        for record in self._records.values():
            if record.task is not None:
                record.task.cancel()
            if record.handle is not None:
                self._workers.stop(record.handle)
        self._records.clear()
        await self._cancel_background()

    async def _cancel_background(self) -> None:
        for task in list(self._background):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def _loaded(info: LoadedInfo) -> dict[str, Any]:
    """The observation of a loaded worker."""
    return {
        "state": "ready",
        "signature": info.signature,
        "placement": info.placement,
        "address": info.address,
        "note": info.note,
        "load_seconds": info.load_seconds,
        "model_file": info.model,
    }
