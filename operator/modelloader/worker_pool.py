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
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from modelloader.control_metrics import ControlMetrics
from modelloader.ray_workers import RayWorkers, WorkerHandle, WorkerStartError
from modelloader.reconcile import Effect, StartWorker, StopWorker, WorkerView
from modelloader.sources import ModelSources, SourceError

log = logging.getLogger(__name__)

# Requests already sent to a replaced worker get this long to finish before it is killed.
DRAIN_SECONDS = 2.0


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
        worker_id = (
            f"lm.{model.namespace}.{model.name}.{model.fingerprint[:8]}.{uuid.uuid4().hex[:6]}"
        )
        view = WorkerView(worker_id, model.key, model.fingerprint, model.generation, "starting")
        record = _Record(view)
        self._records[worker_id] = record
        record.task = self._spawn(self._load(record, effect))

    async def _load(self, record: _Record, effect: StartWorker) -> None:
        model = effect.model
        started = time.perf_counter()
        try:
            fetched = await asyncio.to_thread(self._sources.fetch, model)
            handle, info = await self._workers.start(
                record.view.id, model, fetched.path, dict(effect.resources)
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
        placement = {
            "node": info.node,
            "accelerator": effect.accelerator,
            "delegate": "xnnpack" if effect.accelerator == "cpu" else effect.accelerator,
            "pid": info.pid,
        }
        self._observe(
            record,
            state="ready",
            signature=info.signature,
            load_seconds=seconds,
            placement=placement,
            address=info.address,
        )

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
            model = record.view.key.split("/", 1)
            self._metrics.worker_restarts.labels(model[0], model[1]).inc()
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
            self._workers.stop(handle)

    async def check_liveness(self) -> None:
        """Observe deaths of ready workers (a crash, an OOM kill, a `kill -9`)."""
        ready = [r for r in self._records.values() if r.view.state == "ready" and r.handle]
        verdicts = await asyncio.gather(
            *(self._workers.alive(r.handle) for r in ready if r.handle is not None)
        )
        for record, verdict in zip(ready, verdicts, strict=True):
            if verdict is not None:
                log.warning("worker %s died: %s", record.view.id, verdict)
                self._observe(record, state="dead", message=verdict, address=None)

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
