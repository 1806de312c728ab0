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
from modelloader_workers.gateway.access import AccessTable
from modelloader_workers.litert_runner import ExternalDelegate
from prometheus_client import CollectorRegistry

from modelloader import API_GROUP, API_VERSION
from modelloader.control_metrics import ControlMetrics
from modelloader.kube_client import PLURAL, POLICY_PLURAL, KubeClient
from modelloader.manifests import Rejected
from modelloader.metrics_endpoint import serve_metrics
from modelloader.placement import PlacementConfig
from modelloader.policy import OriginPolicy, Policies, parse_origin_policy, policies
from modelloader.ray_workers import RayWorkers, connect_ray, publish_access
from modelloader.reconcile import unbound_message
from modelloader.reconciler import Reconciler
from modelloader.resource import LoadedModel, ManifestError, parse_loaded_model
from modelloader.sources import ModelSources, SourcePolicy
from modelloader.status import render_origins
from modelloader.tenancy import (
    ORIGIN_LABEL,
    SecretProblem,
    TokenSecret,
    access_table,
    parse_token_secret,
)
from modelloader.worker_pool import WorkerPool

log = logging.getLogger(__name__)

WEBHOOK_ID = "validate-loadedmodel"  # the webhook's URL path (the chart's webhook.path)
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
    # Origins without an OriginPolicy get this one (`--default-policy FILE`).
    default_policy: OriginPolicy = field(default_factory=lambda: OriginPolicy(""))
    # The validating admission webhook (`--webhook-port`); without a certificate it speaks
    # plain HTTP (tests); the chart mounts one made by Helm.
    webhook_port: int = 0
    warm_workers: int = 2  # idle worker processes kept started for CPU models
    webhook_cert: Path | None = None
    webhook_key: Path | None = None
    allow_source_hosts: tuple[str, ...] = ()  # non-public hosts http(s) sources may reach


class LoadedModelOperator:
    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.registry = kopf.OperatorRegistry()
        self.metrics = ControlMetrics(CollectorRegistry())
        self.bodies: dict[str, dict[str, Any]] = {}  # key -> the LoadedModel as last seen
        self.patched: dict[str, dict[str, Any]] = {}  # key -> the status we last wrote
        # origin -> its OriginPolicy, parsed once as seen (None: invalid), and its generation
        self.origin_policies: dict[str, tuple[OriginPolicy | None, int]] = {}
        self.token_secrets: dict[str, TokenSecret | SecretProblem] = {}  # ns/name -> digest
        self.origins_patched: dict[str, dict[str, Any]] = {}
        self._access_published: AccessTable | None = None
        self.pool: WorkerPool | None = None
        self.reconciler: Reconciler | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._client: KubeClient | None = None
        self._metrics_runner: web.AppRunner | None = None
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
            if self.config.webhook_port:
                cert, key = self.config.webhook_cert, self.config.webhook_key
                settings.admission.server = kopf.WebhookServer(
                    addr="0.0.0.0",
                    port=self.config.webhook_port,
                    certfile=str(cert) if cert else None,
                    pkeyfile=str(key) if key else None,
                    insecure=cert is None,
                )
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

        @on.event(API_GROUP, API_VERSION, POLICY_PLURAL, registry=self.registry)
        def policy_watched(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
            if event.get("type") == "DELETED" or body.metadata.get("deletionTimestamp"):
                self.origin_policies.pop(str(body.metadata.name), None)
            else:
                self.origin_policies[str(body.metadata.name)] = (
                    _parse_policy(body),
                    _generation(body),
                )
            self._wake.set()

        def token_related(body: kopf.Body, **_: Any) -> bool:
            # Labelled now, or labelled before: removing the label must revoke the token.
            key = f"{body.metadata.namespace}/{body.metadata.name}"
            return ORIGIN_LABEL in body.metadata.labels or key in self.token_secrets

        @on.event("", "v1", "secrets", when=token_related, registry=self.registry)
        def secret_watched(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
            # Only the token's digest is kept: the operator never holds tokens.
            key = f"{body.metadata.namespace}/{body.metadata.name}"
            gone = event.get("type") == "DELETED" or body.metadata.get("deletionTimestamp")
            if gone or ORIGIN_LABEL not in body.metadata.labels:
                self.token_secrets.pop(key, None)
            else:
                self.token_secrets[key] = parse_token_secret(body)
            self._wake.set()

        # kopf refuses to start with admission handlers and no server: register only if served.
        if self.config.webhook_port:

            @on.validate(*resource, id=WEBHOOK_ID, registry=self.registry)
            def admit_loaded_model(body: kopf.Body, **_: Any) -> None:
                """Fail `kubectl apply` fast on what reconciling would fail; the reconcile loop
                stays the authority (quotas are not checked here: over-quota models wait)."""
                meta = body.get("metadata", {})
                namespace = str(meta.get("namespace") or "default")
                doc = {**body, "metadata": {**meta, "name": meta.get("name") or "pending-name"}}
                try:
                    model = parse_loaded_model(doc, default_namespace=namespace)
                except ManifestError as error:
                    raise kopf.AdmissionError(str(error), code=422) from None
                origin = model.spec.origin
                if not self.current_policies().binds(origin, namespace):
                    raise kopf.AdmissionError(unbound_message(origin, namespace), code=403)

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
            warm=config.warm_workers,
            warm_resources=(
                {config.placement.cpu_resource: 1.0} if config.placement.cpu_resource else {}
            ),
        )
        sources = ModelSources(
            SourcePolicy(
                roots=config.model_roots,
                cache_dir=config.cache_dir,
                allow_hosts=config.allow_source_hosts,
            )
        )
        self.pool = WorkerPool(workers, sources, self.metrics, self._wake.set)
        self._workers = workers
        adopted = await self.pool.adopt()
        log.info("adopted %d running workers", adopted)
        workers.fill_warm_pool()
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
        capacity = await self._workers.recent_capacity()
        known = self.current_policies()
        outcome = self.reconciler.step(models, rejected, capacity, known)
        await self._publish(outcome.statuses)
        await self._publish_origins(outcome.origins, known)
        secrets = [s for s in self.token_secrets.values() if isinstance(s, TokenSecret)]
        table, problems = access_table(known, secrets)
        for problem in problems:
            log.warning("Secret %s/%s: %s", problem.namespace, problem.name, problem.message)
        if table != self._access_published:
            await publish_access(table)
            self._access_published = table

    def current_policies(self) -> Policies:
        found = [p for p, _ in self.origin_policies.values() if p is not None]
        return policies(self.config.default_policy, found)

    async def _publish_origins(
        self, origins: Mapping[str, dict[str, Any]], known: Policies
    ) -> None:
        """Usage against each limit in the status of each OriginPolicy that exists."""
        if self._client is None:
            return
        for origin, rendered in render_origins(origins, known.by_origin).items():
            generation = self.origin_policies[origin][1]
            rendered = {**rendered, "observedGeneration": generation}
            if self.origins_patched.get(origin) == rendered:
                continue
            try:
                if await self._client.patch_origin_status(origin, rendered):
                    self.origins_patched[origin] = rendered
            except Exception as error:  # status is a report: the next pass tries again
                log.warning("patching OriginPolicy %s status failed: %s", origin, error)
        for gone in set(self.origins_patched) - set(known.by_origin):
            del self.origins_patched[gone]

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


def _parse_policy(body: Mapping[str, Any]) -> OriginPolicy | None:
    try:
        return parse_origin_policy(body)
    except ManifestError as error:
        # The CRD's schema rejects most of this at the API server; the rest is logged and
        # the origin falls back to the default policy.
        name = body.get("metadata", {}).get("name")
        log.warning("OriginPolicy %s is invalid, using the default: %s", name, error)
        return None


def _generation(body: Mapping[str, Any]) -> int:
    return int(body.get("metadata", {}).get("generation") or 1)


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
