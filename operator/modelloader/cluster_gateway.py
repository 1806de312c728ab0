"""`modelloader gateway`: the gateway as its own process for clusters.

It finds workers through Ray (the named actors of every origin's namespace, and what each says it
serves), not through the operator, so the data plane keeps serving while the operator restarts.
When an update runs two workers for one model, the newer generation serves as soon as it is
loaded; the older one is drained and removed by the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from aiohttp import web
from modelloader_workers.gateway.access import AccessTable
from modelloader_workers.gateway.dataplane import DataPlane
from modelloader_workers.gateway.directory import ModelDirectory, ModelEntry
from modelloader_workers.gateway.http_v2 import V2Api, serve_gateway
from modelloader_workers.gateway.metrics import GatewayMetrics
from modelloader_workers.gateway.nvml_metrics import NvmlCollector
from modelloader_workers.gateway.worker_client import WorkerClients
from modelloader_workers.gc_pauses import freeze_long_lived
from modelloader_workers.signature import Signature
from modelloader_workers.worker import LoadedInfo
from prometheus_client import CollectorRegistry

from modelloader.metrics_endpoint import serve_metrics
from modelloader.ray_workers import RayWorkers, connect_ray, read_access
from modelloader.reconcile import SHARED_PROCESS_PREFIX

log = logging.getLogger(__name__)


def directory_entries(found: list[LoadedInfo]) -> list[ModelEntry]:
    """One entry per (origin, model): the newest generation among loaded workers. Pure."""
    newest: dict[tuple[str, str], LoadedInfo] = {}
    for info in found:
        identity = info.identity
        if not {"key", "origin", "generation"} <= identity.keys():
            continue
        name = str(identity["key"]).split("/", 1)[1]
        slot = (str(identity["origin"]), name)
        best = newest.get(slot)
        if best is None or int(identity["generation"]) > int(best.identity["generation"]):
            newest[slot] = info
    return [
        ModelEntry(
            origin, name, True, "", Signature.from_dict(i.signature), i.address, i.accelerator
        )
        for (origin, name), i in newest.items()
    ]


class ClusterGateway:
    def __init__(self, socket_dir: Path, refresh_seconds: float = 0.5) -> None:
        self.directory = ModelDirectory()
        self.clients = WorkerClients()
        self._socket_dir = socket_dir
        self._refresh = refresh_seconds
        # What a perModel worker serves never changes once it has loaded: ask each worker
        # once, and only list names on every refresh. Shared (perOrigin) processes gain and
        # lose models, so they are asked on every refresh.
        self._known: dict[str, list[LoadedInfo]] = {}
        # Until the operator has published tokens, nobody gets in (not everybody).
        self.access = AccessTable()

    async def refresh_once(self, workers: RayWorkers) -> None:
        table = await read_access()
        if table is not None:
            self.access = table
        names = await workers.names()
        current = {name for name, _ in names}
        self._known = {n: i for n, i in self._known.items() if n in current}
        new = [
            (n, ns)
            for n, ns in names
            if n not in self._known or n.startswith(SHARED_PROCESS_PREFIX)
        ]
        for (name, _), infos in zip(
            new, await asyncio.gather(*(workers.describe(n, ns) for n, ns in new)), strict=True
        ):
            if infos is not None:  # not loaded yet: asked again next time
                self._known[name] = infos
            else:
                self._known.pop(name, None)
        found = [info for infos in self._known.values() for info in infos]
        self.directory.publish(directory_entries(found))
        self.clients.forget_except(self.directory.addresses())

    async def run(
        self,
        host: str,
        port: int,
        ray_address: str | None,
        max_request_bytes: int,
        metrics_port: int = 0,  # 0: none (the CLI's default is 9090)
    ) -> None:
        await connect_ray(ray_address, "gateway")
        workers = RayWorkers(self._socket_dir)
        synced = asyncio.Event()
        registry = CollectorRegistry()
        registry.register(NvmlCollector())  # this node's GPUs, if NVML finds any
        api = V2Api(
            DataPlane(self.directory, self.clients),
            GatewayMetrics(registry),
            max_request_bytes=max_request_bytes,
            ready=synced.is_set,
            access=lambda: self.access,
        )
        server = serve_gateway(api)
        await server.start(host, port)
        log.info("gateway on http://%s:%d", host, port)
        freeze_long_lived()
        runners: list[web.AppRunner] = []
        if metrics_port:  # 0: no metrics endpoint
            runners.append(await serve_metrics(registry, host, metrics_port))
            log.info("metrics on http://%s:%d/metrics", host, metrics_port)
        try:
            while True:
                try:
                    await self.refresh_once(workers)
                    synced.set()
                except Exception:
                    log.exception("refreshing the worker directory failed")
                await asyncio.sleep(self._refresh)
        finally:
            await server.close()
            for each in runners:
                with contextlib.suppress(Exception):
                    await each.cleanup()
            self.clients.close()
