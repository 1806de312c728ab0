"""The control loop stops when cancelled, even when code a pass awaits loses the cancel
(Python 3.11's `wait_for` does, when a result arrives with it): an operator that did not stop
within 30 s, once in CI. Fakes stand in for the desired state's source and for Ray: nothing
here passes beyond reading the desired state."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from modelloader.control_loop import ControlLoop, Desired, LoopSettings, Outcome
from modelloader.control_metrics import ControlMetrics
from modelloader.placement import Node
from modelloader_gateway.load import Load
from modelloader_gateway.routes import RouteTable
from prometheus_client import CollectorRegistry

from tests.unit.test_worker_pool import FakeHandle, FakeSources, FakeWorkers


class SwallowingSource:
    """A read that loses the first cancel it meets, then reports nothing to do."""

    def __init__(self) -> None:
        self.reads = 0
        self.swallowed = 0

    async def read(self) -> Desired | None:
        self.reads += 1
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.swallowed += 1  # as a library that drops it would
        return None


class NoSink:
    async def publish(self, outcome: Outcome, desired: Desired) -> None:
        return None


class NoChannel:
    async def publish(self, table: RouteTable) -> None:
        return None

    async def load(self) -> Mapping[tuple[str, str], Load]:
        return {}


class Runtime(FakeWorkers):
    async def recent_capacity(self) -> dict[str, float]:
        return {"CPU": 2.0}

    async def recent_nodes(self) -> list[Node]:
        return []

    def fill_warm_pool(self) -> None:
        return None


def test_a_cancel_lost_inside_a_pass_still_stops_the_loop() -> None:
    async def scenario() -> tuple[SwallowingSource, bool]:
        source = SwallowingSource()
        loop: ControlLoop[FakeHandle] = ControlLoop(
            source,
            NoSink(),
            NoChannel(),
            Runtime(),
            FakeSources(),
            ControlMetrics(CollectorRegistry()),
            LoopSettings(interval_seconds=0.01, liveness_seconds=60),
        )
        task = asyncio.ensure_future(loop.run(adopt=False))
        while source.reads == 0:
            await asyncio.sleep(0.001)
        task.cancel()  # lands in the read, which loses it
        done, _ = await asyncio.wait({task}, timeout=5)
        stopped = task in done and task.cancelled()
        if not stopped:
            task.cancel()
        return source, stopped

    source, stopped = asyncio.run(scenario())
    assert source.swallowed == 1
    assert stopped, "the loop kept running after its cancel was lost"
