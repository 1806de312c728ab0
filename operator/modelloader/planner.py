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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, cast

from modelloader_gateway.routes import Endpoint, Route
from modelloader_workers.wire.address import Address
from modelloader_workers.wire.identity import ModelKey
from modelloader_workers.wire.placement import Placement
from modelloader_workers.wire.signature import Signature

from modelloader.placement import PlacementConfig, Scheduled, Unschedulable, choose_accelerator
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
    serving: WorkerView | None = None  # where requests go
    current: WorkerView | None = None  # the worker for the current spec, if any


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
) -> Plan:
    """`models` in creation order: on a name clash within an origin, the earlier one wins,
    and within an origin's quota, the earlier one runs."""
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

    # Only a worker for the current spec holds a model's place: an edited spec is admitted
    # again (its old generation keeps serving meanwhile), so an edit cannot grow past a quota.
    current = {
        m.key: [w for w in by_key.get(m.key, []) if w.fingerprint == m.fingerprint] for m in bound
    }
    admission = admit(
        bound,
        [key for key, mine in current.items() if mine],
        policies,
        {key: _placed(mine) for key, mine in current.items() if _placed(mine)},
        schedulable,
    )
    slots = _SlotCounter(workers)
    for model in bound:
        mine = by_key.pop(model.key, [])
        decision = admission.decisions[model.key]
        if isinstance(decision, Waiting):
            fallback = max(
                (w for w in mine if w.state == "ready"), key=lambda w: w.generation, default=None
            )
            keep = [fallback] if fallback is not None else []
            effects += [StopWorker(w.id, "superseded") for w in mine if w not in keep]
            states[model.key] = _waiting(decision, fallback)
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
        )
        step_effects, states[model.key] = _plan_one(model, mine, starts)
        effects += step_effects

    for leftover in by_key.values():  # workers whose LoadedModel is gone
        effects += [StopWorker(w.id, "LoadedModel removed") for w in leftover]
    routes = tuple(route(m, states[m.key]) for m in models if m.key in states)
    return Plan(tuple(effects), states, admission, routes)


def route(model: LoadedModel, state: ModelState) -> Route:
    """What a gateway needs of a model: the endpoints that serve it, or why none does."""
    serving = state.serving
    endpoints: tuple[Endpoint, ...] = ()
    if serving is not None and serving.address is not None:
        accelerator = serving.placement.accelerator if serving.placement else "cpu"
        endpoints = (Endpoint(serving.address, serving.id, accelerator=accelerator),)
    return Route(
        origin=model.spec.origin,
        name=model.name,
        endpoints=endpoints,
        message=state.message,
        signature=serving.signature if serving is not None else None,
        placement=serving.placement.to_dict() if serving and serving.placement else None,
    )


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


@dataclass
class _Starts:
    """How to start a worker for one admitted model, when the plan needs one."""

    model: LoadedModel
    admitted: Admitted
    capacity: Mapping[str, float]
    config: PlacementConfig
    max_model_bytes: int | None
    slots: _SlotCounter | None  # perOrigin: the origin's shared processes
    slot_count: int

    def __call__(self) -> StartWorker | Unschedulable:
        decision = choose_accelerator(self.admitted.accelerator, self.capacity, self.config)
        if isinstance(decision, Unschedulable):
            return decision
        process = None
        # Shared processes are CPU processes: an accelerator model gets a process of its own,
        # reserving its accelerator in Ray.
        if self.slots is not None and decision.accelerator == "cpu":
            process = self.slots.take(self.model.spec.origin, self.slot_count)
        return StartWorker(
            self.model,
            decision.accelerator,
            decision.resources,
            memory_limit=model_memory(self.model),
            max_model_bytes=self.max_model_bytes,
            process=process,
        )


def _plan_one(
    model: LoadedModel,
    workers: list[WorkerView],
    start: _Starts,
) -> tuple[list[Effect], ModelState]:
    effects: list[Effect] = []
    current = next((w for w in workers if w.fingerprint == model.fingerprint), None)
    older = [w for w in workers if w is not current]
    # The newest ready older worker keeps serving while the current spec is not ready.
    fallback = max(
        (w for w in older if w.state == "ready"), key=lambda w: w.generation, default=None
    )
    scheduled = Condition(True, "Scheduled")

    if (
        current is not None
        and current.state == "dead"
        and current.recent_deaths >= CRASH_LOOP_DEATHS
    ):
        # Kept (not stopped) so the next pass sees the same dead worker: no restart until the
        # spec changes (a new fingerprint makes it an older worker, stopped as superseded).
        message = (
            f"the worker died {current.recent_deaths} times in a row; not restarted until the "
            f"spec changes. Last error: {current.message}"
        )
        state = ModelState(
            "Ready" if fallback else "Failed",
            message + _still_serving(fallback),
            Conditions(
                scheduled=scheduled,
                loaded=Condition(False, "CrashLoop", message),
                ready=_ready(fallback),
                degraded=Condition(True, "CrashLoop", message),
            ),
            serving=fallback,
            current=current,
        )
    elif current is not None and current.state == "dead":
        # Died after loading: replace it.
        restart = start()
        effects.append(StopWorker(current.id, "worker died"))
        if isinstance(restart, StartWorker):
            effects.append(restart)
        state = ModelState(
            "Ready" if fallback else "Loading",
            f"the worker died ({current.message}); starting a new one" + _still_serving(fallback),
            Conditions(
                scheduled=Condition(True, "Restarting"),
                loaded=Condition(None, "Restarting"),
                ready=Condition(fallback is not None, "Restarting", current.message),
                degraded=Condition(True, "WorkerDied", current.message),
            ),
            serving=fallback,
        )
    elif current is None:
        started = start()
        if isinstance(started, Unschedulable):
            reason = started.reason
            state = ModelState(
                "Ready" if fallback else "Pending",
                f"waiting for capacity: {reason}" + _still_serving(fallback),
                Conditions(
                    scheduled=Condition(False, "Unschedulable", reason),
                    loaded=Condition(None, "Pending"),
                    ready=_ready(fallback),
                    degraded=Condition(fallback is not None, "UpdatePending", reason),
                ),
                serving=fallback,
            )
        else:
            effects.append(started)
            state = _loading(model, fallback, None)
    elif current.state == "starting":
        state = _loading(model, fallback, current)
    elif current.state == "failed":
        state = ModelState(
            "Ready" if fallback else "Failed",
            current.message + _still_serving(fallback),
            Conditions(
                scheduled=scheduled,
                loaded=Condition(False, "LoadFailed", current.message),
                ready=_ready(fallback),
                degraded=Condition(fallback is not None, "UpdateFailed", current.message),
            ),
            serving=fallback,
            current=current,
        )
    else:  # ready: it serves, and every older worker goes
        effects += [StopWorker(w.id, "replaced by a newer generation") for w in older]
        degraded = (
            Condition(True, "AcceleratorFallback", current.note)
            if current.note
            else Condition(False, "Serving")
        )
        return effects, ModelState(
            "Ready",
            current.note,
            Conditions(
                scheduled=scheduled,
                loaded=Condition(True, "Loaded"),
                ready=Condition(True, "Serving"),
                degraded=degraded,
            ),
            serving=current,
            current=current,
        )

    # Older workers that neither serve nor load: failed or dead leftovers, or surplus.
    keep = {id(w) for w in (fallback, current) if w is not None}
    effects += [StopWorker(w.id, "superseded") for w in older if id(w) not in keep]
    return effects, state


def _loading(
    model: LoadedModel, fallback: WorkerView | None, current: WorkerView | None
) -> ModelState:
    message = f"loading generation {model.generation}" + _still_serving(fallback)
    degraded = Condition(fallback is not None, "Updating", message)
    if current is not None and current.restarts:
        # A replacement for a worker that died: degraded until it serves again.
        message = f"the worker died; a new one is loading (restart {current.restarts})"
        degraded = Condition(True, "WorkerRestarting", message)
    return ModelState(
        "Ready" if fallback else "Loading",
        message,
        Conditions(
            scheduled=Condition(True, "Scheduled"),
            loaded=Condition(None, "Loading"),
            ready=_ready(fallback),
            degraded=degraded,
        ),
        serving=fallback,
        current=current,
    )


def _ready(fallback: WorkerView | None) -> Condition:
    if fallback is None:
        return Condition(False, "NotLoaded")
    return Condition(True, "ServingPreviousGeneration", f"serving generation {fallback.generation}")


def _still_serving(fallback: WorkerView | None) -> str:
    return f"; generation {fallback.generation} keeps serving" if fallback else ""


def unbound_message(origin: str, namespace: str) -> str:
    return (
        f"spec.origin: namespace {namespace!r} may not act for origin {origin!r}; an origin is "
        f"claimed from the namespace of its name or from those its OriginPolicy lists in "
        f"spec.namespaces"
    )


def _waiting(decision: Waiting, fallback: WorkerView | None) -> ModelState:
    """Over quota: waits; an edited model's previous generation keeps serving meanwhile."""
    return ModelState(
        "Ready" if fallback else "Pending",
        decision.message + _still_serving(fallback),
        Conditions(
            scheduled=Condition(False, "QuotaExceeded", decision.message),
            loaded=Condition(None, "Pending"),
            ready=_ready(fallback),
            degraded=Condition(fallback is not None, "UpdatePending", decision.message),
            quota_exceeded=Condition(True, decision.limit, decision.message),
        ),
        serving=fallback,
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
