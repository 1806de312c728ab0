"""The control plane's series: quota usage and limits, repairs, queue depth, and series that go
away with the models and origins they describe."""

from __future__ import annotations

from modelloader.control_metrics import ControlMetrics
from modelloader.planner import StartWorker, StopWorker
from modelloader.resource import LoadedModel, LoadedModelSpec, Source
from prometheus_client import CollectorRegistry


def series(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == name
    }


def fresh() -> tuple[CollectorRegistry, ControlMetrics]:
    registry = CollectorRegistry()
    return registry, ControlMetrics(registry)


def test_an_unlimited_resource_has_usage_but_no_limit_series() -> None:
    registry, metrics = fresh()
    metrics.publish_quota("a", {"models": 2, "memory": 512.0}, {"models": 4, "memory": None})
    assert series(registry, "modelloader_origin_quota_used") == {
        (("origin", "a"), ("resource", "models")): 2,
        (("origin", "a"), ("resource", "memory")): 512,
    }
    assert series(registry, "modelloader_origin_quota_limit") == {
        (("origin", "a"), ("resource", "models")): 4
    }


def test_a_limit_lifted_and_an_origin_gone_lose_their_series() -> None:
    registry, metrics = fresh()
    metrics.publish_quotas({"a": ({"models": 1}, {"models": 4}), "b": ({"models": 3}, {})})
    metrics.publish_quotas({"a": ({"models": 1}, {"models": None})})
    assert series(registry, "modelloader_origin_quota_used") == {
        (("origin", "a"), ("resource", "models")): 1
    }
    assert series(registry, "modelloader_origin_quota_limit") == {}


def model(name: str, origin: str = "default") -> LoadedModel:
    return LoadedModel(
        "default", name, LoadedModelSpec(origin=origin, source=Source("file:///m.tflite"))
    )


def test_repairs_are_counted_by_action_and_both_actions_start_at_zero() -> None:
    registry, metrics = fresh()
    assert series(registry, "modelloader_drift_repairs_total") == {
        (("action", "start"),): 0,
        (("action", "stop"),): 0,
    }
    effects = (
        StartWorker(model("m"), "cpu", {}),
        StopWorker("w1", "worker died"),
        StopWorker("w2", "LoadedModel removed"),
    )
    metrics.observe_pass([], effects)
    assert series(registry, "modelloader_drift_repairs_total") == {
        (("action", "start"),): 1,
        (("action", "stop"),): 2,
    }


def test_every_model_has_a_restart_series_until_it_is_removed() -> None:
    registry, metrics = fresh()
    metrics.observe_pass([("a", "digits"), ("b", "digits")], ())
    metrics.load_duration.labels("a", "digits", "cpu").observe(0.5)
    metrics.worker_restarts.labels("b", "digits").inc()
    assert series(registry, "modelloader_worker_restarts_total") == {
        (("model", "digits"), ("origin", "a")): 0,
        (("model", "digits"), ("origin", "b")): 1,
    }
    metrics.observe_pass([("b", "digits")], ())
    assert series(registry, "modelloader_worker_restarts_total") == {
        (("model", "digits"), ("origin", "b")): 1,
    }
    assert series(registry, "modelloader_model_load_duration_seconds_count") == {}


def test_queue_depth_counts_models_waiting() -> None:
    registry, metrics = fresh()
    metrics.count_phases(["Ready", "Pending", "Loading", "Failed", "Pending"])
    assert series(registry, "modelloader_reconcile_queue_depth") == {(): 3}
    assert series(registry, "modelloader_models")[(("phase", "Pending"),)] == 2
