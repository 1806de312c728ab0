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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kopf
from aiohttp import web
from modelloader_gateway.metrics_endpoint import serve_metrics
from modelloader_gateway.route_board import RayRouteChannel
from modelloader_workers.loading import ExternalDelegate
from modelloader_workers.wire.identity import ModelKey
from prometheus_client import CollectorRegistry

from modelloader import API_GROUP, API_VERSION
from modelloader.control_loop import ControlLoop, Desired, LoopSettings, Outcome
from modelloader.control_metrics import ControlMetrics
from modelloader.kube_client import PLURAL, POLICY_PLURAL, KubeClient
from modelloader.manifests import Rejected
from modelloader.planner import unbound_message
from modelloader.policy import OriginPolicy, Policies, parse_origin_policy, policies
from modelloader.ray_workers import RayWorkers, WorkerHandle, connect_ray
from modelloader.resource import LoadedModel, ManifestError, parse_loaded_model
from modelloader.secret_data import SecretNotText
from modelloader.sources import ModelSources, SourceError, SourcePolicy
from modelloader.status import render_origins
from modelloader.tenancy import (
    ORIGIN_LABEL,
    SecretProblem,
    TokenSecret,
    parse_token_secret,
)

log = logging.getLogger(__name__)

WEBHOOK_ID = "validate-loadedmodel"  # the webhook's URL path (the chart's webhook.path)
FINALIZER = f"{API_GROUP}/finalizer"


@dataclass(frozen=True)
class OperatorConfig:
    sources: SourcePolicy  # where models may come from, and the node's cache
    state_dir: Path  # the workers' data-path sockets (with --worker-transport unix)
    loop: LoopSettings = field(
        default_factory=lambda: LoopSettings(interval_seconds=1.0, scan_seconds=10.0)
    )
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local "auto" cluster
    delegates: Mapping[str, ExternalDelegate] = field(default_factory=dict)  # gpu/npu -> lib
    worker_transport: str = "tcp"  # "unix" when the gateway shares the workers' node
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


class KubeCache:
    """What kopf's watches have delivered, parsed once as it arrives; the desired state
    (`DesiredSource`) is read from it on every pass."""

    def __init__(self, default_policy: OriginPolicy, first_listing_seconds: float) -> None:
        self.bodies: dict[ModelKey, dict[str, Any]] = {}  # the LoadedModels as last seen
        # origin -> its OriginPolicy (None: invalid), and its generation
        self.origin_policies: dict[str, tuple[OriginPolicy | None, int]] = {}
        self.token_secrets: dict[ModelKey, TokenSecret | SecretProblem] = {}  # only digests
        self._default_policy = default_policy
        # kopf lists every resource before it watches, and says nothing when that listing is
        # done: the first pass waits this long, so that it does not stop the workers of models
        # it has not seen yet.
        self._first_pass_at = time.monotonic() + first_listing_seconds

    def policies(self) -> Policies:
        found = [p for p, _ in self.origin_policies.values() if p is not None]
        return policies(self._default_policy, found)

    async def read(self) -> Desired | None:
        if time.monotonic() < self._first_pass_at:
            return None
        models, rejected = desired(self.bodies.values())
        secrets = [s for s in self.token_secrets.values() if isinstance(s, TokenSecret)]
        hints = {
            key: int(status["desiredReplicas"])
            for key, body in self.bodies.items()
            if isinstance(status := body.get("status"), Mapping)
            and isinstance(status.get("desiredReplicas"), int)
        }
        return Desired(models, rejected, self.policies(), secrets, scale_hints=hints)


class KubeSink:
    """Statuses as status patches of LoadedModels and OriginPolicies, and phase changes as
    Events (`StatusSink`). Only what changed is written."""

    def __init__(self, cache: KubeCache) -> None:
        self.cache = cache
        self.client: KubeClient | None = None  # once kopf has logged in
        self.patched: dict[ModelKey, dict[str, Any]] = {}  # the statuses we last wrote
        self.origins_patched: dict[str, dict[str, Any]] = {}

    async def publish(self, outcome: Outcome, desired: Desired) -> None:
        for problem in outcome.problems:
            log.warning("%s", problem)
        if self.client is None:
            return
        await self._statuses(self.client, outcome.statuses)
        await self._origins(self.client, outcome.origins, desired.policies)
        for change in outcome.scaled:
            body = self.cache.bodies.get(change.key)
            if body is not None:
                reason = "ScaledUp" if change.after > change.before else "ScaledDown"
                message = f"{change.before} -> {change.after} replicas: {change.reason}"
                await self._post(self.client, body, "Normal", reason, message)

    async def _statuses(
        self, client: KubeClient, statuses: Mapping[ModelKey, dict[str, Any]]
    ) -> None:
        for key, rendered in statuses.items():
            body = self.cache.bodies.get(key)
            if body is None or self.patched.get(key) == rendered:
                continue
            if body.get("status") == rendered:
                self.patched[key] = rendered
                continue
            previous = (body.get("status") or {}).get("phase")
            if await client.patch_status(key.namespace, key.name, rendered):
                self.patched[key] = rendered
                if previous != rendered.get("phase"):
                    await self._event(client, body, rendered)
        for gone in set(self.patched) - set(statuses):
            del self.patched[gone]

    async def _origins(
        self, client: KubeClient, origins: Mapping[str, dict[str, Any]], known: Policies
    ) -> None:
        """Usage against each limit in the status of each OriginPolicy that exists."""
        for origin, rendered in render_origins(origins, known.by_origin).items():
            generation = self.cache.origin_policies[origin][1]
            rendered = {**rendered, "observedGeneration": generation}
            if self.origins_patched.get(origin) == rendered:
                continue
            try:
                if await client.patch_origin_status(origin, rendered):
                    self.origins_patched[origin] = rendered
            except Exception as error:  # status is a report: the next pass tries again
                log.warning("patching OriginPolicy %s status failed: %s", origin, error)
        for gone in set(self.origins_patched) - set(known.by_origin):
            del self.origins_patched[gone]

    async def _event(
        self, client: KubeClient, body: Mapping[str, Any], rendered: Mapping[str, Any]
    ) -> None:
        phase = str(rendered.get("phase"))
        kind = "Warning" if phase == "Failed" else "Normal"
        await self._post(client, body, kind, phase, str(rendered.get("message") or phase))

    @staticmethod
    async def _post(
        client: KubeClient, body: Mapping[str, Any], kind: str, reason: str, message: str
    ) -> None:
        try:  # events are a courtesy; the status is the record
            await client.post_event(body, kind, reason, message)
        except Exception as error:
            log.warning("posting an event failed: %s", error)


class LoadedModelOperator:
    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.registry = kopf.OperatorRegistry()
        self.metrics = ControlMetrics(CollectorRegistry())
        self.cache = KubeCache(config.default_policy, config.loop.interval_seconds)
        self.sink = KubeSink(self.cache)
        self.loop: ControlLoop[WorkerHandle] | None = None
        self._task: asyncio.Task[str | None] | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._register()

    # kopf wiring: thin handlers. All async: they run on the control loop's event loop, whose
    # wake-up Event is not thread-safe, and kopf would run sync ones in its thread pool.

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
                self.sink.client = KubeClient(info)
            return info

        @on.cleanup(registry=self.registry)
        async def cleanup(**_: Any) -> None:
            await self._stop()

        cache = self.cache

        @on.event(*resource, registry=self.registry)
        async def watched(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
            key = _key(body)
            if event.get("type") == "DELETED" or body.metadata.get("deletionTimestamp"):
                cache.bodies.pop(key, None)
            else:
                cache.bodies[key] = dict(body)
            self._wake()

        @on.event(API_GROUP, API_VERSION, POLICY_PLURAL, registry=self.registry)
        async def policy_watched(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
            if event.get("type") == "DELETED" or body.metadata.get("deletionTimestamp"):
                cache.origin_policies.pop(str(body.metadata.name), None)
            else:
                cache.origin_policies[str(body.metadata.name)] = (
                    _parse_policy(body),
                    _generation(body),
                )
            self._wake()

        def token_related(body: kopf.Body, **_: Any) -> bool:
            # Labelled now, or labelled before: removing the label must revoke the token.
            return ORIGIN_LABEL in body.metadata.labels or _key(body) in cache.token_secrets

        @on.event("", "v1", "secrets", when=token_related, registry=self.registry)
        async def secret_watched(event: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
            # Only the token's digest is kept: the operator never holds tokens.
            key = _key(body)
            gone = event.get("type") == "DELETED" or body.metadata.get("deletionTimestamp")
            if gone or ORIGIN_LABEL not in body.metadata.labels:
                cache.token_secrets.pop(key, None)
            else:
                cache.token_secrets[key] = parse_token_secret(body)
            self._wake()

        # kopf refuses to start with admission handlers and no server: register only if served.
        if self.config.webhook_port:

            @on.validate(*resource, id=WEBHOOK_ID, registry=self.registry)
            async def admit_loaded_model(body: kopf.Body, **_: Any) -> None:
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
                if not cache.policies().binds(origin, namespace):
                    raise kopf.AdmissionError(unbound_message(origin, namespace), code=403)

        @on.delete(*resource, registry=self.registry)
        async def deleted(body: kopf.Body, **_: Any) -> None:
            key = _key(body)
            cache.bodies.pop(key, None)
            self._wake()
            if self.loop is not None and self.loop.pool.serves(key):
                raise kopf.TemporaryError("waiting for the model's workers to stop", delay=1)

    def _wake(self) -> None:
        if self.loop is not None:
            self.loop.wake()

    # The control loop

    async def _start(self) -> None:
        config = self.config
        await connect_ray(config.ray_address, "operator")
        if config.metrics_port:
            self._metrics_runner = await serve_metrics(
                self.metrics.registry, "0.0.0.0", config.metrics_port
            )
        cpu_resource = config.loop.placement.cpu_resource
        workers = RayWorkers(
            config.state_dir,
            detached=True,
            delegates=config.delegates,
            tcp=config.worker_transport == "tcp",
            warm=config.warm_workers,
            warm_resources={cpu_resource: 1.0} if cpu_resource else {},
            sources=config.sources,
        )
        self.loop = ControlLoop(
            self.cache,
            self.sink,
            RayRouteChannel(),
            workers,
            ModelSources(self._credentials),
            self.metrics,
            config.loop,
        )
        self._task = asyncio.ensure_future(self.loop.run(adopt=True))

    async def _credentials(self, namespace: str, name: str) -> Mapping[str, str] | None:
        """spec.source.credentialsSecret, from the API server (`sources.CredentialLookup`)."""
        client = self.sink.client
        if client is None:
            raise SourceError("not yet connected to the Kubernetes API; trying again")
        try:
            return await client.secret_data(namespace, name)
        except SecretNotText as error:
            raise SourceError(f"spec.source.credentialsSecret: {error}") from None
        except (aiohttp.ClientError, TimeoutError) as error:
            raise SourceError(
                f"spec.source.credentialsSecret: cannot read Secret {namespace}/{name}: "
                f"{error or type(error).__name__}"
            ) from None

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.loop is not None:
            # Workers are detached: they keep serving while the operator is away.
            await self.loop.close(stop_workers=False)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self.sink.client is not None:
            await self.sink.client.close()


def _key(body: kopf.Body) -> ModelKey:
    return ModelKey(str(body.metadata.namespace), str(body.metadata.name))


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


def desired(bodies: Iterable[Mapping[str, Any]]) -> tuple[list[LoadedModel], list[Rejected]]:
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
