"""The control plane's Prometheus series (the gateway's are in `modelloader_workers`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PHASES = ("Pending", "Loading", "Ready", "Failed")
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class ControlMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
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
            registry=registry,
        )
        self.reconcile_errors = Counter(
            "modelloader_reconcile_errors", "Reconcile passes that raised.", registry=registry
        )

    def count_phases(self, phases: list[str]) -> None:
        for phase in PHASES:
            self.models.labels(phase).set(phases.count(phase))
