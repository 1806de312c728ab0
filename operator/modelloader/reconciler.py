"""One pass of the control loop, shared by `modelloader local` and the Kubernetes operator:
desired LoadedModels + observed workers -> effects applied, statuses rendered, routes for the
gateway. The two differ only in where manifests come from and where statuses go."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from modelloader_workers.gateway.directory import ModelEntry
from modelloader_workers.signature import Signature

from modelloader import status
from modelloader.control_metrics import ControlMetrics, quota_limits
from modelloader.manifests import Rejected
from modelloader.placement import PlacementConfig
from modelloader.policy import Policies
from modelloader.reconcile import DEFAULT_POLICIES, plan
from modelloader.resource import LoadedModel
from modelloader.worker_pool import WorkerPool


@dataclass(frozen=True)
class Outcome:
    statuses: dict[str, dict[str, Any]]  # key -> status, for LoadedModels and rejected ones
    listing: list[dict[str, Any]]  # namespace, name, origin, status: what `status` shows
    entries: list[ModelEntry] = field(default_factory=list)  # for the gateway's directory
    origins: dict[str, dict[str, Any]] = field(default_factory=dict)  # OriginPolicy statuses


class Reconciler:
    def __init__(
        self, pool: WorkerPool, metrics: ControlMetrics, placement: PlacementConfig
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.placement = placement
        self.statuses: dict[str, dict[str, Any]] = {}

    def step(
        self,
        models: Sequence[LoadedModel],
        rejected: Sequence[Rejected],
        capacity: Mapping[str, float],
        policies: Policies = DEFAULT_POLICIES,
    ) -> Outcome:
        result = plan(models, self.pool.views(), capacity, self.placement, policies)
        self.pool.apply(result.effects)

        now = datetime.now(UTC)
        statuses: dict[str, dict[str, Any]] = {}
        listing: list[dict[str, Any]] = []
        entries: list[ModelEntry] = []
        for model in models:
            state = result.states[model.key]
            rendered = status.render(model, state, self.statuses.get(model.key), now)
            statuses[model.key] = rendered
            listing.append(_item(model.namespace, model.name, model.spec.origin, rendered))
            serving = state.serving
            entries.append(
                ModelEntry(
                    origin=model.spec.origin,
                    name=model.name,
                    ready=serving is not None and serving.address is not None,
                    message=state.message,
                    signature=Signature.from_dict(serving.signature)
                    if serving is not None and serving.signature
                    else None,
                    address=serving.address if serving is not None else None,
                    placement=serving.placement if serving is not None else None,
                )
            )
        for reject in rejected:
            rendered = status.render_rejected(reject, now)
            statuses[f"{reject.namespace}/{reject.name}"] = rendered
            listing.append(_item(reject.namespace, reject.name, "", rendered))
        self.statuses = statuses
        self.metrics.count_phases([item["status"]["phase"] for item in listing])
        self.metrics.observe_pass([(m.spec.origin, m.name) for m in models], result.effects)
        usage = result.admission.usage  # per origin; a limit of None is unlimited: no series
        self.metrics.publish_quotas(
            {o: (u.used, quota_limits(u.limits, policies.of(o).quota)) for o, u in usage.items()}
        )
        origins = {
            origin: status.render_origin(u, policies.of(origin).explicit)
            for origin, u in usage.items()
        }
        return Outcome(statuses, listing, entries, origins)


def _item(namespace: str, name: str, origin: str, rendered: dict[str, Any]) -> dict[str, Any]:
    return {"namespace": namespace, "name": name, "origin": origin, "status": rendered}
