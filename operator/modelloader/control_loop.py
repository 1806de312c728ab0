"""The control loop, one for both modes: `modelloader local` and `modelloader operator` differ
only in where the desired state comes from (files, or the Kubernetes API: a `DesiredSource`)
and where statuses go (memory for `modelloader status`, or status patches and Events: a
`StatusSink`). Each pass reads the desired state, plans against what the pool observes, applies
the plan's effects, renders statuses and publishes the route table every gateway routes by.

Level-triggered: a pass runs on every observation (a worker loaded, died, a manifest changed)
and at least every `interval_seconds`; nothing a pass decides depends on an earlier pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Protocol

from modelloader_gateway.load import Load
from modelloader_gateway.routes import RouteTable
from modelloader_workers.wire.identity import ModelKey

from modelloader import status
from modelloader.control_metrics import ControlMetrics, quota_limits
from modelloader.manifests import Rejected
from modelloader.placement import Node, PlacementConfig
from modelloader.planner import DEFAULT_POLICIES, plan
from modelloader.policy import Policies
from modelloader.resource import LoadedModel
from modelloader.scaling import Scaled, Scaler
from modelloader.tenancy import TokenSecret, access_table
from modelloader.worker_pool import H, Sources, WorkerPool, Workers

log = logging.getLogger(__name__)

# A pass shorter than this follows a wake-up at once (see `run`).
MIN_PASS_GAP_SECONDS = 0.005


@dataclass(frozen=True)
class Desired:
    """What should run, as one source read it."""

    models: Sequence[LoadedModel]  # in creation order
    rejected: Sequence[Rejected] = ()
    policies: Policies = DEFAULT_POLICIES
    secrets: Sequence[TokenSecret] = ()
    # Who a call without a token acts for, where that origin's policy allows it.
    anonymous_origin: str | None = None
    problems: tuple[str, ...] = ()  # the source's own warnings (a file that does not parse)
    # The desired replicas a previous control plane published (status.desiredReplicas).
    scale_hints: Mapping[ModelKey, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    statuses: Mapping[ModelKey, dict[str, Any]]  # LoadedModels and rejected manifests
    listing: list[dict[str, Any]]  # namespace, name, origin, status: what `status` shows
    origins: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # OriginPolicy status
    problems: tuple[str, ...] = ()
    scaled: tuple[Scaled, ...] = ()  # the autoscaler's changes in this pass


class DesiredSource(Protocol):
    async def read(self) -> Desired | None:
        """The desired state now; None while the source has not seen everything once."""
        ...


class StatusSink(Protocol):
    async def publish(self, outcome: Outcome, desired: Desired) -> None: ...


class RouteChannel(Protocol):
    async def publish(self, table: RouteTable) -> None: ...

    async def load(self) -> Mapping[tuple[str, str], Load]:
        """The gateways' load per (origin, model) since the last call."""
        ...


class Runtime(Workers[H], Protocol[H]):
    """The Ray adapter, as the loop uses it besides the pool."""

    async def recent_capacity(self) -> dict[str, float]: ...

    async def recent_nodes(self) -> list[Node]: ...

    def fill_warm_pool(self) -> None: ...


@dataclass(frozen=True)
class LoopSettings:
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    interval_seconds: float = 0.5
    liveness_seconds: float = 1.0
    # How often Ray is searched for workers this loop did not start (a second operator's, or
    # one a crash left behind); None: never (local mode owns its private Ray).
    scan_seconds: float | None = None


class ControlLoop(Generic[H]):
    def __init__(
        self,
        source: DesiredSource,
        sink: StatusSink,
        channel: RouteChannel,
        runtime: Runtime[H],
        sources: Sources,
        metrics: ControlMetrics,
        settings: LoopSettings,
        health: Callable[[], str | None] | None = None,
    ) -> None:
        self.source = source
        self.sink = sink
        self.channel = channel
        self.runtime = runtime
        self.sources = sources
        self.metrics = metrics
        self.settings = settings
        # Whether the cluster the workers live in is still there; a problem ends `run`.
        self._health = health
        self.lost: str | None = None
        self._wake = asyncio.Event()
        self.pool = self._new_pool()
        self.synced = False  # a pass has published routes
        self._statuses: dict[ModelKey, dict[str, Any]] = {}
        self._published: RouteTable | None = None
        self._revision = 0
        self._restart_requested = False
        self.scaler = Scaler()  # kept across `restart`: a restarted loop in this process

    def _new_pool(self) -> WorkerPool[H]:
        return WorkerPool(self.runtime, self.sources, self.metrics, self.wake)

    def wake(self) -> None:
        self._wake.set()

    async def run(self, adopt: bool = True) -> str | None:
        """Pass after pass until cancelled, or until the workers' cluster is gone: then
        returns why."""
        if adopt:
            adopted = await self.pool.adopt()
            log.info("adopted %d running workers", adopted)
        self.runtime.fill_warm_pool()
        liveness = asyncio.ensure_future(self._liveness())
        try:
            interval = self.settings.interval_seconds
            while self.lost is None:
                self._wake.clear()
                if self._restart_requested:
                    self._restart_requested = False
                    adopted = await self.restart()
                    log.warning("control loop restarted: adopted %d running workers", adopted)
                started = time.monotonic()
                await self.reconcile_once()
                _raise_if_cancel_was_swallowed()
                # A pass over many models takes a while (tens of ms at 500, longer while
                # their processes start and take the CPU): the next one waits at least as long,
                # so a stream of wake-ups (loads finishing) still leaves at least half of the
                # event loop to what shares it (the gateway's data path).
                spent = time.monotonic() - started
                pause = min(spent, interval) if spent > MIN_PASS_GAP_SECONDS else 0.0
                if pause:
                    await asyncio.sleep(pause)
                # Not asyncio.wait_for: on Python 3.11 it returns the event's result when a
                # cancel arrives as the event is set, swallowing the cancel, and this loop
                # then never stops (an operator that did not stop, in CI). timeout() keeps it.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval - pause):  # still one per interval
                        await self._wake.wait()
        finally:
            liveness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await liveness
        return self.lost

    def request_restart(self) -> None:
        """Restart before the next pass (`restart`)."""
        self._restart_requested = True
        self.wake()

    async def restart(self) -> int:
        """Start afresh, as after a crash: forget every worker without stopping any, then
        adopt what runs. Returns how many were adopted."""
        await self.pool.abandon()
        self.pool = self._new_pool()
        return await self.pool.adopt()

    async def close(self, stop_workers: bool) -> None:
        """Stop the workers (local mode), or leave them serving for a successor (the
        operator: they are detached)."""
        if stop_workers:
            await self.pool.close()
        else:
            await self.pool.abandon()

    async def _liveness(self) -> None:
        settings = self.settings
        last_scan = time.monotonic()
        while True:
            await asyncio.sleep(settings.liveness_seconds)
            try:
                problem = self._health() if self._health is not None else None
                if problem is not None:
                    log.error("the workers' Ray is gone: %s", problem)
                    self.lost = problem
                    self.wake()
                    return
                await self.pool.check_liveness()
                # Drift the other way: workers in Ray that this loop did not start. Taken in,
                # then the planner keeps what is desired and stops the rest.
                scan = settings.scan_seconds
                if scan is not None and time.monotonic() - last_scan > scan:
                    last_scan = time.monotonic()
                    if await self.pool.adopt():
                        self.wake()
            except Exception:
                log.exception("liveness check failed")

    async def reconcile_once(self) -> None:
        started = time.perf_counter()
        try:
            desired = await self.source.read()
            if desired is not None:
                await self._pass(desired)
        except Exception:
            self.metrics.reconcile_errors.inc()
            log.exception("reconcile failed")
        finally:
            self.metrics.reconcile_duration.observe(time.perf_counter() - started)

    async def _pass(self, desired: Desired) -> None:
        capacity = await self.runtime.recent_capacity()
        nodes = await self.runtime.recent_nodes()
        policies = desired.policies
        views = self.pool.views()
        loads = await self.channel.load()
        running: dict[ModelKey, int] = {}
        for view in views:
            if view.state in ("starting", "ready"):
                running[view.key] = running.get(view.key, 0) + 1
        scale, scaled = self.scaler.update(
            desired.models, loads, running, time.monotonic(), desired.scale_hints
        )
        result = plan(
            desired.models,
            views,
            capacity,
            self.settings.placement,
            policies,
            scale=scale,
            nodes=nodes,
            signatures=self.pool.signatures,
        )
        self.pool.apply(result.effects)
        self.pool.forget_signatures({(m.key, m.fingerprint) for m in desired.models})
        for change in scaled:
            direction = "up" if change.after > change.before else "down"
            self.metrics.scaling_decisions.labels(change.origin, change.key.name, direction).inc()
            log.info(
                "%s: %d -> %d replicas (%s)", change.key, change.before, change.after, change.reason
            )

        now = datetime.now(UTC)
        statuses: dict[ModelKey, dict[str, Any]] = {}
        listing: list[dict[str, Any]] = []
        for model in desired.models:
            rendered = status.render(
                model, result.states[model.key], self._statuses.get(model.key), now
            )
            statuses[model.key] = rendered
            listing.append(_item(model.key, model.spec.origin, rendered))
        for reject in desired.rejected:
            rendered = status.render_rejected(reject, now)
            key = ModelKey(reject.namespace, reject.name)
            statuses[key] = rendered
            listing.append(_item(key, "", rendered))
        self._statuses = statuses

        self.metrics.count_phases([item["status"]["phase"] for item in listing])
        self.metrics.publish_replicas(
            {
                (m.spec.origin, m.name): (
                    state.desired,
                    sum(1 for w in state.replicas if w.state in ("starting", "ready")),
                    len(state.serving),
                )
                for m in desired.models
                if (state := result.states[m.key]) is not None
            }
        )
        self.metrics.observe_pass([(m.spec.origin, m.name) for m in desired.models], result.effects)
        usage = result.admission.usage  # per origin; a limit of None is unlimited: no series
        self.metrics.publish_quotas(
            {o: (u.used, quota_limits(u.limits, policies.of(o).quota)) for o, u in usage.items()}
        )
        origins = {
            origin: status.render_origin(u, policies.of(origin).explicit)
            for origin, u in usage.items()
        }

        access, secret_problems = access_table(policies, desired.secrets, desired.anonymous_origin)
        for problem in secret_problems:
            log.warning("Secret %s/%s: %s", problem.namespace, problem.name, problem.message)
        table = RouteTable(result.routes, access)
        if self._published is None or (table.routes, table.access) != (
            self._published.routes,
            self._published.access,
        ):
            self._revision += 1
            table = RouteTable(table.routes, table.access, self._revision)
            await self.channel.publish(table)
            self._published = table
        self.synced = True

        problems = desired.problems + tuple(
            f"Secret {p.namespace}/{p.name}: {p.message}" for p in secret_problems
        )
        outcome = Outcome(statuses, listing, origins, problems, tuple(scaled))
        await self.sink.publish(outcome, desired)


def _raise_if_cancel_was_swallowed() -> None:
    """End the loop if it was asked to stop during a pass that did not stop.

    A pass awaits code this project does not own (aiohttp, Ray's futures, `wait_for`, which on
    Python 3.11 returns a result that arrives with a cancel and drops the cancel). A cancel
    lost there leaves the task marked as cancelling but running, and the loop would then run
    forever (an operator that did not stop within 30 s, in CI). Between passes nothing of
    ours is inside a timeout, so a request still counted means one that was lost."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        log.warning("a stop request was lost during a pass; stopping now")
        raise asyncio.CancelledError


def _item(key: ModelKey, origin: str, rendered: dict[str, Any]) -> dict[str, Any]:
    return {"namespace": key.namespace, "name": key.name, "origin": origin, "status": rendered}
