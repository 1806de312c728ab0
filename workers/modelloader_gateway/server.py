"""The gateway assembled: routes, links to workers, the data plane, the v2 REST and gRPC layers,
its metrics. One assembly for `modelloader local` (which publishes routes in-process) and
`modelloader gateway` (which follows the published table through Ray)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from modelloader_workers.gc_pauses import freeze_long_lived
from prometheus_client import CollectorRegistry

from modelloader_gateway.dataplane import HOLD_SECONDS, DataPlane
from modelloader_gateway.grpc_v2 import GrpcServer
from modelloader_gateway.http_server import HttpServer
from modelloader_gateway.http_v2 import BODY_TIMEOUT_SECONDS, IDLE_TIMEOUT_SECONDS, V2Api
from modelloader_gateway.metrics import GatewayMetrics
from modelloader_gateway.metrics_endpoint import serve_metrics
from modelloader_gateway.nvml_metrics import NvmlCollector
from modelloader_gateway.routes import Routes, RouteTable
from modelloader_gateway.worker_client import WorkerClients

log = logging.getLogger(__name__)

# How long a stopping gateway goes on answering the requests it has begun (a rolling update of
# the gateway's pods, Ctrl-C): Kubernetes' default grace period is 30 s.
DRAIN_SECONDS = 10.0


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int | None = None  # the gRPC endpoint; None: none (the CLI's default is 8081)
    metrics_port: int = 0  # 0: no /metrics of its own
    max_request_bytes: int = 64 << 20
    idle_timeout_seconds: float = IDLE_TIMEOUT_SECONDS
    body_timeout_seconds: float = BODY_TIMEOUT_SECONDS
    drain_seconds: float = DRAIN_SECONDS
    hold_seconds: float = HOLD_SECONDS  # a request for a model scaled to zero waits this long


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        registry: CollectorRegistry | None = None,
        on_hold: Callable[[], None] = lambda: None,
    ) -> None:
        """`on_hold`: a request waits for a model scaled to zero (wake the control plane)."""
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(NvmlCollector())  # GPU series only where NVML finds a GPU
        self.routes = Routes()
        self.clients = WorkerClients()
        # Ready once a route table has arrived, and while nothing says otherwise.
        self.problem: str | None = None
        self.dataplane = DataPlane(
            self.routes,
            self.clients,
            ready=self.ready,
            hold_seconds=config.hold_seconds,
            on_hold=on_hold,
        )
        metrics = GatewayMetrics(self.registry)
        self.http = HttpServer(
            V2Api(self.dataplane, metrics, max_request_bytes=config.max_request_bytes),
            idle_timeout=config.idle_timeout_seconds,
            body_timeout=config.body_timeout_seconds,
        )
        self.grpc = (
            GrpcServer(self.dataplane, metrics, config.max_request_bytes)
            if config.grpc_port is not None
            else None
        )
        self._metrics: web.AppRunner | None = None

    def ready(self) -> bool:
        return self.routes.published and self.problem is None

    def publish(self, table: RouteTable) -> None:
        """Route from `table` now; links to workers it no longer names are closed."""
        self.routes.publish(table)
        self.clients.forget_except(self.routes.addresses())
        self.dataplane.release_held()

    def unready(self, problem: str | None) -> None:
        """Fail readiness with a reason (the serving cluster is gone), or clear it."""
        if problem != self.problem:
            if problem:
                log.warning("gateway not ready: %s", problem)
            self.problem = problem

    async def start(self) -> None:
        config = self.config
        await self.http.start(config.host, config.port)
        log.info("gateway on http://%s:%d", config.host, self.http.port)
        if self.grpc is not None and config.grpc_port is not None:
            await self.grpc.start(config.host, config.grpc_port)
            log.info("gRPC on %s:%d", config.host, self.grpc.port)
        if config.metrics_port:
            self._metrics = await serve_metrics(self.registry, config.host, config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", config.host, config.metrics_port)
        freeze_long_lived()  # a full collection would pause every answer

    async def close(self) -> None:
        drains = [self.http.close(self.config.drain_seconds)]
        if self.grpc is not None:
            drains.append(self.grpc.close(self.config.drain_seconds))
        await asyncio.gather(*drains)
        if self._metrics is not None:
            with contextlib.suppress(Exception):
                await self._metrics.cleanup()
            self._metrics = None
        self.clients.close()
