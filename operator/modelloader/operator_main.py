"""`modelloader operator`: the kopf operator that reconciles LoadedModels on Kubernetes into
Ray workers.

Handlers stay thin: a watch handler keeps the desired LoadedModels (rebuilt from the API on
every start: kopf lists before it watches), a delete handler holds the finalizer until the
model's workers are gone. The reconcile loop is level-triggered: every pass compares all desired
models with the workers that exist in Ray (adopted after a restart) and heals drift, the same
pass `modelloader local` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from aiohttp import web
from modelloader_workers.litert_runner import ExternalDelegate
from prometheus_client import CollectorRegistry

from modelloader import API_GROUP, API_VERSION
from modelloader.control_metrics import ControlMetrics
from modelloader.kube_client import KubeClient
from modelloader.manifests import Rejected
from modelloader.metrics_endpoint import serve_metrics
from modelloader.placement import PlacementConfig
from modelloader.ray_workers import RayWorkers, connect_ray
from modelloader.reconciler import Reconciler
from modelloader.resource import LoadedModel, ManifestError, parse_loaded_model
from modelloader.sources import ModelSources, SourcePolicy
from modelloader.worker_pool import WorkerPool

log = logging.getLogger(__name__)

PLURAL = "loadedmodels"
FINALIZER = f"{API_GROUP}/finalizer"


@dataclass(frozen=True)
class OperatorConfig:
    model_roots: tuple[Path, ...]
    cache_dir: Path
    state_dir: Path  # the workers' data-path sockets (a volume shared with the gateway)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local "auto" cluster
    interval_seconds: float = 1.0
    liveness_seconds: float = 1.0
    delegates: Mapping[str, ExternalDelegate] = field(default_factory=dict)  # gpu/npu -> lib
    worker_transport: str = "tcp"  # "unix" when the gateway shares the workers' node
    scan_seconds: float = 10.0  # how often Ray is searched for workers nobody asked for
    namespaces: tuple[str, ...] = ()  # empty: the whole cluster
    metrics_port: int = 0  # Prometheus /metrics on every interface (the CLI: 9090); 0: none


class LoadedModelOperator:
    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.registry = kopf.OperatorRegistry()
        self.metrics = ControlMetrics(CollectorRegistry())
        self.bodies: dict[str, dict[str, Any]] = {}  # key -> the LoadedModel as last seen
        self.patched: dict[str, dict[str, Any]] = {}  # key -> the status we last wrote
        self.pool: WorkerPool | None = None
        self.reconciler: Reconciler | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._client: KubeClient | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._capacity: dict[str, float] = {}
        self._capacity_at = 0.0
        self._register()

    # kopf wiring: thin handlers

    def _register(self) -> None:
        resource = (API_GROUP, API_VERSION, PLURAL)
        on = kopf.on

        @on.startup(registry=self.registry)
        async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
            settings.persistence.finalizer = FINALIZER
            settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
                prefix=API_GROUP
            )
            settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
                prefix=API_GROUP, key="last-handled-configuration"
            )
            settings.posting.level = logging.INFO
            settings.watching.server_timeout = 60
            await self._start()

        @on.login(registry=self.registry)
        async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
            # In-cluster service account first, then KUBECONFIG / ~/.kube/config.
            info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
            if info is not None:
                self._client = KubeClient(info)
            return info

        @on.cleanup(registry=self.registry)
        async def cleanup(**_: Any) -> None:
            await self._stop()

        @on.event(*resource, registry=self.registry)
        def watched(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
            key = f"{body.metadata.namespace}/{body.metadata.name}"
            if event.get("type") == "DELETED" or body.metadata.get("deletionTimestamp"):
                self.bodies.pop(key, None)
            else:
                self.bodies[key] = dict(body)
            self._wake.set()

        @on.delete(*resource, registry=self.registry)
        def deleted(body: kopf.Body, **_: Any) -> None:
            key = f"{body.metadata.namespace}/{body.metadata.name}"
            self.bodies.pop(key, None)
            self._wake.set()
            if self.pool is not None and any(v.key == key for v in self.pool.views()):
                raise kopf.TemporaryError("waiting for the model's workers to stop", delay=1)

    # The control loop

    async def _start(self) -> None:
        config = self.config
        await connect_ray(config.ray_address, "operator")
        if config.metrics_port:
            self._metrics_runner = await serve_metrics(
                self.metrics.registry, "0.0.0.0", config.metrics_port
            )
        workers = RayWorkers(
            config.state_dir,
            detached=True,
            delegates=config.delegates,
            tcp=config.worker_transport == "tcp",
        )
        sources = ModelSources(SourcePolicy(roots=config.model_roots, cache_dir=config.cache_dir))
        self.pool = WorkerPool(workers, sources, self.metrics, self._wake.set)
        self._workers = workers
        adopted = await self.pool.adopt()
        log.info("adopted %d running workers", adopted)
        self.reconciler = Reconciler(self.pool, self.metrics, config.placement)
        self._tasks = [
            asyncio.ensure_future(self._loop()),
            asyncio.ensure_future(self._liveness()),
        ]

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        # Workers are detached: they keep serving while the operator is away.
        if self._client is not None:
            await self._client.close()

    async def _loop(self) -> None:
        # kopf lists every LoadedModel before it watches; give that first listing a moment so
        # that the first pass does not stop workers whose models it has not seen yet.
        await asyncio.sleep(self.config.interval_seconds)
        while True:
            self._wake.clear()
            started = time.perf_counter()
            try:
                await self.reconcile_once()
            except Exception:
                self.metrics.reconcile_errors.inc()
                log.exception("reconcile failed")
            finally:
                self.metrics.reconcile_duration.observe(time.perf_counter() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.interval_seconds)

    async def _liveness(self) -> None:
        last_scan = time.monotonic()
        while True:
            await asyncio.sleep(self.config.liveness_seconds)
            if self.pool is None:
                continue
            try:
                await self.pool.check_liveness()
                # Drift the other way: workers in Ray that this operator did not start (a
                # second operator's, or one left from a crash). Taken in, then the planner
                # keeps what is desired and stops the rest.
                if time.monotonic() - last_scan > self.config.scan_seconds:
                    last_scan = time.monotonic()
                    if await self.pool.adopt():
                        self._wake.set()
            except Exception:
                log.exception("liveness check failed")

    async def reconcile_once(self) -> None:
        assert self.reconciler is not None
        models, rejected = desired(self.bodies.values())
        if time.monotonic() - self._capacity_at > 5.0:
            self._capacity = await asyncio.to_thread(self._workers.capacity)
            self._capacity_at = time.monotonic()
        outcome = self.reconciler.step(models, rejected, self._capacity)
        await self._publish(outcome.statuses)

    async def _publish(self, statuses: Mapping[str, dict[str, Any]]) -> None:
        if self._client is None:
            return
        for key, rendered in statuses.items():
            body = self.bodies.get(key)
            if body is None or self.patched.get(key) == rendered:
                continue
            if body.get("status") == rendered:
                self.patched[key] = rendered
                continue
            namespace, name = key.split("/", 1)
            previous = (body.get("status") or {}).get("phase")
            if await self._client.patch_status(namespace, name, rendered):
                self.patched[key] = rendered
                if previous != rendered.get("phase"):
                    await self._event(body, rendered)
        for gone in set(self.patched) - set(statuses):
            del self.patched[gone]

    async def _event(self, body: Mapping[str, Any], rendered: Mapping[str, Any]) -> None:
        assert self._client is not None
        phase = str(rendered.get("phase"))
        kind = "Warning" if phase == "Failed" else "Normal"
        try:  # events are a courtesy; the status is the record
            await self._client.post_event(body, kind, phase, str(rendered.get("message") or phase))
        except Exception as error:
            log.warning("posting an event failed: %s", error)


def desired(bodies: Any) -> tuple[list[LoadedModel], list[Rejected]]:
    """Parse the watched objects, oldest first (on a name clash the older model wins)."""
    ordered = sorted(
        bodies,
        key=lambda b: (
            str(b.get("metadata", {}).get("creationTimestamp", "")),
            str(b.get("metadata", {}).get("namespace", "")),
            str(b.get("metadata", {}).get("name", "")),
        ),
    )
    models: list[LoadedModel] = []
    rejected: list[Rejected] = []
    for body in ordered:
        meta = body.get("metadata", {})
        namespace, name = str(meta.get("namespace", "default")), str(meta.get("name", ""))
        try:
            models.append(parse_loaded_model(body, default_namespace=namespace))
        except ManifestError as error:
            rejected.append(Rejected(namespace, name, "kubernetes", str(error)))
    return models, rejected


async def run_operator(
    config: OperatorConfig,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
) -> None:
    operator = LoadedModelOperator(config)
    await kopf.operator(
        registry=operator.registry,
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        standalone=True,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
