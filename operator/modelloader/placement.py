"""Which accelerator a LoadedModel runs on, and the Ray resources that pin it there. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from modelloader.resource import Accelerator, LoadedModelSpec


@dataclass(frozen=True)
class PlacementConfig:
    """How accelerator classes show up as Ray resources in this cluster."""

    gpu_resource: str = "GPU"
    # Ray probes for Huawei Ascend when a resource is literally named NPU; keep it configurable.
    npu_resource: str = "NPU"
    # When set, CPU nodes advertise this resource and every CPU worker takes one unit of it,
    # so CPU models stay off the accelerator nodes. None: CPU workers may land anywhere.
    cpu_resource: str | None = None


@dataclass(frozen=True)
class Scheduled:
    accelerator: str  # "cpu", "gpu" or "npu": never "auto"
    resources: Mapping[str, float]  # what the worker reserves in Ray besides CPU and memory


@dataclass(frozen=True)
class Unschedulable:
    reason: str


def choose_accelerator(
    requested: Accelerator, capacity: Mapping[str, float], config: PlacementConfig
) -> Scheduled | Unschedulable:
    """`auto` takes the best the cluster offers (GPU, then NPU, then CPU); an explicit class
    needs a node that offers it, or waits as Pending with the reason."""
    offers = {
        "gpu": config.gpu_resource,
        "npu": config.npu_resource,
        "cpu": config.cpu_resource,
    }
    if requested == "auto":
        requested = next((a for a in ("gpu", "npu") if capacity.get(offers[a] or "", 0) > 0), "cpu")
    resource = offers[requested]
    if resource is None:  # CPU without pinning
        return Scheduled("cpu", {})
    if capacity.get(resource, 0) <= 0:
        return Unschedulable(f"no node in the Ray cluster offers the {resource} resource")
    return Scheduled(requested, {resource: 1.0})


def fits_warm_process(spec: LoadedModelSpec, accelerator: str, shared: bool) -> bool:
    """Whether a pre-started (warm) worker process may take this model. Warm processes are
    started for CPU models with no Ray reservations of their own: a reservation (CPU, memory,
    an accelerator) is fixed when a process starts. A model sharing its origin's process
    (perOrigin) loads into that one instead."""
    return (
        accelerator == "cpu"
        and not shared
        and not spec.resources.cpu
        and not spec.resources.memory_bytes
    )


@dataclass(frozen=True)
class Node:
    """A node of the cluster, and the resources it has free, as Ray last reported them."""

    id: str
    free: Mapping[str, float]


def spread_node(
    nodes: Sequence[Node],
    resources: Mapping[str, float],
    siblings: Mapping[str, int],
    load: Mapping[str, int],
) -> str | None:
    """The node for a model's next replica: among the nodes with room for what it reserves
    (`resources`; any node with CPUs when it reserves nothing special), one hosting the fewest
    of its sibling replicas, then the fewest workers. None when there is no choice to make:
    Ray places it."""
    wanted = {name: amount for name, amount in resources.items() if amount > 0}
    fits = [
        n
        for n in nodes
        if all(n.free.get(name, 0) >= amount for name, amount in wanted.items())
        and (wanted or n.free.get("CPU", 0) > 0 or "CPU" in n.free)
    ]
    if len(fits) < 2:
        return None
    best = min(fits, key=lambda n: (siblings.get(n.id, 0), load.get(n.id, 0), n.id))
    return best.id
