"""A real Ray cluster for the integration tier, started once per session: several nodes on one
machine (`ray.cluster_utils.Cluster`), one advertising a GPU and one an NPU resource, so tests
can check where each worker lands. And, per module, the Kubernetes API emulator (KUBECONFIG
points at it) and the operator's configuration."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from modelloader.control_loop import LoopSettings
from modelloader.operator_main import OperatorConfig
from modelloader.placement import PlacementConfig
from modelloader.sources import SourcePolicy
from ray.cluster_utils import Cluster

from tests.conftest import EXAMPLE
from tests.support.cluster import EmulatorThread

CPU_RESOURCE = "modelloader-cpu"
NPU_RESOURCE = "example.com-npu"


@dataclass(frozen=True)
class Nodes:
    cluster: Cluster
    head: str
    gpu: str
    npu: str


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Nodes]:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {CPU_RESOURCE: 100}},
    )
    gpu = cluster.add_node(num_cpus=1, num_gpus=1)
    npu = cluster.add_node(num_cpus=1, resources={NPU_RESOURCE: 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield Nodes(cluster, cluster.head_node.node_id, gpu.node_id, npu.node_id)
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def local_ray(ray_cluster: Nodes) -> str:
    return ray_cluster.cluster.address


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorThread]:
    emulator = EmulatorThread()
    emulator.start()
    assert emulator.ready.wait(10)
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(
        emulator.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")
    )
    yield emulator
    emulator.stop()
    if old is None:
        os.environ.pop("KUBECONFIG", None)
    else:
        os.environ["KUBECONFIG"] = old


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> OperatorConfig:
    return OperatorConfig(
        sources=SourcePolicy(roots=(EXAMPLE,), cache_dir=tmp_path_factory.mktemp("cache")),
        state_dir=Path(f"/tmp/mlop-{os.getpid()}"),
        loop=LoopSettings(
            placement=PlacementConfig(cpu_resource=CPU_RESOURCE, npu_resource=NPU_RESOURCE),
            interval_seconds=0.5,
            liveness_seconds=0.5,
            scan_seconds=1.0,
        ),
        # These tests follow workers by their names (lm.<ns>.<name>...); warm processes keep
        # names of their own, and are covered in tests/e2e/test_faults.py.
        warm_workers=0,
    )
