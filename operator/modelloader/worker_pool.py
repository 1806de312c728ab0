"""Carries out the reconcile core's effects on Ray and reports what it observes.

It owns the workers' records: a `WorkerView` for the planner, the Ray handle, and the task that
fetches and loads the model. Nothing here decides anything: starts and stops come from
`reconcile.plan`, and every state change is an observation (loaded, failed, died).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from modelloader_workers.worker import LoadedInfo

from modelloader.control_metrics import ControlMetrics
from modelloader.ray_workers import RayWorkers, WorkerHandle, WorkerStartError, worker_name
from modelloader.reconcile import Effect, StartWorker, StopWorker, WorkerView
from modelloader.sources import ModelSources, SourceError

log = logging.getLogger(__name__)

# Requests already sent to a replaced worker get this long to finish before it is killed.
DRAIN_SECONDS = 2.0
# Deaths of one spec's workers counted towards a crash loop (see reconcile.CRASH_LOOP_DEATHS).
CRASH_WINDOW_SECONDS = 300.0


@dataclass
class _Record:
    view: WorkerView
    handle: WorkerHandle | None = None
    task: asyncio.Task[None] | None = None


class WorkerPool:
    def __init__(
        self,
        workers: RayWorkers,
        sources: ModelSources,
        metrics: ControlMetrics,
        on_change: Callable[[], None],
    ) -> None:
        self._workers = workers
        self._sources = sources
        self._metrics = metrics
        self._on_change = on_change  # wake the reconcile loop: an observation changed
        self._records: dict[str, _Record] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._restarts: dict[tuple[str, str], int] = {}
        self._deaths: dict[tuple[str, str], list[float]] = {}  # (key, fingerprint) -> times
        # A shared process that died is started again under a new name (as for `.rN` workers:
        # Ray may not have released the dead one's yet).
        self._process_epochs: dict[str, int] = {}
        self._abandoned = False

    def views(self) -> list[WorkerView]:
        return [r.view for r in self._records.values()]

    def apply(self, effects: tuple[Effect, ...]) -> None:
        for effect in effects:
            if isinstance(effect, StartWorker):
                self._start(effect)
            else:
                self._stop(effect)

    def _start(self, effect: StartWorker) -> None:
        model = effect.model
        restarts = self._restarts.get((model.key, model.fingerprint), 0)
        worker_id = worker_name(model, restarts)
        view = WorkerView(
            worker_id,
            model.key,
            model.fingerprint,
            model.generation,
            "starting",
            origin=model.spec.origin,
            restarts=restarts,
            process=effect.process,
        )
        record = _Record(view)
        self._records[worker_id] = record
        record.task = self._spawn(self._load(record, effect))

    async def _load(self, record: _Record, effect: StartWorker) -> None:
        model = effect.model
        started = time.perf_counter()
        try:
            fetched = await asyncio.to_thread(self._sources.fetch, model)
            if effect.max_model_bytes is not None and fetched.size > effect.max_model_bytes:
                raise SourceError(
                    f"the model file is {fetched.size} bytes, over origin "
                    f"{model.spec.origin!r}'s maxModelBytes of {effect.max_model_bytes}"
                )
            handle, info = await self._workers.start(
                record.view.id,
                model,
                fetched.path,
                effect.accelerator,
                dict(effect.resources),
                memory_limit=effect.memory_limit,
                process=self._actor_name(effect.process),
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
        self._observe(record, **(_ready(info) | {"load_seconds": seconds}))

    def _observe(self, record: _Record, **changes: object) -> None:
        if record.view.id not in self._records:
            return  # stopped meanwhile
        record.view = dataclasses.replace(record.view, **changes)  # type: ignore[arg-type]
        self._on_change()

    def _stop(self, effect: StopWorker) -> None:
        record = self._records.pop(effect.worker_id, None)
        if record is None:
            return
        if record.view.state == "dead":
            view = record.view
            identity = (view.key, view.fingerprint)
            self._restarts[identity] = self._restarts.get(identity, 0) + 1
            self._metrics.worker_restarts.labels(view.origin, view.key.split("/", 1)[1]).inc()
        if record.task is not None and not record.task.done():
            record.task.cancel()
        if record.handle is not None:
            handle = record.handle
            delay = DRAIN_SECONDS if record.view.state == "ready" else 0.0
            self._spawn(self._kill_later(handle, delay))

    async def _kill_later(self, handle: WorkerHandle, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:  # cancelled at shutdown: kill now
            # Unless the same worker was asked for again meanwhile (a spec edited and reverted
            # within the drain time): then it was taken over, not left behind.
            if handle.worker_id not in self._records and not self._abandoned:
                if handle.shared:
                    await self._release_shared(handle)
                else:
                    self._workers.stop(handle)

    async def _release_shared(self, handle: WorkerHandle) -> None:
        """Unload one model from a shared process; the process goes when nobody uses it."""
        remaining = await self._workers.unload(handle)
        if remaining <= 0 and not self._in_use(handle.process):
            # A later model for this slot gets a new process name: Ray may still hand out the
            # dying actor under the old one.
            base = _base_process(handle.process)
            self._process_epochs[base] = self._process_epochs.get(base, 0) + 1
            self._workers.stop(handle)

    def _in_use(self, actor_name: str) -> bool:
        """Whether a model of this pool is loading or served in that shared process."""
        return any(
            self._actor_name(r.view.process) == actor_name
            for r in self._records.values()
            if r.view.process and r.view.state in ("starting", "ready")
        )

    def _actor_name(self, process: str) -> str:
        epoch = self._process_epochs.get(process, 0)
        return f"{process}.r{epoch}" if process and epoch else process

    async def adopt(self) -> int:
        """Take over the workers a previous control plane left running (detached actors).
        Those that never finished loading are stopped; the planner decides about the rest."""
        adopted = 0
        for handle, info in await self._workers.running():
            if handle.worker_id in self._records:
                continue
            if info is None and handle.shared:
                if not self._in_use(handle.process):
                    self._workers.stop(handle)
                continue
            identity = info.identity if info is not None else {}
            if info is None or not {"key", "fingerprint", "generation"} <= identity.keys():
                self._workers.stop(handle)
                continue
            view = WorkerView(
                handle.worker_id,
                str(identity["key"]),
                str(identity["fingerprint"]),
                int(identity["generation"]),
                origin=str(identity.get("origin", "")),
                process=_base_process(handle.process),
                **_ready(info),
            )
            if handle.process:  # new models join the process adopted, not an older name
                base, epoch = _split_epoch(handle.process)
                self._process_epochs[base] = max(self._process_epochs.get(base, 0), epoch)
            self._records[handle.worker_id] = _Record(view, handle)
            adopted += 1
            # A replacement must not reuse this worker's name (`.rN`): Ray may hold a dead
            # actor's name for a while.
            _, restarts = _split_epoch(handle.worker_id)
            if restarts:
                identity_key = (view.key, view.fingerprint)
                self._restarts[identity_key] = max(self._restarts.get(identity_key, 0), restarts)
        return adopted

    async def check_liveness(self) -> None:
        """Observe deaths of ready workers (a crash, an OOM kill, a `kill -9`)."""
        now = time.monotonic()
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
                if (record.view.placement or {}).get("sandbox"):
                    verdict += (
                        "; its model ran sandboxed, and the sandbox kills a process whose "
                        "model tries exec, fork or ptrace"
                    )
                log.warning("worker %s died: %s", record.view.id, verdict)
                identity = (record.view.key, record.view.fingerprint)
                deaths = [*self._deaths.get(identity, []), now]  # pruned to the window above
                self._deaths[identity] = deaths
                process = record.view.process
                if process and record.handle and record.handle.process == self._actor_name(process):
                    self._process_epochs[process] = self._process_epochs.get(process, 0) + 1
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
        for task in list(self._background):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._background, return_exceptions=True)

    async def close(self) -> None:
        for record in self._records.values():
            if record.task is not None:
                record.task.cancel()
            if record.handle is not None:
                self._workers.stop(record.handle)
        self._records.clear()
        for task in list(self._background):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def _split_epoch(actor_name: str) -> tuple[str, int]:
    """A worker's or shared process's name without its restart suffix (`.rN`), and N (0 for
    none): the planner's name, and how many were started under it before."""
    base, dot, epoch = actor_name.rpartition(".")
    if dot and epoch.startswith("r") and epoch[1:].isdigit():
        return base, int(epoch[1:])
    return actor_name, 0


def _base_process(actor_name: str) -> str:
    return _split_epoch(actor_name)[0]


def _ready(info: LoadedInfo) -> dict[str, Any]:
    """The observation of a loaded worker."""
    placement = {
        "node": info.host,
        "nodeId": info.node_id,
        "accelerator": info.accelerator,
        "delegate": info.delegate,
        "pid": info.pid,
    }
    if info.sandbox:
        placement["sandbox"] = info.sandbox
    if info.delegated_ops_share is not None:
        placement["delegatedOpsShare"] = info.delegated_ops_share
    return {
        "state": "ready",
        "signature": info.signature,
        "placement": placement,
        "address": info.address,
        "note": info.note,
        "load_seconds": info.load_seconds,
    }
