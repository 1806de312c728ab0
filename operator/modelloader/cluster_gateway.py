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
from modelloader_workers.gateway.dataplane import DataPlane
from modelloader_workers.gateway.directory import ModelDirectory, ModelEntry
from modelloader_workers.gateway.http_v2 import build_app
from modelloader_workers.gateway.metrics import GatewayMetrics
from modelloader_workers.gateway.worker_client import WorkerClients
from modelloader_workers.signature import Signature
from modelloader_workers.worker import LoadedInfo
from prometheus_client import CollectorRegistry

from modelloader.ray_workers import RayWorkers, connect_ray

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
        ModelEntry(origin, name, True, "", Signature.from_dict(i.signature), i.address)
        for (origin, name), i in newest.items()
    ]


class ClusterGateway:
    def __init__(self, socket_dir: Path, refresh_seconds: float = 0.5) -> None:
        self.directory = ModelDirectory()
        self.clients = WorkerClients()
        self._socket_dir = socket_dir
        self._refresh = refresh_seconds
        # What a worker serves never changes once it has loaded: ask each worker once, and
        # only list names on every refresh.
        self._known: dict[str, LoadedInfo] = {}

    async def refresh_once(self, workers: RayWorkers) -> None:
        names = await workers.names()
        current = {name for name, _ in names}
        self._known = {n: i for n, i in self._known.items() if n in current}
        new = [(n, ns) for n, ns in names if n not in self._known]
        for (name, _), info in zip(
            new, await asyncio.gather(*(workers.describe(n, ns) for n, ns in new)), strict=True
        ):
            if info is not None:  # not loaded yet: asked again next time
                self._known[name] = info
        self.directory.publish(directory_entries(list(self._known.values())))
        self.clients.forget_except(self.directory.addresses())

    async def run(
        self, host: str, port: int, ray_address: str | None, max_request_bytes: int
    ) -> None:
        await connect_ray(ray_address, "gateway")
        workers = RayWorkers(self._socket_dir)
        synced = asyncio.Event()
        app = build_app(
            DataPlane(self.directory, self.clients),
            GatewayMetrics(CollectorRegistry()),
            max_request_bytes=max_request_bytes,
            ready=synced.is_set,
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        log.info("gateway on http://%s:%d", host, port)
        try:
            while True:
                try:
                    await self.refresh_once(workers)
                    synced.set()
                except Exception:
                    log.exception("refreshing the worker directory failed")
                await asyncio.sleep(self._refresh)
        finally:
            with contextlib.suppress(Exception):
                await runner.cleanup()
            self.clients.close()
