"""The planner: desired LoadedModels + observed workers -> effects, per-model state and routes.

Pure and level-triggered: the same inputs give the same plan, nothing is remembered between
calls, and a state only advances on what is observed, never on an effect having been issued
(the rule of the pure `transition(state, desired, observed)` step drafted for CrateDB's kopf
operator, github.com/crate/crate-operator). `modelloader local` and the Kubernetes operator
both run it, through `control_loop`.

Updates never interrupt service: a changed spec starts a new worker beside the old one; traffic
moves when the new one is ready, and the old one is stopped only then. A new version that fails
to load leaves the old one serving.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, cast

from modelloader_gateway.routes import Endpoint, Route
from modelloader_workers.fetching.request import FetchedModel
from modelloader_workers.wire.address import Address
from modelloader_workers.wire.identity import ModelKey
from modelloader_workers.wire.placement import Placement
from modelloader_workers.wire.signature import Signature

from modelloader.placement import (
    Node,
    PlacementConfig,
    Scheduled,
    Unschedulable,
    choose_accelerator,
    spread_node,
)
from modelloader.policy import Policies
from modelloader.quota import Admission, Admitted, Waiting, admit, model_memory
from modelloader.resource import Accelerator, LoadedModel

DEFAULT_PLACEMENT = PlacementConfig()
DEFAULT_POLICIES = Policies()
# A spec whose workers die this often within the runtime's crash window stops being restarted
# (Failed, reason CrashLoop) until the spec changes: a model that kills its process on every
# request must not burn a process start per request forever.
CRASH_LOOP_DEATHS = 3
WorkerState = Literal["starting", "ready", "failed", "dead"]
Phase = Literal["Pending", "Loading", "Ready", "Failed"]


@dataclass(frozen=True, slots=True)
class ProcessSlot:
    """One of a perOrigin origin's shared worker processes."""

    origin: str
    index: int


@dataclass(frozen=True)
class WorkerView:
    """What the runtime observes of one worker (a Ray actor and its load result)."""

    id: str  # the runtime's name for it; opaque here
    key: ModelKey  # of its LoadedModel
    fingerprint: str
    generation: int
    state: WorkerState
    message: str = ""
    signature: Signature | None = None
    load_seconds: float | None = None
    placement: Placement | None = None
    address: Address | None = None
    note: str = ""  # e.g. the accelerator fell back to the CPU
    model_file: FetchedModel | None = None  # what the node fetched
    origin: str = ""
    restarts: int = 0  # how many workers for this spec died before this one
    process: ProcessSlot | None = None  # the shared process hosting it (perOrigin)
    # Deaths of this spec's workers within the crash window, this one included (when dead).
    recent_deaths: int = 0
    replica: int = 0


@dataclass(frozen=True)
class StartWorker:
    model: LoadedModel
    accelerator: str
    resources: Mapping[str, float]
    memory_limit: int = 0  # bytes the worker may grow by for this model; 0: no limit
    max_model_bytes: int | None = None  # the origin's limit on the model file's size
    process: ProcessSlot | None = None  # a shared process to load into (perOrigin)
    replica: int = 0
    node: str | None = None  # the node to prefer (away from the model's other replicas)


@dataclass(frozen=True)
class StopWorker:
    worker_id: str
    reason: str


Effect = StartWorker | StopWorker


class Condition(NamedTuple):
    status: bool | None  # None: Unknown
    reason: str
    message: str = ""


WITHIN_QUOTA = Condition(False, "WithinQuota")


@dataclass(frozen=True)
class Conditions:
    """The resource's conditions, by type (`status.py` renders them in this order)."""

    scheduled: Condition
    loaded: Condition
    ready: Condition
    degraded: Condition
    quota_exceeded: Condition = WITHIN_QUOTA


@dataclass(frozen=True)
class ModelState:
    """The outcome for one LoadedModel; `status.py` renders it as the resource's status."""

    phase: Phase
    message: str
    conditions: Conditions
    serving: tuple[WorkerView, ...] = ()  # where requests go
    replicas: tuple[WorkerView, ...] = ()  # the current spec's replicas, in any state
    desired: int = 1  # replicas wanted now (the fixed count, or the autoscaler's)
    # Scaled to zero by its autoscaler: the gateway holds requests while a replica starts.
    wakes: bool = False
    signature: Signature | None = None  # what it last loaded, while no replica runs

    @property
    def shown(self) -> WorkerView | None:
        """The replica whose signature and placement the status shows."""
        return self.serving[0] if self.serving else (self.replicas[0] if self.replicas else None)


@dataclass(frozen=True)
class Plan:
    effects: tuple[Effect, ...]
    states: Mapping[ModelKey, ModelState] = field(default_factory=dict)
    admission: Admission = field(default_factory=Admission)
    routes: tuple[Route, ...] = ()  # what every gateway routes by


def plan(
    models: Sequence[LoadedModel],
    workers: Sequence[WorkerView],
    capacity: Mapping[str, float],
    config: PlacementConfig = DEFAULT_PLACEMENT,
    policies: Policies = DEFAULT_POLICIES,
    scale: Mapping[ModelKey, int] | None = None,
    nodes: Sequence[Node] = (),
    signatures: Mapping[tuple[ModelKey, str], Signature] | None = None,
) -> Plan:
    """`models` in creation order: on a name clash within an origin, the earlier one wins,
    and within an origin's quota, the earlier one runs. `scale`: the autoscaler's replica
    counts for models with `spec.autoscaling`; `nodes`: the cluster's nodes, over which a
    model's replicas are spread; `signatures`: what each (model, spec) last loaded."""
    effects: list[Effect] = []
    states: dict[ModelKey, ModelState] = {}
    by_key: dict[ModelKey, list[WorkerView]] = {}
    for worker in workers:
        by_key.setdefault(worker.key, []).append(worker)
    served_names: dict[tuple[str, str], ModelKey] = {}

    bound: list[LoadedModel] = []
    for model in models:
        origin, namespace = model.spec.origin, model.namespace
        if not policies.binds(origin, namespace):
            effects += [StopWorker(w.id, "origin not bound") for w in by_key.pop(model.key, [])]
            states[model.key] = _failed(unbound_message(origin, namespace), "OriginNotBound")
            continue
        owner = served_names.setdefault((origin, model.name), model.key)
        if owner != model.key:
            effects += [StopWorker(w.id, "name clash") for w in by_key.pop(model.key, [])]
            message = (
                f"origin {origin!r} already serves a model named {model.name!r} "
                f"(LoadedModel {owner}); names must be unique within an origin"
            )
            states[model.key] = _failed(message, "NameConflict")
            continue
        bound.append(model)

    def schedulable(accelerator: str) -> bool:
        decision = choose_accelerator(cast(Accelerator, accelerator), capacity, config)
        return isinstance(decision, Scheduled)

    # Only workers for the current spec hold a model's place: an edited spec is admitted
    # again (its old generation keeps serving meanwhile), so an edit cannot grow past a quota.
    current = {
        m.key: [w for w in by_key.get(m.key, []) if w.fingerprint == m.fingerprint] for m in bound
    }
    wanted = {m.key: wanted_replicas(m, current[m.key], scale or {}) for m in bound}
    admission = admit(
        bound,
        {key: len({w.replica for w in mine if w.state != "dead"}) for key, mine in current.items()},
        policies,
        {key: _placed(mine) for key, mine in current.items() if _placed(mine)},
        schedulable,
        wanted,
    )
    slots = _SlotCounter(workers)
    spread = _Spread(workers, nodes)
    for model in bound:
        mine = by_key.pop(model.key, [])
        decision = admission.decisions[model.key]
        if isinstance(decision, Waiting):
            older = _newest_first([w for w in mine if w.state == "ready"])
            keep = older[: max(1, wanted[model.key])]
            effects += [StopWorker(w.id, "superseded") for w in mine if w not in keep]
            states[model.key] = _waiting(decision, tuple(keep), wanted[model.key])
            continue
        policy = policies.of(model.spec.origin)
        starts = _Starts(
            model,
            decision,
            capacity,
            config,
            max_model_bytes=policy.quota.max_model_bytes,
            slots=slots if policy.isolation == "perOrigin" else None,
            slot_count=policy.process_slots(),
            spread=spread,
        )
        step_effects, state = _plan_model(model, mine, starts, wanted[model.key], decision)
        if state.wakes and state.signature is None:
            known = (signatures or {}).get((model.key, model.fingerprint))
            state = dataclasses.replace(state, signature=known)
        states[model.key] = state
        effects += step_effects

    for leftover in by_key.values():  # workers whose LoadedModel is gone
        effects += [StopWorker(w.id, "LoadedModel removed") for w in leftover]
    routes = tuple(route(m, states[m.key]) for m in models if m.key in states)
    return Plan(tuple(effects), states, admission, routes)


def wanted_replicas(
    model: LoadedModel, current: Sequence[WorkerView], scale: Mapping[ModelKey, int]
) -> int:
    """Replicas wanted now: the fixed count, or the autoscaler's within its bounds (before
    its first decision: what runs, and at least one, so that a new model is loaded once)."""
    auto = model.spec.autoscaling
    if auto is None:
        return model.spec.replicas
    if model.key in scale:
        count = scale[model.key]
    else:
        count = max(1, len({w.replica for w in current if w.state in ("starting", "ready")}))
    return max(auto.min_replicas, min(auto.max_replicas, count))


def route(model: LoadedModel, state: ModelState) -> Route:
    """What a gateway needs of a model: the endpoints that serve it, or why none does."""
    endpoints = tuple(
        Endpoint(
            w.address,
            w.id,
            accelerator=w.placement.accelerator if w.placement else "cpu",
        )
        for w in state.serving
        if w.address is not None
    )
    shown = state.serving[0] if state.serving else None
    return Route(
        origin=model.spec.origin,
        name=model.name,
        endpoints=endpoints,
        message=state.message,
        signature=shown.signature if shown is not None else _known_signature(state),
        placement=shown.placement.to_dict() if shown and shown.placement else None,
        wakes=state.wakes,
    )


def _known_signature(state: ModelState) -> Signature | None:
    """A model scaled to zero keeps answering metadata with what it last loaded."""
    return state.signature if state.wakes else None


def _placed(workers: Sequence[WorkerView]) -> str:
    for worker in workers:
        if worker.placement and worker.placement.accelerator:
            return worker.placement.accelerator
    return ""


class _SlotCounter:
    """Spreads a perOrigin origin's models over its process slots: the least used slot."""

    def __init__(self, workers: Sequence[WorkerView]) -> None:
        self._count: dict[ProcessSlot, int] = {}
        for worker in workers:
            if worker.process and worker.state in ("starting", "ready"):
                self._count[worker.process] = self._count.get(worker.process, 0) + 1

    def take(self, origin: str, slots: int) -> ProcessSlot:
        chosen = min(
            (ProcessSlot(origin, i) for i in range(slots)),
            key=lambda slot: (self._count.get(slot, 0), slot.index),
        )
        self._count[chosen] = self._count.get(chosen, 0) + 1
        return chosen


class _Spread:
    """Where each model's replicas run, and how many workers each node hosts: a new replica
    goes to a node its siblings are not on (losing a node loses one replica), the least
    loaded one first."""

    def __init__(self, workers: Sequence[WorkerView], nodes: Sequence[Node]) -> None:
        self.nodes = list(nodes)
        self.siblings: dict[ModelKey, dict[str, int]] = {}
        self.load: dict[str, int] = {}
        for worker in workers:
            if worker.state in ("starting", "ready") and worker.placement is not None:
                self.count(worker.key, worker.placement.node_id)

    def count(self, key: ModelKey, node: str) -> None:
        mine = self.siblings.setdefault(key, {})
        mine[node] = mine.get(node, 0) + 1
        self.load[node] = self.load.get(node, 0) + 1

    def take(self, key: ModelKey, resources: Mapping[str, float]) -> str | None:
        node = spread_node(self.nodes, resources, self.siblings.get(key, {}), self.load)
        if node is not None:
            self.count(key, node)
            # What this pass places is no longer free for the next start of the pass.
            self.nodes = [
                Node(n.id, {r: v - resources.get(r, 0.0) for r, v in n.free.items()})
                if n.id == node
                else n
                for n in self.nodes
            ]
        return node


@dataclass
class _Starts:
    """How to start a replica of one admitted model, when the plan needs one."""

    model: LoadedModel
    admitted: Admitted
    capacity: Mapping[str, float]
    config: PlacementConfig
    max_model_bytes: int | None
    slots: _SlotCounter | None  # perOrigin: the origin's shared processes
    slot_count: int
    spread: _Spread

    def __call__(self, replica: int) -> StartWorker | Unschedulable:
        decision = choose_accelerator(self.admitted.accelerator, self.capacity, self.config)
        if isinstance(decision, Unschedulable):
            return decision
        process = None
        node = None
        # Shared processes are CPU processes: an accelerator model gets a process of its own,
        # reserving its accelerator in Ray.
        if self.slots is not None and decision.accelerator == "cpu":
            process = self.slots.take(self.model.spec.origin, self.slot_count)
        else:
            node = self.spread.take(self.model.key, decision.resources)
        return StartWorker(
            self.model,
            decision.accelerator,
            decision.resources,
            memory_limit=model_memory(self.model),
            max_model_bytes=self.max_model_bytes,
            process=process,
            replica=replica,
            node=node,
        )


_RANK = {"ready": 0, "starting": 1, "failed": 2, "dead": 3}


def _newest_first(workers: Sequence[WorkerView]) -> list[WorkerView]:
    return sorted(workers, key=lambda w: (-w.generation, w.replica))


def _plan_model(
    model: LoadedModel,
    workers: list[WorkerView],
    start: _Starts,
    wanted: int,
    admitted: Admitted,
) -> tuple[list[Effect], ModelState]:
    """One model's replicas: the current spec's, one per index up to what quota admits, and
    an older generation's that keep serving while the current one rolls out."""
    effects: list[Effect] = []
    count = admitted.replicas
    current = [w for w in workers if w.fingerprint == model.fingerprint]
    older = [w for w in workers if w.fingerprint != model.fingerprint]

    # One worker per replica index (the best of any duplicates); the rest, and replicas past
    # the count (scaling down), go.
    by_index: dict[int, WorkerView] = {}
    for worker in sorted(current, key=lambda w: (_RANK[w.state], -w.restarts)):
        if worker.replica < count and worker.replica not in by_index:
            by_index[worker.replica] = worker
        else:
            effects.append(
                StopWorker(worker.id, "scaled down" if worker.replica >= count else "superseded")
            )

    older_ready = _newest_first([w for w in older if w.state == "ready"])
    rolling = bool(older_ready)
    looping = [
        w for w in by_index.values() if w.state == "dead" and w.recent_deaths >= CRASH_LOOP_DEATHS
    ]
    unschedulable: Unschedulable | None = None
    starting = sum(1 for w in by_index.values() if w.state == "starting")
    restarted: list[WorkerView] = []
    for index in range(count):
        found = by_index.get(index)
        if found is not None and found.state != "dead":
            continue
        if found is not None and found in looping:
            continue  # kept, not restarted, until the spec changes
        # While an older generation serves, replicas roll one at a time (a surge of one).
        if rolling and starting >= 1:
            break
        if found is not None:  # died after loading: replace it
            effects.append(StopWorker(found.id, "found died"))
            restarted.append(found)
        started = start(index)
        if isinstance(started, Unschedulable):
            unschedulable = started
            break
        effects.append(started)
        starting += 1

    replicas = [w for w in by_index.values() if w not in restarted]
    ready = [w for w in replicas if w.state == "ready"]
    # Older replicas serve until enough of the current spec's do: as many as the new ones
    # still lack, or, while the new ones answer to another signature (they cannot share
    # traffic), all of them until the new ones are as many, then none.
    mixes = all(w.signature == ready[0].signature for w in older_ready) if ready else True
    if not rolling:
        keep: list[WorkerView] = []
    elif mixes:
        keep = older_ready[: max(0, (count or wanted) - len(ready))]
    elif len(ready) >= min(count or wanted, len(older_ready)):
        keep = []
    else:
        keep = older_ready
    serving = ready + keep if mixes else (keep or ready)
    effects += [
        StopWorker(w.id, "replaced by a newer generation" if w.state == "ready" else "superseded")
        for w in older
        if w not in keep
    ]
    return effects, _state(
        model, replicas, serving, keep, looping, restarted, unschedulable, wanted, admitted
    )


def _state(
    model: LoadedModel,
    replicas: list[WorkerView],
    serving: list[WorkerView],
    older: list[WorkerView],
    looping: list[WorkerView],
    restarted: list[WorkerView],
    unschedulable: Unschedulable | None,
    wanted: int,
    admitted: Admitted,
) -> ModelState:
    """Phase and conditions from what the replicas are doing."""
    count = admitted.replicas
    ready = [w for w in replicas if w.state == "ready"]
    failed = [w for w in replicas if w.state == "failed"]
    loading = [w for w in replicas if w.state == "starting"]
    auto = model.spec.autoscaling
    fallback = max((w.generation for w in older), default=None)
    shown = serving[0] if serving else None
    quota = (
        Condition(True, admitted.short.limit, admitted.short.message)
        if admitted.short is not None
        else WITHIN_QUOTA
    )

    def made(phase: Phase, message: str, conditions: Conditions, wakes: bool = False) -> ModelState:
        return ModelState(
            phase,
            message,
            conditions,
            serving=tuple(serving),
            replicas=tuple(replicas),
            desired=wanted,
            wakes=wakes,
            signature=shown.signature if shown else None,
        )

    if wanted == 0:
        if auto is not None:  # scaled to zero: requests wake it
            message = (
                f"scaled to zero after {auto.scale_to_zero_after_seconds:g} s without "
                "requests; the next request starts a replica"
            )
            return made(
                "Ready",
                message,
                Conditions(
                    scheduled=Condition(True, "ScaledToZero", message),
                    loaded=Condition(False, "ScaledToZero", message),
                    ready=Condition(True, "ScaledToZero", message),
                    degraded=Condition(False, "ScaledToZero"),
                    quota_exceeded=quota,
                ),
                wakes=True,
            )
        message = "spec.replicas is 0: no replica runs until it is raised"
        return made(
            "Pending",
            message,
            Conditions(
                scheduled=Condition(False, "ScaledToZero", message),
                loaded=Condition(None, "ScaledToZero"),
                ready=Condition(False, "ScaledToZero", message),
                degraded=Condition(False, "ScaledToZero"),
                quota_exceeded=quota,
            ),
        )
    wakes = auto is not None and auto.min_replicas == 0 and not serving and not failed
    short = f"{len(ready)} of {wanted} replicas ready"
    notes = [w.note for w in ready if w.note]

    if looping and not ready:
        last = looping[0]
        message = (
            f"the worker died {last.recent_deaths} times in a row; not restarted until the "
            f"spec changes. Last error: {last.message}"
        )
        return made(
            "Ready" if serving else "Failed",
            message + _still_serving(fallback),
            Conditions(
                scheduled=Condition(True, "Scheduled"),
                loaded=Condition(False, "CrashLoop", message),
                ready=_ready_with(serving, fallback),
                degraded=Condition(True, "CrashLoop", message),
                quota_exceeded=quota,
            ),
        )
    if failed and not ready and not loading and not restarted:
        message = failed[0].message
        return made(
            "Ready" if serving else "Failed",
            message + _still_serving(fallback),
            Conditions(
                scheduled=Condition(True, "Scheduled"),
                loaded=Condition(False, "LoadFailed", message),
                ready=_ready_with(serving, fallback),
                degraded=Condition(fallback is not None, "UpdateFailed", message),
                quota_exceeded=quota,
            ),
        )
    if not replicas and not restarted and unschedulable is not None:
        reason = unschedulable.reason
        return made(
            "Ready" if serving else "Pending",
            f"waiting for capacity: {reason}" + _still_serving(fallback),
            Conditions(
                scheduled=Condition(False, "Unschedulable", reason),
                loaded=Condition(None, "Pending"),
                ready=_ready_with(serving, fallback),
                degraded=Condition(fallback is not None, "UpdatePending", reason),
                quota_exceeded=quota,
            ),
        )
    if not ready:
        message = f"loading generation {model.generation}" + _still_serving(fallback)
        degraded = Condition(fallback is not None, "Updating", message)
        restarts = max((w.restarts for w in replicas), default=0)
        if restarted:
            died = restarted[0].message
            message = f"the worker died ({died}); starting a new one" + _still_serving(fallback)
            degraded = Condition(True, "WorkerDied", died)
        elif restarts:
            message = f"the worker died; a new one is loading (restart {restarts})"
            degraded = Condition(True, "WorkerRestarting", message)
        scheduled = Condition(True, "Restarting" if restarted else "Scheduled")
        return made(
            "Ready" if serving or wakes else "Loading",
            message,
            Conditions(
                scheduled=scheduled,
                loaded=Condition(None, "Restarting" if restarted else "Loading"),
                ready=_ready_with(serving, fallback, restarted),
                degraded=degraded,
                quota_exceeded=quota,
            ),
            wakes=wakes,
        )
    # Some replicas of the current spec serve.
    missing = []
    if len(ready) < wanted:
        missing.append(short)
    if restarted:
        missing.append(f"a replica died ({restarted[0].message}); starting a new one")
    elif any(w.restarts for w in loading):
        missing.append("a replica that died is loading again")
    if failed:
        missing.append(f"{len(failed)} failed: {failed[0].message}")
    if looping:
        missing.append(f"{len(looping)} in a crash loop")
    if fallback is not None:
        missing.append(f"rolling out generation {model.generation}")
    if notes:
        # spec.precision fp16 the node could not give, else an accelerator fallback.
        kind = "PrecisionFallback" if notes[0].startswith("precision ") else "AcceleratorFallback"
        degraded = Condition(True, kind, notes[0])
    elif restarted:
        degraded = Condition(True, "WorkerDied", restarted[0].message)
    elif missing and count > 0 and len(ready) < count:
        degraded = Condition(True, "ReplicasUnavailable", "; ".join(missing))
    else:
        degraded = Condition(False, "Serving")
    message = "; ".join([*notes[:1], *missing]) if (notes or missing) else ""
    if wanted > 1 or len(replicas) > 1:
        message = message or f"{len(ready)} replicas serving"
    return made(
        "Ready",
        message,
        Conditions(
            scheduled=Condition(True, "Scheduled"),
            loaded=Condition(True, "Loaded"),
            ready=Condition(True, "Serving"),
            degraded=degraded,
            quota_exceeded=quota,
        ),
    )


def _ready_with(
    serving: Sequence[WorkerView],
    fallback: int | None,
    restarted: Sequence[WorkerView] = (),
) -> Condition:
    if serving and fallback is not None:
        return Condition(True, "ServingPreviousGeneration", f"serving generation {fallback}")
    if serving:
        return Condition(True, "Serving")
    if restarted:
        return Condition(False, "Restarting", restarted[0].message)
    return Condition(False, "NotLoaded")


def _still_serving(generation: int | None) -> str:
    return f"; generation {generation} keeps serving" if generation is not None else ""


def unbound_message(origin: str, namespace: str) -> str:
    return (
        f"spec.origin: namespace {namespace!r} may not act for origin {origin!r}; an origin is "
        f"claimed from the namespace of its name or from those its OriginPolicy lists in "
        f"spec.namespaces"
    )


def _waiting(decision: Waiting, serving: tuple[WorkerView, ...], wanted: int) -> ModelState:
    """Over quota: waits; an edited model's previous generation keeps serving meanwhile."""
    fallback = max((w.generation for w in serving), default=None)
    return ModelState(
        "Ready" if serving else "Pending",
        decision.message + _still_serving(fallback),
        Conditions(
            scheduled=Condition(False, "QuotaExceeded", decision.message),
            loaded=Condition(None, "Pending"),
            ready=_ready_with(serving, fallback),
            degraded=Condition(bool(serving), "UpdatePending", decision.message),
            quota_exceeded=Condition(True, decision.limit, decision.message),
        ),
        serving=serving,
        desired=wanted,
    )


def _failed(message: str, reason: str) -> ModelState:
    return ModelState(
        "Failed",
        message,
        Conditions(
            scheduled=Condition(False, reason, message),
            loaded=Condition(None, reason),
            ready=Condition(False, reason, message),
            degraded=Condition(False, reason),
        ),
    )
