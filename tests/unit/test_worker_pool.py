"""The worker pool against a fake of the Ray adapter (as Ray Serve tests its deployment state
with a mock replica wrapper): starts, adoption, deaths, crash loops, drains and shared
processes, in milliseconds and on a fake clock. Real Ray is the integration tier's."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from modelloader.control_metrics import ControlMetrics
from modelloader.planner import (
    CRASH_LOOP_DEATHS,
    ProcessSlot,
    StartWorker,
    StopWorker,
    WorkerView,
    plan,
)
from modelloader.resource import LoadedModel, LoadedModelSpec, Source
from modelloader.worker_names import ProcessName, WorkerName
from modelloader.worker_pool import CRASH_WINDOW_SECONDS, WorkerPool, WorkerStartError
from modelloader_workers.fetching import SourceError, SourceRequest
from modelloader_workers.wire.address import Address
from modelloader_workers.wire.identity import WorkerIdentity
from modelloader_workers.wire.placement import Placement
from modelloader_workers.wire.signature import Signature
from modelloader_workers.worker import LoadedInfo
from prometheus_client import CollectorRegistry

CPU = {"CPU": 2.0}


@dataclass(frozen=True)
class FakeHandle:
    worker_id: str
    process: str = ""


@dataclass
class FakeWorkers:
    """The Ray adapter's shape, with processes as records and deaths on demand."""

    hosted: dict[str, tuple[FakeHandle, LoadedInfo | None]] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    killed: set[str] = field(default_factory=set)
    failing: dict[str, str] = field(default_factory=dict)  # model name -> load error
    sources: dict[str, SourceRequest] = field(default_factory=dict)  # what each was to fetch
    pids: int = 100

    async def start(
        self,
        identity: WorkerIdentity,
        model: LoadedModel,
        source: SourceRequest,
        accelerator: str,
        resources: dict[str, float],
        *,
        memory_limit: int = 0,
        process: str = "",
        node: str | None = None,
    ) -> tuple[FakeHandle, LoadedInfo]:
        await asyncio.sleep(0)
        self.sources[model.name] = source
        if model.name in self.failing:
            raise WorkerStartError(self.failing[model.name])
        self.pids += 1
        self.started.append(identity.worker_id)
        info = LoadedInfo(
            identity,
            Signature((), ()),
            Address("unix", f"/{identity.worker_id}.sock"),
            Placement("node", "node-id", accelerator, "xnnpack", self.pids),
            0.01,
        )
        handle = FakeHandle(identity.worker_id, process)
        self.hosted[identity.worker_id] = (handle, info)
        return handle, info

    async def running(self) -> Sequence[tuple[FakeHandle, LoadedInfo | None]]:
        return list(self.hosted.values())

    async def alive(self, handle: FakeHandle) -> str | None:
        return "the worker process exited" if handle.worker_id in self.killed else None

    def stop(self, handle: FakeHandle) -> None:
        self.stopped.append(handle.worker_id)
        for worker_id, (hosted, _) in list(self.hosted.items()):
            same_process = handle.process and hosted.process == handle.process
            if worker_id == handle.worker_id or same_process:
                del self.hosted[worker_id]

    async def unload(self, handle: FakeHandle) -> int:
        self.unloaded.append(handle.worker_id)
        self.hosted.pop(handle.worker_id, None)
        return sum(1 for h, _ in self.hosted.values() if h.process == handle.process)


class FakeSources:
    async def request(self, model: LoadedModel, max_bytes: int | None) -> SourceRequest:
        if model.spec.source.uri.endswith("missing"):
            raise SourceError("spec.source.credentialsSecret: there is no Secret")
        return SourceRequest(model.spec.source.uri, max_bytes=max_bytes)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def model(name: str = "m", uri: str = "file:///m.tflite", origin: str = "default") -> LoadedModel:
    return LoadedModel("default", name, LoadedModelSpec(origin, Source(uri)))


@dataclass
class Harness:
    workers: FakeWorkers
    pool: WorkerPool[FakeHandle]
    clock: Clock
    changes: list[int]

    async def settle(self) -> None:
        """Let the pool's background work run: loads (their fetch runs in a thread) and
        immediate stops."""
        for _ in range(500):
            await asyncio.sleep(0.001)
            if all(v.state != "starting" for v in self.pool.views()):
                break
        for _ in range(5):
            await asyncio.sleep(0)

    def views(self) -> dict[str, WorkerView]:
        return {v.id: v for v in self.pool.views()}

    async def step(self, models: list[LoadedModel]) -> None:
        """One planner pass over what the pool observes, applied."""
        self.pool.apply(plan(models, self.pool.views(), CPU).effects)
        await self.settle()


def harness(workers: FakeWorkers | None = None, drain: float = 0.0) -> Harness:
    fake = workers or FakeWorkers()
    clock = Clock()
    changes: list[int] = []
    pool = WorkerPool(
        fake,
        FakeSources(),
        ControlMetrics(CollectorRegistry()),
        lambda: changes.append(1),
        clock=clock,
        drain_seconds=drain,
    )
    return Harness(fake, pool, clock, changes)


def run(scenario: object) -> None:
    asyncio.run(scenario)  # type: ignore[arg-type]


def test_a_start_is_starting_until_the_worker_reports_its_model() -> None:
    async def scenario() -> None:
        h = harness()
        m = model()
        h.pool.apply([StartWorker(m, "cpu", {})])
        (view,) = h.pool.views()
        assert view.state == "starting" and view.id == WorkerName(m.key, m.fingerprint).format()
        await h.settle()
        (view,) = h.pool.views()
        assert view.state == "ready" and view.address == Address("unix", f"/{view.id}.sock")
        assert view.placement is not None and view.placement.accelerator == "cpu"
        assert h.changes  # the loop was woken by the observation

    run(scenario())


def test_a_failed_load_or_source_is_observed_with_its_message() -> None:
    async def scenario() -> None:
        workers = FakeWorkers(failing={"broken": "LiteRT could not load the model: bad"})
        h = harness(workers)
        h.pool.apply(
            [
                StartWorker(model("broken"), "cpu", {}),
                StartWorker(model("gone", "file:///missing"), "cpu", {}),
                StartWorker(model("big"), "cpu", {}, max_model_bytes=10),
            ]
        )
        await h.settle()
        messages = {v.key.name: (v.state, v.message) for v in h.pool.views()}
        assert messages["broken"] == ("failed", "LiteRT could not load the model: bad")
        assert messages["gone"] == ("failed", "spec.source.credentialsSecret: there is no Secret")
        # The origin's limit travels to the node that fetches.
        assert workers.sources["big"].max_bytes == 10

    run(scenario())


def test_a_death_is_observed_and_its_replacement_takes_the_next_name() -> None:
    async def scenario() -> None:
        h = harness()
        m = model()
        await h.step([m])
        (first,) = h.pool.views()
        h.workers.killed.add(first.id)
        await h.pool.check_liveness()
        (dead,) = h.pool.views()
        assert dead.state == "dead" and dead.address is None and dead.recent_deaths == 1
        await h.step([m])  # the planner stops the dead one and starts a replacement
        (replacement,) = h.pool.views()
        assert replacement.id == WorkerName(m.key, m.fingerprint, restarts=1).format()
        assert replacement.restarts == 1 and replacement.state == "ready"
        assert first.id in h.workers.stopped

    run(scenario())


def test_deaths_count_towards_a_crash_loop_within_the_window_only() -> None:
    async def scenario() -> None:
        h = harness()
        m = model()
        await h.step([m])
        for death in range(1, CRASH_LOOP_DEATHS + 1):
            (current,) = [v for v in h.pool.views() if v.state == "ready"]
            h.workers.killed.add(current.id)
            await h.pool.check_liveness()
            (dead,) = [v for v in h.pool.views() if v.state == "dead"]
            assert dead.recent_deaths == death
            result = plan([m], h.pool.views(), CPU)
            if death < CRASH_LOOP_DEATHS:
                h.pool.apply(result.effects)
                await h.settle()
                h.clock.now += 10
        # The third death within the window: kept dead, no restart.
        assert result.effects == () and result.states[m.key].phase == "Failed"
        assert result.states[m.key].conditions.loaded.reason == "CrashLoop"

        # The same deaths spread past the window: never a crash loop.
        spread = harness()
        await spread.step([m])
        for _ in range(CRASH_LOOP_DEATHS):
            (current,) = [v for v in spread.pool.views() if v.state == "ready"]
            spread.workers.killed.add(current.id)
            await spread.pool.check_liveness()
            (dead,) = [v for v in spread.pool.views() if v.state == "dead"]
            assert dead.recent_deaths == 1
            await spread.step([m])
            spread.clock.now += CRASH_WINDOW_SECONDS + 1
        assert [v.state for v in spread.pool.views()] == ["ready"]

    run(scenario())


def test_a_replaced_worker_is_drained_before_it_is_stopped() -> None:
    async def scenario() -> None:
        h = harness(drain=0.05)
        old, new = model(), model(uri="file:///new.tflite")
        await h.step([old])
        (first,) = h.pool.views()
        await h.step([dataclasses.replace(new, generation=2)])  # the new one loads beside
        assert first.id not in h.workers.stopped
        await h.step([dataclasses.replace(new, generation=2)])  # it serves: the old one goes
        assert first.id not in h.workers.stopped  # still draining
        await asyncio.sleep(0.1)
        assert first.id in h.workers.stopped
        assert [v.generation for v in h.pool.views()] == [2]

    run(scenario())


def test_a_stop_reverted_within_the_drain_keeps_the_worker() -> None:
    async def scenario() -> None:
        h = harness(drain=0.05)
        m = model()
        await h.step([m])
        (first,) = h.pool.views()
        h.pool.apply([StopWorker(first.id, "LoadedModel removed")])
        h.pool.apply([StartWorker(m, "cpu", {})])  # asked for again: the same name
        await asyncio.sleep(0.1)
        assert first.id not in h.workers.stopped

    run(scenario())


def test_a_restarted_pool_adopts_running_workers_and_stops_half_loaded_ones() -> None:
    async def scenario() -> None:
        first = harness()
        m = model()
        await first.step([m])
        (running,) = first.pool.views()
        # A process a crashed control plane left mid-load: it reports no model.
        first.workers.hosted["lm.default.x.0123456789abcdef"] = (
            FakeHandle("lm.default.x.0123456789abcdef"),
            None,
        )
        await first.pool.abandon()  # as a crash: nothing stopped
        assert first.workers.stopped == []
        successor = harness(first.workers)
        assert await successor.pool.adopt() == 1
        (adopted,) = successor.pool.views()
        assert (adopted.id, adopted.state, adopted.key) == (running.id, "ready", m.key)
        assert adopted.placement == running.placement
        assert first.workers.stopped == ["lm.default.x.0123456789abcdef"]
        await successor.step([m])
        assert first.workers.started == [running.id]  # adopted, not started again

    run(scenario())


def test_an_adopted_restart_suffix_is_not_reused() -> None:
    async def scenario() -> None:
        workers = FakeWorkers()
        m = model()
        name = WorkerName(m.key, m.fingerprint, restarts=2).format()
        identity = WorkerIdentity(m.key, "default", m.fingerprint, 1, name)
        await workers.start(identity, m, SourceRequest("file:///m"), "cpu", {})
        h = harness(workers)
        await h.pool.adopt()
        workers.killed.add(name)
        await h.pool.check_liveness()
        await h.step([m])
        assert WorkerName(m.key, m.fingerprint, restarts=3).format() in workers.started

    run(scenario())


def test_a_shared_process_is_released_when_its_last_model_goes() -> None:
    async def scenario() -> None:
        h = harness()
        slot = ProcessSlot("shop", 0)
        process = ProcessName(slot).format()
        a, b = model("a", origin="shop"), model("b", origin="shop")
        h.pool.apply(
            [StartWorker(a, "cpu", {}, process=slot), StartWorker(b, "cpu", {}, process=slot)]
        )
        await h.settle()
        ids = {v.key.name: v.id for v in h.pool.views()}
        assert {v.process for v in h.pool.views()} == {slot}
        h.pool.apply([StopWorker(ids["a"], "LoadedModel removed")])
        await h.settle()
        assert h.workers.unloaded == [ids["a"]] and h.workers.stopped == []
        h.pool.apply([StopWorker(ids["b"], "LoadedModel removed")])
        await h.settle()
        assert h.workers.stopped == [ids["b"]]  # the process goes with its last model
        # The slot's next process takes a new name: Ray may not have released the old one.
        h.pool.apply([StartWorker(model("c", origin="shop"), "cpu", {}, process=slot)])
        await h.settle()
        (hosted,) = h.workers.hosted.values()
        assert hosted[0].process == ProcessName(slot, epoch=1).format() != process

    run(scenario())


def test_close_stops_everything_and_abandon_stops_nothing() -> None:
    async def scenario() -> None:
        kept = harness()
        await kept.step([model("a"), model("b")])
        await kept.pool.abandon()
        assert kept.workers.stopped == [] and kept.pool.views() == []
        closed = harness()
        await closed.step([model("a"), model("b")])
        await closed.pool.close()
        assert sorted(closed.workers.stopped) == sorted(closed.workers.started)

    run(scenario())


@pytest.mark.parametrize("state", ["starting", "ready"])
def test_serves_tells_the_finalizer_whether_workers_remain(state: str) -> None:
    async def scenario() -> None:
        h = harness()
        m = model()
        h.pool.apply([StartWorker(m, "cpu", {})])
        if state == "ready":
            await h.settle()
        assert h.pool.serves(m.key)
        (view,) = h.pool.views()
        h.pool.apply([StopWorker(view.id, "LoadedModel removed")])
        assert not h.pool.serves(m.key)
        await h.settle()

    run(scenario())
