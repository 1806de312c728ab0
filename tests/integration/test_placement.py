"""Workers land on the node that offers their accelerator; a restarted control plane adopts
running workers instead of starting duplicates."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from modelloader.placement import PlacementConfig, Scheduled, choose_accelerator
from modelloader.ray_workers import RayWorkers
from modelloader.resource import LoadedModel, LoadedModelSpec, Source
from modelloader.worker_pool import WorkerStartError

from tests.integration.conftest import CPU_RESOURCE, NPU_RESOURCE, Nodes
from tests.support.calls import from_file, identity

CONFIG = PlacementConfig(cpu_resource=CPU_RESOURCE, npu_resource=NPU_RESOURCE)


def model(name: str, accelerator: str, delegation: str = "partitioned") -> LoadedModel:
    spec = LoadedModelSpec(
        "placement",
        Source("file://unused"),
        accelerator=accelerator,  # type: ignore[arg-type]
        delegation=delegation,
    )  # type: ignore[arg-type]
    return LoadedModel("default", name, spec)


@pytest.fixture
def workers(ray_cluster: Nodes) -> RayWorkers:
    return RayWorkers(Path(f"/tmp/mlp-{os.getpid()}"), detached=True)


@pytest.mark.parametrize(("accelerator", "node"), [("cpu", "head"), ("gpu", "gpu"), ("npu", "npu")])
def test_each_accelerator_lands_on_its_node(
    workers: RayWorkers, ray_cluster: Nodes, digits_model: Path, accelerator: str, node: str
) -> None:
    m = model(f"on-{accelerator}", accelerator)
    decision = choose_accelerator(m.spec.accelerator, workers.capacity(), CONFIG)
    assert isinstance(decision, Scheduled) and decision.accelerator == accelerator

    async def scenario() -> None:
        handle, info = await workers.start(
            identity(m), m, from_file(digits_model), accelerator, dict(decision.resources)
        )
        assert info.placement.node_id == getattr(ray_cluster, node)
        if accelerator == "gpu":
            # No Vulkan adapter here: partitioned falls back to the CPU interpreter, says so.
            assert info.placement.accelerator == "cpu"
            assert info.placement.delegated_ops_share == 0.0
            assert "running on the CPU instead" in info.note
        elif accelerator == "npu":
            # No vendor NPU runtime: NPU|CPU compiles, with the CPU taking what the NPU cannot.
            assert info.placement.accelerator == "npu"
            assert info.placement.delegated_ops_share is None
            assert "runs the rest on the CPU" in info.note
        workers.stop(handle)

    asyncio.run(scenario())


def test_whole_delegation_fails_without_the_accelerator(
    workers: RayWorkers, digits_model: Path
) -> None:
    m = model("whole-gpu", "gpu", delegation="whole")

    async def scenario() -> str:
        with pytest.raises(WorkerStartError) as caught:
            await workers.start(identity(m), m, from_file(digits_model), "gpu", {"GPU": 1.0})
        return str(caught.value)

    message = asyncio.run(scenario())
    assert "could not compile the model for the GPU" in message and "Vulkan" in message


def test_a_new_control_plane_finds_running_workers(workers: RayWorkers, digits_model: Path) -> None:
    m = model("adoptable", "cpu")

    async def scenario() -> None:
        handle, info = await workers.start(
            identity(m), m, from_file(digits_model), "cpu", {CPU_RESOURCE: 1.0}
        )
        successor = RayWorkers(Path(f"/tmp/mlp-{os.getpid()}"), detached=True)
        found = {h.worker_id: i for h, i in await successor.running()}
        name = identity(m).worker_id
        assert name == f"lm.default.adoptable.{m.fingerprint}"
        again = found[name]
        assert again is not None and again.placement.pid == info.placement.pid
        assert again.identity == identity(m)
        # Starting the same worker again takes over the running one: no duplicate process.
        _, same = await successor.start(
            identity(m), m, from_file(digits_model), "cpu", {CPU_RESOURCE: 1.0}
        )
        assert same.placement.pid == info.placement.pid
        workers.stop(handle)

    asyncio.run(scenario())
