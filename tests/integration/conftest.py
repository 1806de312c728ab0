"""A real Ray cluster for the integration tier, started once per session: several nodes on one
machine (`ray.cluster_utils.Cluster`), one advertising a GPU and one an NPU resource, so tests
can check where each worker lands."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import ray
from ray.cluster_utils import Cluster

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
