"""The control plane's Prometheus series (the gateway's are in `modelloader_workers`).

Labels stay bounded: origins, models and phases that exist, the accelerator classes, the quota
resources below and the two kinds of repair. Series of models and origins that are gone are
removed, so a long-running control plane does not accumulate them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from modelloader.planner import Effect, StartWorker
from modelloader.policy import Quota

PHASES = ("Pending", "Loading", "Ready", "Failed")
WAITING_PHASES = ("Pending", "Loading")
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
RECONCILE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
REPAIR_ACTIONS = ("start", "stop")
REPLICA_STATES = ("desired", "current", "ready")


class ControlMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.models = Gauge(
            "modelloader_models", "LoadedModels by phase.", ["phase"], registry=registry
        )
        self.load_duration = Histogram(
            "modelloader_model_load_duration_seconds",
            "From starting a worker to its model being ready: process, fetch and load.",
            ["origin", "model", "accelerator"],
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.worker_restarts = Counter(
            "modelloader_worker_restarts",
            "Workers restarted after dying.",
            ["origin", "model"],
            registry=registry,
        )
        self.reconcile_duration = Histogram(
            "modelloader_reconcile_duration_seconds",
            "One pass of the reconcile loop.",
            buckets=RECONCILE_BUCKETS,
            registry=registry,
        )
        self.reconcile_errors = Counter(
            "modelloader_reconcile_errors", "Reconcile passes that raised.", registry=registry
        )
        self.drift_repairs = Counter(
            "modelloader_drift_repairs",
            "Effects applied to make the workers match the desired state (start: a wanted "
            "worker was missing or died; stop: a worker nobody wants any more).",
            ["action"],
            registry=registry,
        )
        for action in REPAIR_ACTIONS:
            self.drift_repairs.labels(action)
        self.queue_depth = Gauge(
            "modelloader_reconcile_queue_depth",
            "LoadedModels waiting for the control plane: Pending (no capacity yet) or Loading.",
            registry=registry,
        )
        self.quota_used = Gauge(
            "modelloader_origin_quota_used",
            "What an origin uses of a quota resource (memory in bytes, cpu in cores).",
            ["origin", "resource"],
            registry=registry,
        )
        self.quota_limit = Gauge(
            "modelloader_origin_quota_limit",
            "An origin's quota for a resource; no series where the resource is unlimited.",
            ["origin", "resource"],
            registry=registry,
        )
        self.replicas = Gauge(
            "modelloader_replicas",
            "A model's replicas: desired (the fixed count or the autoscaler's), current (of "
            "its current spec, starting or serving) and ready (serving).",
            ["origin", "model", "state"],
            registry=registry,
        )
        self.scaling_decisions = Counter(
            "modelloader_autoscaler_decisions",
            "Changes of a model's desired replicas made by its autoscaler.",
            ["origin", "model", "direction"],
            registry=registry,
        )
        self._models_seen: set[tuple[str, str]] = set()
        self._quota_seen: dict[str, tuple[set[str], set[str]]] = {}
        self._replicas_seen: set[tuple[str, str]] = set()

    def count_phases(self, phases: list[str]) -> None:
        for phase in PHASES:
            self.models.labels(phase).set(phases.count(phase))
        self.queue_depth.set(sum(phases.count(phase) for phase in WAITING_PHASES))

    def observe_pass(self, models: Iterable[tuple[str, str]], effects: Iterable[Effect]) -> None:
        """Per pass: count the repairs applied, and keep one restart series per (origin, model)
        that exists, at zero until a worker dies (a crash loop then shows as an increase)."""
        for effect in effects:
            self.drift_repairs.labels("start" if isinstance(effect, StartWorker) else "stop").inc()
        current = set(models)
        for origin, name in current - self._models_seen:
            self.worker_restarts.labels(origin, name)
        for origin, name in self._models_seen - current:
            _remove(self.worker_restarts, origin, name)
            for labels in _label_sets(self.load_duration):
                if labels[:2] == (origin, name):
                    _remove(self.load_duration, *labels)
        self._models_seen = current

    def publish_replicas(self, counts: Mapping[tuple[str, str], tuple[int, int, int]]) -> None:
        """(origin, model) -> (desired, current, ready); models not named lose their series."""
        for (origin, name), values in counts.items():
            for state, value in zip(REPLICA_STATES, values, strict=True):
                self.replicas.labels(origin, name, state).set(value)
        for origin, name in self._replicas_seen - set(counts):
            for state in REPLICA_STATES:
                _remove(self.replicas, origin, name, state)
        self._replicas_seen = set(counts)

    def publish_quota(
        self,
        origin: str,
        used: Mapping[str, float],
        limits: Mapping[str, float | None],
    ) -> None:
        """Set one origin's usage and limits; a limit of None means unlimited (no series).
        Resources not named this time lose their series."""
        limited = {r: v for r, v in limits.items() if v is not None}
        for resource, value in used.items():
            self.quota_used.labels(origin, resource).set(value)
        for resource, value in limited.items():
            self.quota_limit.labels(origin, resource).set(value)
        old_used, old_limited = self._quota_seen.get(origin, (set(), set()))
        for resource in old_used - set(used):
            _remove(self.quota_used, origin, resource)
        for resource in old_limited - set(limited):
            _remove(self.quota_limit, origin, resource)
        self._quota_seen[origin] = (set(used), set(limited))

    def publish_quotas(
        self, per_origin: Mapping[str, tuple[Mapping[str, float], Mapping[str, float | None]]]
    ) -> None:
        """Every origin's (used, limits) at once; origins not named lose their series."""
        for origin, (used, limits) in per_origin.items():
            self.publish_quota(origin, used, limits)
        self.forget_origins_except(per_origin)

    def forget_origins_except(self, origins: Iterable[str]) -> None:
        """Remove the quota series of origins that are gone."""
        keep = set(origins)
        for origin in set(self._quota_seen) - keep:
            used, limited = self._quota_seen.pop(origin)
            for resource in used:
                _remove(self.quota_used, origin, resource)
            for resource in limited:
                _remove(self.quota_limit, origin, resource)


def quota_limits(
    admission_limits: Mapping[str, float | None], quota: Quota
) -> dict[str, float | None]:
    """The admission's limits plus the gateway's: request rate and concurrency."""
    return {
        **admission_limits,
        "requests_per_second": quota.requests_per_second,
        "concurrent_requests": quota.max_concurrent_requests,
    }


def _remove(metric: Counter | Gauge | Histogram, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never created
        metric.remove(*labels)


def _label_sets(metric: Histogram) -> set[tuple[str, ...]]:
    """The label values of every child of a labelled histogram."""
    names = ("origin", "model", "accelerator")
    return {
        tuple(sample.labels[n] for n in names)
        for family in metric.collect()
        for sample in family.samples
        if sample.name.endswith("_count")
    }
