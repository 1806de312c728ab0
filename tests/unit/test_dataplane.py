"""The data plane's core over real worker servers (a stand-in interpreter on real sockets):
requests go to the least busy replica, a replica lost before or after taking a request costs
the caller nothing, and requests for a model scaled to zero wait for a replica."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from modelloader_gateway.access import open_table
from modelloader_gateway.dataplane import DataPlane
from modelloader_gateway.errors import DataPlaneError, ModelNotReady
from modelloader_gateway.routes import Endpoint, Route, Routes, RouteTable
from modelloader_gateway.worker_client import WorkerClients
from modelloader_workers.wire.address import Address
from modelloader_workers.worker_server import WorkerServer

from tests.support.calls import infer
from tests.unit.test_worker_server import Doubler

X = np.arange(4, dtype=np.float32)


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


class Counting(Doubler):
    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__(seconds)
        self.answered = 0

    def invoke(self) -> dict[str, np.ndarray[Any, Any]]:
        out = super().invoke()
        self.answered += 1
        return out


@dataclass
class Served:
    server: WorkerServer
    runner: Counting

    @property
    def answered(self) -> int:
        return self.runner.answered

    def close(self) -> None:
        self.server.close()


def serve(folder: Path, name: str, seconds: float = 0.0) -> tuple[Served, Address]:
    address = Address("unix", str(folder / f"{name}.sock"))
    runner = Counting(seconds)
    return Served(WorkerServer(runner, address), runner), address


def table(*addresses: Address, wakes: bool = False) -> RouteTable:
    route = Route(
        "o",
        "m",
        endpoints=tuple(Endpoint(a, str(i)) for i, a in enumerate(addresses)),
        signature=Doubler.signature,
        wakes=wakes,
    )
    return RouteTable((route,), open_table("o"))


def plane(routes: RouteTable, hold_seconds: float = 5.0) -> tuple[DataPlane, Routes]:
    published = Routes()
    published.publish(routes)
    return DataPlane(published, WorkerClients(), hold_seconds=hold_seconds), published


def test_requests_spread_over_replicas_by_requests_in_flight(folder: Path) -> None:
    servers = [serve(folder, f"w{i}", seconds=0.02) for i in range(2)]

    async def scenario() -> list[int]:
        dataplane, _ = plane(table(*(a for _, a in servers)))
        results = await asyncio.gather(*(infer(dataplane, "o", "m", {"x": X}) for _ in range(20)))
        assert all(np.array_equal(r.outputs["y"], X * 2) for r in results)
        dataplane.clients.close()
        return [s.answered for s, _ in servers]

    counts = asyncio.run(scenario())
    for server, _ in servers:
        server.close()
    assert sum(counts) == 20 and min(counts) >= 8  # both busy, about evenly


def test_a_dead_replica_costs_no_request(folder: Path) -> None:
    live, live_address = serve(folder, "live")
    dead, dead_address = serve(folder, "dead", seconds=0.2)

    async def scenario() -> int:
        dataplane, _ = plane(table(dead_address, live_address))
        # One request taken by the replica that then dies mid-invoke, more sent meanwhile.
        first = asyncio.ensure_future(infer(dataplane, "o", "m", {"x": X}))
        await asyncio.sleep(0.05)
        dead.close()  # its connections cut, its socket gone: as a killed process
        rest = await asyncio.gather(*(infer(dataplane, "o", "m", {"x": X}) for _ in range(10)))
        answered = [await first, *rest]
        assert all(np.array_equal(r.outputs["y"], X * 2) for r in answered)
        dataplane.clients.close()
        return live.answered

    assert asyncio.run(scenario()) == 11
    live.close()


def test_requests_for_a_model_at_zero_are_held_until_a_replica_is_published(
    folder: Path,
) -> None:
    server, address = serve(folder, "w")

    async def scenario() -> None:
        woken = []
        dataplane, routes = plane(table(wakes=True))
        dataplane._on_hold = lambda: woken.append(1)
        held = [asyncio.ensure_future(infer(dataplane, "o", "m", {"x": X})) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert not any(h.done() for h in held) and dataplane.held() == 3 and woken == [1]
        assert dataplane.load.in_flight(("o", "m")) == 0  # the transport counts admissions
        routes.publish(table(address))
        dataplane.release_held()
        answered = await asyncio.gather(*held)
        assert all(np.array_equal(r.outputs["y"], X * 2) for r in answered)
        dataplane.clients.close()

    asyncio.run(scenario())
    server.close()


def test_a_held_request_gives_up_after_its_timeout_with_a_retry_delay() -> None:
    async def scenario() -> DataPlaneError:
        dataplane, _ = plane(table(wakes=True), hold_seconds=0.2)
        try:
            await infer(dataplane, "o", "m", {"x": X})
        except DataPlaneError as error:
            return error
        raise AssertionError("answered without a replica")

    error = asyncio.run(scenario())
    assert isinstance(error, ModelNotReady) and error.retry_after == 1.0
    assert "scaled to zero" in error.message
