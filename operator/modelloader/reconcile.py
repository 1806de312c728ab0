"""The reconcile core: desired LoadedModels + observed workers -> effects and per-model state.

Pure and level-triggered (after crate-operator's `transition`): the same inputs give the same
plan, nothing is remembered between calls, and a state only advances on what is observed, never
on an effect having been issued. `modelloader local` and the Kubernetes operator both feed it.

Updates never interrupt service: a changed spec starts a new worker beside the old one; traffic
moves when the new one is ready, and the old one is stopped only then. A new version that fails
to load leaves the old one serving.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from modelloader.placement import PlacementConfig, Scheduled, Unschedulable, choose_accelerator
from modelloader.resource import LoadedModel

DEFAULT_PLACEMENT = PlacementConfig()
WorkerState = Literal["starting", "ready", "failed", "dead"]
Phase = Literal["Pending", "Loading", "Ready", "Failed"]


@dataclass(frozen=True)
class WorkerView:
    """What the runtime observes of one worker (a Ray actor and its load result)."""

    id: str
    key: str  # namespace/name of its LoadedModel
    fingerprint: str
    generation: int
    state: WorkerState
    message: str = ""
    signature: Mapping[str, Any] | None = None
    load_seconds: float | None = None
    placement: Mapping[str, Any] | None = None
    address: str | None = None
    note: str = ""  # e.g. the accelerator fell back to the CPU
    origin: str = ""
    restarts: int = 0  # how many workers for this spec died before this one


@dataclass(frozen=True)
class StartWorker:
    model: LoadedModel
    accelerator: str
    resources: Mapping[str, float]


@dataclass(frozen=True)
class StopWorker:
    worker_id: str
    reason: str


Effect = StartWorker | StopWorker


@dataclass(frozen=True)
class ModelState:
    """The outcome for one LoadedModel; `status.py` renders it as the resource's status."""

    phase: Phase
    message: str
    scheduled: tuple[bool, str, str]  # (status, reason, message)
    loaded: tuple[bool | None, str, str]
    ready: tuple[bool, str, str]
    degraded: tuple[bool, str, str]
    serving: WorkerView | None = None  # where requests go
    current: WorkerView | None = None  # the worker for the current spec, if any


@dataclass(frozen=True)
class Plan:
    effects: tuple[Effect, ...]
    states: Mapping[str, ModelState] = field(default_factory=dict)


def plan(
    models: Sequence[LoadedModel],
    workers: Sequence[WorkerView],
    capacity: Mapping[str, float],
    config: PlacementConfig = DEFAULT_PLACEMENT,
) -> Plan:
    """`models` in creation order: on a name clash within an origin, the earlier one wins."""
    effects: list[Effect] = []
    states: dict[str, ModelState] = {}
    by_key: dict[str, list[WorkerView]] = {}
    for worker in workers:
        by_key.setdefault(worker.key, []).append(worker)
    served_names: dict[tuple[str, str], str] = {}

    for model in models:
        mine = by_key.pop(model.key, [])
        owner = served_names.setdefault((model.spec.origin, model.name), model.key)
        if owner != model.key:
            effects += [StopWorker(w.id, "name clash") for w in mine]
            message = (
                f"origin {model.spec.origin!r} already serves a model named {model.name!r} "
                f"(LoadedModel {owner}); names must be unique within an origin"
            )
            states[model.key] = _failed(message, "NameConflict")
            continue
        step_effects, states[model.key] = _plan_one(model, mine, capacity, config)
        effects += step_effects

    for leftover in by_key.values():  # workers whose LoadedModel is gone
        effects += [StopWorker(w.id, "LoadedModel removed") for w in leftover]
    return Plan(tuple(effects), states)


def _plan_one(
    model: LoadedModel,
    workers: list[WorkerView],
    capacity: Mapping[str, float],
    config: PlacementConfig,
) -> tuple[list[Effect], ModelState]:
    effects: list[Effect] = []
    current = next((w for w in workers if w.fingerprint == model.fingerprint), None)
    older = [w for w in workers if w is not current]
    # The newest ready older worker keeps serving while the current spec is not ready.
    fallback = max(
        (w for w in older if w.state == "ready"), key=lambda w: w.generation, default=None
    )

    if current is not None and current.state == "dead":
        # Died after loading: replace it. (Crash-loop limits come with the reliability work.)
        restart = _start(model, capacity, config)
        effects.append(StopWorker(current.id, "worker died"))
        if isinstance(restart, StartWorker):
            effects.append(restart)
        state = ModelState(
            "Ready" if fallback else "Loading",
            f"the worker died ({current.message}); starting a new one" + _still_serving(fallback),
            (True, "Restarting", ""),
            (None, "Restarting", ""),
            (fallback is not None, "Restarting", current.message),
            (True, "WorkerDied", current.message),
            serving=fallback,
            current=None,
        )
    elif current is None:
        started = _start(model, capacity, config)
        if isinstance(started, Unschedulable):
            reason = started.reason
            state = ModelState(
                "Ready" if fallback else "Pending",
                f"waiting for capacity: {reason}" + _still_serving(fallback),
                (False, "Unschedulable", reason),
                (None, "Pending", ""),
                _ready_tuple(fallback),
                (fallback is not None, "UpdatePending", reason),
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
            (True, "Scheduled", ""),
            (False, "LoadFailed", current.message),
            _ready_tuple(fallback),
            (fallback is not None, "UpdateFailed", current.message),
            serving=fallback,
            current=current,
        )
    else:  # ready: it serves, and every older worker goes
        effects += [StopWorker(w.id, "replaced by a newer generation") for w in older]
        fallback_note = (True, "AcceleratorFallback", current.note)
        return effects, ModelState(
            "Ready",
            current.note,
            (True, "Scheduled", ""),
            (True, "Loaded", ""),
            (True, "Serving", ""),
            fallback_note if current.note else (False, "Serving", ""),
            serving=current,
            current=current,
        )

    # Older workers that neither serve nor load: failed or dead leftovers, or surplus.
    keep = {id(w) for w in (fallback, current) if w is not None}
    effects += [StopWorker(w.id, "superseded") for w in older if id(w) not in keep]
    return effects, state


def _start(
    model: LoadedModel, capacity: Mapping[str, float], config: PlacementConfig
) -> StartWorker | Unschedulable:
    decision = choose_accelerator(model.spec.accelerator, capacity, config)
    if isinstance(decision, Unschedulable):
        return decision
    assert isinstance(decision, Scheduled)
    return StartWorker(model, decision.accelerator, decision.resources)


def _loading(
    model: LoadedModel, fallback: WorkerView | None, current: WorkerView | None
) -> ModelState:
    message = f"loading generation {model.generation}" + _still_serving(fallback)
    degraded = (fallback is not None, "Updating", message)
    if current is not None and current.restarts:
        # A replacement for a worker that died: degraded until it serves again.
        message = f"the worker died; a new one is loading (restart {current.restarts})"
        degraded = (True, "WorkerRestarting", message)
    return ModelState(
        "Ready" if fallback else "Loading",
        message,
        (True, "Scheduled", ""),
        (None, "Loading", ""),
        _ready_tuple(fallback),
        degraded,
        serving=fallback,
        current=current,
    )


def _ready_tuple(fallback: WorkerView | None) -> tuple[bool, str, str]:
    if fallback is None:
        return (False, "NotLoaded", "")
    return (True, "ServingPreviousGeneration", f"serving generation {fallback.generation}")


def _still_serving(fallback: WorkerView | None) -> str:
    return f"; generation {fallback.generation} keeps serving" if fallback else ""


def _failed(message: str, reason: str) -> ModelState:
    return ModelState(
        "Failed",
        message,
        (False, reason, message),
        (None, reason, ""),
        (False, reason, message),
        (False, reason, ""),
    )
