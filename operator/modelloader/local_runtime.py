"""`modelloader local`: the embedded default. Manifests from files, a private local Ray, the
gateway on localhost, metrics, and the control channel for `modelloader status`; one process.

The loop is the same as the operator's: read desired state, observe workers, `reconcile.plan`,
apply effects, render status. Only the source of manifests (files) and the place status goes
(memory, shown by `modelloader status`) are local.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from modelloader_workers.gateway.access import open_table
from modelloader_workers.gateway.dataplane import DataPlane
from modelloader_workers.gateway.directory import ModelDirectory, ModelEntry
from modelloader_workers.gateway.http_server import HttpServer
from modelloader_workers.gateway.http_v2 import (
    BODY_TIMEOUT_SECONDS,
    IDLE_TIMEOUT_SECONDS,
    V2Api,
    serve_gateway,
)
from modelloader_workers.gateway.metrics import GatewayMetrics
from modelloader_workers.gateway.nvml_metrics import NvmlCollector
from modelloader_workers.gateway.worker_client import WorkerClients
from modelloader_workers.gc_pauses import freeze_long_lived
from prometheus_client import CollectorRegistry

from modelloader import control_channel
from modelloader.control_metrics import ControlMetrics
from modelloader.manifests import ManifestReader, ManifestSet
from modelloader.metrics_endpoint import metrics_app
from modelloader.placement import PlacementConfig
from modelloader.policy import OriginPolicy, Policies, policies
from modelloader.ray_workers import RayWorkers, start_local_ray, stop_ray
from modelloader.reconcile import WorkerView
from modelloader.reconciler import Reconciler
from modelloader.resource import LoadedModel
from modelloader.sources import ModelSources, SourcePolicy
from modelloader.tenancy import access_table
from modelloader.worker_pool import WorkerPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalConfig:
    paths: tuple[Path, ...]
    model_roots: tuple[Path, ...]
    state_dir: Path
    cache_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    metrics_port: int = 9090
    num_cpus: int | None = None
    max_request_bytes: int = 64 << 20
    max_model_bytes: int = 1 << 30
    allow_source_hosts: tuple[str, ...] = ()  # non-public hosts http(s) sources may reach
    idle_timeout_seconds: float = IDLE_TIMEOUT_SECONDS
    body_timeout_seconds: float = BODY_TIMEOUT_SECONDS
    interval_seconds: float = 0.5
    liveness_seconds: float = 1.0
    warm_workers: int = 2  # idle worker processes kept started: apply -> Ready skips a start
    # Origins without an OriginPolicy manifest; the `default` origin (namespace `default`)
    # also takes anonymous calls unless a manifest says otherwise: the embedded default
    # works without tokens out of the box.
    default_policy: OriginPolicy = dataclasses.field(default_factory=lambda: OriginPolicy(""))


def local_policies(default: OriginPolicy, found: tuple[OriginPolicy, ...]) -> Policies:
    """The manifests' policies; the `default` origin takes anonymous calls unless one of
    them is about it."""
    if not any(p.origin == "default" for p in found):
        found = (*found, dataclasses.replace(default, origin="default", allow_anonymous=True))
    return policies(default, found)


class Generations:
    """Kubernetes bumps metadata.generation on each spec change; files have none, so count."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, int]] = {}

    def stamp(self, models: tuple[LoadedModel, ...]) -> list[LoadedModel]:
        stamped = []
        for model in models:
            fingerprint, generation = self._seen.get(model.key, (model.fingerprint, 0))
            if fingerprint != model.fingerprint or generation == 0:
                generation += 1
            self._seen[model.key] = (model.fingerprint, generation)
            stamped.append(dataclasses.replace(model, generation=generation))
        for gone in set(self._seen) - {m.key for m in models}:
            del self._seen[gone]
        return stamped


class LocalRuntime:
    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = ControlMetrics(self.registry)
        self.registry.register(NvmlCollector())  # GPU series only where NVML finds a GPU
        self.directory = ModelDirectory()
        self.clients = WorkerClients()
        self.reader = ManifestReader(list(config.paths))
        self.generations = Generations()
        self.listing: list[dict[str, Any]] = []
        self.origins: dict[str, dict[str, Any]] = {}
        self.access = open_table()
        self.file_errors: tuple[str, ...] = ()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._synced = False
        self._runners: list[web.AppRunner] = []
        self._gateway: HttpServer | None = None
        self._pool: WorkerPool | None = None
        self._reconciler: Reconciler | None = None
        self._ray_temp: str | None = None
        self._restart = False

    # Lifecycle

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self.start()
            # After start: ray.init installs a SIGTERM handler of its own, which would exit
            # without unloading anything.
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_restart)
            await self._serve_until_stopped()
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_restart(self) -> None:
        """SIGHUP: start the control loop afresh, as after a crash (the gateway and the
        workers keep serving; the new loop adopts the workers that run)."""
        self._restart = True
        self._wake.set()

    async def start(self) -> None:
        config = self.config
        control_channel.prepare_state_dir(config.state_dir)
        if control_channel.is_running(config.state_dir):
            raise RuntimeError(
                f"another modelloader local is running with state dir {config.state_dir}"
            )
        sources = ModelSources(
            SourcePolicy(
                roots=config.model_roots,
                cache_dir=config.cache_dir,
                max_bytes=config.max_model_bytes,
                allow_hosts=config.allow_source_hosts,
            )
        )
        started = time.perf_counter()
        # On this thread: Ray wants the main thread for its signal handling. Nothing else is
        # running yet, so blocking the loop for a few seconds costs nothing.
        self._ray_temp = start_local_ray(config.num_cpus)
        log.info("local Ray started in %.1fs (%s)", time.perf_counter() - started, self._ray_temp)
        workers = RayWorkers(config.state_dir / "w", warm=config.warm_workers)
        workers.fill_warm_pool()
        self._sources = sources
        self._pool = WorkerPool(workers, sources, self.metrics, self._wake.set)
        self._reconciler = Reconciler(self._pool, self.metrics, PlacementConfig())
        self._workers = workers

        api = V2Api(
            DataPlane(self.directory, self.clients),
            GatewayMetrics(self.registry),
            max_request_bytes=config.max_request_bytes,
            ready=lambda: self._synced,
            access=lambda: self.access,
        )
        self._gateway = serve_gateway(
            api, idle_timeout=config.idle_timeout_seconds, body_timeout=config.body_timeout_seconds
        )
        await self._gateway.start(config.host, config.port)
        if config.metrics_port:  # 0: no metrics endpoint
            await self._serve(
                metrics_app(self.registry), web.TCPSite, config.host, config.metrics_port
            )
        control_socket = config.state_dir / control_channel.SOCKET_NAME
        with contextlib.suppress(FileNotFoundError):
            control_socket.unlink()
        await self._serve(self._control_app(), None, str(control_socket))
        control_socket.chmod(0o600)
        log.info(
            "gateway on http://%s:%d, metrics on :%d/metrics",
            config.host,
            config.port,
            config.metrics_port,
        )
        freeze_long_lived()  # the gateway shares this process: no 87 ms collections

    async def _serve(self, app: web.Application, site: Any, *where: Any) -> web.AppRunner:
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self.config.idle_timeout_seconds,
        )
        await runner.setup()
        self._runners.append(runner)
        if site is None:
            await web.UnixSite(runner, where[0]).start()
        else:
            await site(runner, *where).start()
        return runner

    async def _serve_until_stopped(self) -> None:
        liveness = asyncio.ensure_future(self._liveness_loop())
        try:
            while not self._stop.is_set():
                self._wake.clear()
                if self._restart:
                    self._restart = False
                    await self._restart_control_loop()
                await self.reconcile_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.interval_seconds)
        finally:
            liveness.cancel()

    async def _restart_control_loop(self) -> None:
        assert self._pool is not None
        await self._pool.abandon()
        self._pool = WorkerPool(self._workers, self._sources, self.metrics, self._wake.set)
        self._reconciler = Reconciler(self._pool, self.metrics, PlacementConfig())
        adopted = await self._pool.adopt()
        log.warning("control loop restarted: adopted %d running workers", adopted)

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.liveness_seconds)
            if self._pool is not None:
                try:
                    await self._pool.check_liveness()
                except Exception:
                    log.exception("liveness check failed")

    async def shutdown(self) -> None:
        if self._gateway is not None:
            await self._gateway.close()
            self._gateway = None
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        self.clients.close()
        if self._pool is not None:
            await self._pool.close()
        await asyncio.to_thread(stop_ray)
        if self._ray_temp is not None:
            shutil.rmtree(self._ray_temp, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.config.state_dir / control_channel.SOCKET_NAME).unlink()

    # One pass of the loop

    async def reconcile_once(self) -> None:
        assert self._pool is not None
        started = time.perf_counter()
        try:
            manifests = await asyncio.to_thread(self.reader.read)
            self._reconcile(manifests, await self._workers.recent_capacity())
        except Exception:
            self.metrics.reconcile_errors.inc()
            log.exception("reconcile failed")
        finally:
            self.metrics.reconcile_duration.observe(time.perf_counter() - started)

    def _reconcile(self, manifests: ManifestSet, capacity: dict[str, float]) -> None:
        assert self._reconciler is not None
        models = self.generations.stamp(manifests.models)
        known = local_policies(self.config.default_policy, manifests.policies)
        outcome = self._reconciler.step(models, manifests.rejected, capacity, known)
        self.access, problems = access_table(known, manifests.secrets, "default")
        self.origins = outcome.origins
        assert self._pool is not None
        self.directory.publish(with_accelerators(outcome.entries, self._pool.views()))
        self.clients.forget_except(self.directory.addresses())
        self.listing = outcome.listing
        self.file_errors = manifests.file_errors + tuple(
            f"Secret {p.namespace}/{p.name}: {p.message}" for p in problems
        )
        self._synced = True

    # HTTP apps besides the gateway

    def _control_app(self) -> web.Application:
        async def status_handler(_: web.Request) -> web.Response:
            return web.json_response(
                {"items": self.listing, "errors": list(self.file_errors), "origins": self.origins}
            )

        app = web.Application()
        app.router.add_get("/status", status_handler)
        return app


def with_accelerators(entries: list[ModelEntry], views: list[WorkerView]) -> list[ModelEntry]:
    """Each served entry with the accelerator its worker runs on (cpu after a fallback), which
    labels the model's busy time in the gateway's metrics."""
    running_on = {
        v.address: str((v.placement or {}).get("accelerator", "cpu")) for v in views if v.address
    }
    return [
        dataclasses.replace(e, accelerator=running_on[e.address]) if e.address in running_on else e
        for e in entries
    ]
