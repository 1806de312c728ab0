"""Quota arithmetic: which LoadedModels an origin may run, and how much of its policy it uses.
Pure: no I/O, no memory between calls.

Admission is derived from what exists, so a restarted control plane decides the same: models
that already have a worker (of any state: it holds its place) come first, then the rest in
creation order. A model that would take its origin over a limit waits with the limit named,
and proceeds on a later pass when room frees up. Quotas bind at admission, like Kubernetes'
ResourceQuota: lowering a limit below what runs stops nothing, it only makes new models wait.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from modelloader_workers.wire.identity import ModelKey

from modelloader.policy import OriginPolicy, Policies
from modelloader.resource import Accelerator, LoadedModel

# What a model is charged (and its worker's memory limit) when its manifest names no memory.
DEFAULT_MODEL_MEMORY = 256 << 20
RESOURCES = ("models", "workers", "memory", "cpu", "gpus", "npus")


@dataclass(frozen=True)
class Admitted:
    accelerator: Accelerator  # what to place it on: "auto" may be narrowed to "cpu" by quota
    replicas: int = 1  # how many of the replicas wanted fit in the origin's quota
    short: Waiting | None = None  # why fewer replicas than wanted, if so


@dataclass(frozen=True)
class Waiting:
    limit: str  # the quota field that is full, e.g. "maxModels"
    message: str


@dataclass(frozen=True)
class OriginUsage:
    origin: str
    used: Mapping[str, float]
    limits: Mapping[str, float | None]
    waiting: int = 0


@dataclass(frozen=True)
class Admission:
    decisions: Mapping[ModelKey, Admitted | Waiting] = field(default_factory=dict)  # model key ->
    usage: Mapping[str, OriginUsage] = field(default_factory=dict)  # origin ->


def model_memory(model: LoadedModel) -> int:
    return model.spec.resources.memory_bytes or DEFAULT_MODEL_MEMORY


def model_cpu(model: LoadedModel) -> float:
    """The CPU a model may use: what it reserves, else one core per interpreter thread."""
    return model.spec.resources.cpu or float(model.spec.threads)


def limits_of(policy: OriginPolicy) -> dict[str, float | None]:
    q = policy.quota
    workers = q.max_workers
    if policy.isolation == "perOrigin" and q.max_workers != 0:
        workers = policy.process_slots()
    return {
        "models": q.max_models,
        "workers": workers,
        "memory": q.memory_bytes,
        "cpu": q.cpu,
        "gpus": q.gpus,
        "npus": q.npus,
    }


_FIELD = {
    "models": "maxModels",
    "workers": "maxWorkers",
    "memory": "memory",
    "cpu": "cpu",
    "gpus": "gpus",
    "npus": "npus",
}


def admit(
    models: Sequence[LoadedModel],
    running: Iterable[ModelKey] | Mapping[ModelKey, int],
    policies: Policies,
    placed_on: Mapping[ModelKey, str] | None = None,
    schedulable: Callable[[str], bool] = lambda accelerator: accelerator == "cpu",
    wanted: Mapping[ModelKey, int] | None = None,
) -> Admission:
    """`models` in creation order; `running`: how many replicas each model has for its
    current spec now (or just which models have one); `placed_on`: key -> the accelerator
    class its workers run on, where known; `schedulable`: whether the cluster offers an
    accelerator class at all; `wanted`: replicas wanted per model (default 1).

    Every replica is charged (workers, memory, cpu, accelerators; the model itself once).
    Replicas that run keep their place; more are admitted one at a time while they fit, so an
    origin over its quota gets fewer replicas, never more, and says why."""
    have = dict(running) if isinstance(running, Mapping) else dict.fromkeys(running, 1)
    placed_on = placed_on or {}
    ordered = [m for m in models if have.get(m.key)] + [m for m in models if not have.get(m.key)]
    used: dict[str, dict[str, float]] = {}
    waiting: dict[str, int] = {}
    decisions: dict[ModelKey, Admitted | Waiting] = {}
    for model in ordered:
        origin = model.spec.origin
        policy = policies.of(origin)
        limits = limits_of(policy)
        mine = used.setdefault(origin, dict.fromkeys(RESOURCES, 0.0))
        accelerator = _accelerator(model, placed_on.get(model.key), limits, mine, schedulable)
        want = wanted.get(model.key, 1) if wanted is not None else 1
        holding = min(have.get(model.key, 0), want)
        running_now = have.get(model.key, 0) > 0
        # The model itself counts once (maxModels), whether or not a replica runs.
        base = {r: 0.0 for r in RESOURCES} | {"models": 1.0}
        over = None if running_now else _over(mine, base, limits)
        if over is not None:
            waiting[origin] = waiting.get(origin, 0) + 1
            decisions[model.key] = Waiting(_FIELD[over], _message(origin, over, mine, limits, base))
            continue
        _charge(mine, base)
        admitted, short = 0, None
        for replica in range(want):
            demand = _demand(model, policy, accelerator, mine) | {"models": 0.0}
            over = None if replica < holding else _over(mine, demand, limits)
            if over is not None:
                short = Waiting(_FIELD[over], _message(origin, over, mine, limits, demand))
                break
            _charge(mine, demand)
            admitted += 1
        if admitted == 0 and want > 0 and not running_now:
            _charge(mine, base, -1.0)  # nothing of it runs: it waits, and holds no place
            waiting[origin] = waiting.get(origin, 0) + 1
            assert short is not None
            decisions[model.key] = short
            continue
        if short is not None:
            waiting[origin] = waiting.get(origin, 0) + 1
            why = short.message.replace("this model", "a replica")
            short = Waiting(short.limit, f"runs {admitted} of {want} replicas: {why}")
        decisions[model.key] = Admitted(accelerator, admitted, short)
    usage = {
        origin: OriginUsage(origin, amounts, limits_of(policies.of(origin)), waiting.get(origin, 0))
        for origin, amounts in used.items()
    }
    return Admission(decisions, usage)


def _over(
    used: Mapping[str, float], demand: Mapping[str, float], limits: Mapping[str, float | None]
) -> str | None:
    """The first resource a demand would take past its limit, if any."""
    return next((r for r in RESOURCES if _exceeds(used[r] + demand[r], limits[r], demand[r])), None)


def _charge(used: dict[str, float], demand: Mapping[str, float], sign: float = 1.0) -> None:
    for resource, amount in demand.items():
        used[resource] += sign * amount


def _accelerator(
    model: LoadedModel,
    placed: str | None,
    limits: Mapping[str, float | None],
    used: Mapping[str, float],
    schedulable: Callable[[str], bool],
) -> Accelerator:
    """The class to place on: where its worker already runs, the one asked for, or for
    `auto` the best class the cluster offers that the origin still has room for."""
    if placed in ("cpu", "gpu", "npu"):
        return cast(Accelerator, placed)
    requested = model.spec.accelerator
    if requested != "auto":
        return requested
    room = {"gpu": _room(limits["gpus"], used["gpus"]), "npu": _room(limits["npus"], used["npus"])}
    candidates: tuple[Accelerator, ...] = ("gpu", "npu")
    for candidate in candidates:
        if room[candidate] and schedulable(candidate):
            return candidate
    return "cpu"


def _room(limit: float | None, used: float) -> bool:
    return limit is None or used + 1 <= limit


def _demand(
    model: LoadedModel, policy: OriginPolicy, accelerator: str, used: Mapping[str, float]
) -> dict[str, float]:
    shared = policy.isolation == "perOrigin"
    return {
        "models": 1.0,
        # perOrigin models share the origin's process slots: a new process only while slots
        # are free, and never more than the slots (placement spreads models over them).
        "workers": (1.0 if used["workers"] < policy.process_slots() else 0.0)
        if shared and policy.quota.max_workers != 0
        else 1.0,
        "memory": float(model_memory(model)),
        "cpu": model_cpu(model),
        "gpus": 1.0 if accelerator == "gpu" else 0.0,
        "npus": 1.0 if accelerator == "npu" else 0.0,
    }


def _exceeds(total: float, limit: float | None, demand: float) -> bool:
    return limit is not None and demand > 0 and total > limit + 1e-9


def _message(
    origin: str,
    resource: str,
    used: Mapping[str, float],
    limits: Mapping[str, float | None],
    demand: Mapping[str, float],
) -> str:
    return (
        f"origin {origin!r} is at its quota: {_FIELD[resource]} is "
        f"{_show(resource, limits[resource])}, "
        f"{_show(resource, used[resource])} in use and this model needs "
        f"{_show(resource, demand[resource])} more; it waits until room frees up"
    )


def _show(resource: str, amount: float | None) -> str:
    if amount is None:
        return "unlimited"
    if resource == "memory":
        return f"{amount / (1 << 20):.0f}Mi"
    if resource == "cpu":
        return f"{amount:g}"
    return str(int(amount))
