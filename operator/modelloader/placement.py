"""Which accelerator a LoadedModel runs on, decided from what the Ray cluster offers. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from modelloader.resource import Accelerator


@dataclass(frozen=True)
class Scheduled:
    accelerator: str  # "cpu", "gpu" or "npu": never "auto"
    resources: Mapping[str, float]  # what the worker reserves in Ray besides CPU and memory


@dataclass(frozen=True)
class Unschedulable:
    reason: str


def choose_accelerator(
    requested: Accelerator, capacity: Mapping[str, float], npu_resource: str = "NPU"
) -> Scheduled | Unschedulable:
    """`auto` takes the CPU until accelerator workers exist (the operator's issue); an explicit
    `gpu`/`npu` needs a node that offers one, or waits as Pending with the reason."""
    if requested in ("auto", "cpu"):
        return Scheduled("cpu", {})
    resource = "GPU" if requested == "gpu" else npu_resource
    if capacity.get(resource, 0) <= 0:
        return Unschedulable(f"no node in the Ray cluster offers the {resource} resource")
    return Scheduled(requested, {resource: 1.0})
