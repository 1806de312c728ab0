"""Render a LoadedModel's state as the resource's `status`, in the CRD's shape. Pure.

Condition transition times move only when a condition's status changes, so the previous status
goes in along with the clock's reading.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from modelloader.manifests import Rejected
from modelloader.planner import Condition, Conditions, ModelState
from modelloader.quota import OriginUsage
from modelloader.resource import LoadedModel

# The scale subresource's selector (an HPA or KEDA reads it); replicas are Ray actors, not pods,
# so it names the LoadedModel.
SELECTOR_LABEL = "modelloader.dev/loadedmodel"


def timestamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render(
    model: LoadedModel,
    state: ModelState,
    previous: Mapping[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    before = {c.get("type"): c for c in (previous or {}).get("conditions", ())}
    conditions = [
        _condition(kind, condition, before.get(kind), now)
        for kind, condition in _by_type(state.conditions)
    ]
    status: dict[str, Any] = {
        "phase": state.phase,
        "message": state.message,
        "observedGeneration": model.generation,
        "conditions": conditions,
    }
    shown = state.shown
    known = shown.signature if shown is not None and shown.signature else state.signature
    if known is not None:  # a model scaled to zero keeps what it last loaded
        signature = known.to_dict()
        status["inputs"] = signature["inputs"]
        status["outputs"] = signature["outputs"]
    if shown is not None and shown.placement is not None:
        status["placement"] = shown.placement.to_dict()
    if shown is not None and shown.load_seconds is not None:
        status["loadSeconds"] = round(shown.load_seconds, 4)
    if shown is not None and shown.model_file is not None:
        file = shown.model_file
        status["model"] = {"sha256": file.sha256, "size": file.size}
        if file.resolved:
            status["model"]["resolved"] = file.resolved
    ready = len(state.serving)
    status["replicas"] = sum(1 for w in state.replicas if w.state in ("starting", "ready"))
    status["readyReplicas"] = ready
    status["desiredReplicas"] = state.desired
    status["ready"] = f"{ready}/{state.desired}"
    status["selector"] = f"{SELECTOR_LABEL}={model.name}"
    serving = {w.id for w in state.serving}
    # By id: hashing whole views (signature, placement and all) was a tenth of a pass at 500.
    shown_workers = {w.id: w for w in (*state.replicas, *state.serving)}.values()
    placements = [
        {"replica": w.replica, "generation": w.generation, "ready": w.id in serving}
        | (w.placement.to_dict() if w.placement is not None else {})
        for w in sorted(shown_workers, key=lambda w: (w.replica, -w.generation))
    ]
    if placements:
        status["replicaPlacements"] = placements
    return status


def _by_type(conditions: Conditions) -> tuple[tuple[str, Condition], ...]:
    return (
        ("Scheduled", conditions.scheduled),
        ("Loaded", conditions.loaded),
        ("Ready", conditions.ready),
        ("Degraded", conditions.degraded),
        ("QuotaExceeded", conditions.quota_exceeded),
    )


def render_rejected(rejected: Rejected, now: datetime) -> dict[str, Any]:
    """A manifest that failed validation: what the API server's rejection would have said."""
    message = f"invalid manifest ({rejected.where}): {rejected.message}"
    return {
        "phase": "Failed",
        "message": message,
        "conditions": [
            {
                "type": kind,
                "status": "False",
                "reason": "InvalidSpec",
                "message": message,
                "lastTransitionTime": timestamp(now),
            }
            for kind in ("Scheduled", "Ready")
        ],
    }


def _condition(
    kind: str,
    condition: Condition,
    before: Mapping[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    """One condition; its transition time moves only when its status changes."""
    value = condition.status
    text = "Unknown" if value is None else ("True" if value else "False")
    since = (
        before["lastTransitionTime"]
        if before is not None and before.get("status") == text
        else timestamp(now)
    )
    return {
        "type": kind,
        "status": text,
        "reason": condition.reason,
        "message": condition.message,
        "lastTransitionTime": since,
    }


def render_origin(usage: OriginUsage, explicit: bool) -> dict[str, Any]:
    """An OriginPolicy's status: usage against each limit (memory in bytes), and how many
    LoadedModels wait for room. `explicit`: the origin has a policy of its own."""
    used = {k: _amount(k, v) for k, v in usage.used.items()}
    limits = {k: _amount(k, v) for k, v in usage.limits.items() if v is not None}
    at_limit = sorted(k for k, v in limits.items() if used.get(k, 0) >= v)
    rendered: dict[str, Any] = {"usage": used, "limits": limits, "waiting": usage.waiting}
    rendered["atLimit"] = at_limit
    rendered["policy"] = "own" if explicit else "default"
    return rendered


def render_origins(
    usage_statuses: Mapping[str, dict[str, Any]], explicit: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """The status of every origin that has an OriginPolicy: its usage, or none yet."""
    return {
        origin: usage_statuses.get(origin) or render_origin(OriginUsage(origin, {}, {}), True)
        for origin in explicit
    }


def _amount(resource: str, value: float) -> int | float:
    return value if resource == "cpu" else int(value)
