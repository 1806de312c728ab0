"""The committed dashboards are the generator's output, templated alike, and read only series
that the control plane and the gateway export (with the names alerts depend on)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from modelloader.control_metrics import ControlMetrics
from modelloader_gateway.metrics import GatewayMetrics
from modelloader_gateway.nvml_metrics import NvmlCollector
from prometheus_client import CollectorRegistry

from tests.conftest import REPO
from tests.support.fake_nvml import FakeNvml

DASHBOARDS = REPO / "dashboards"
# Series names; recording rules (`level:metric:operations`) are not exported series.
SERIES = re.compile(r"(?<![:\w])modelloader_[a-z_]+\b(?!:)")


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate", DASHBOARDS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def exported_series() -> set[str]:
    """Every sample name the control plane and the gateway can expose."""
    registry = CollectorRegistry()
    control = ControlMetrics(registry)
    gateway = GatewayMetrics(registry)
    registry.register(NvmlCollector(FakeNvml()))
    control.load_duration.labels("o", "m", "cpu").observe(1)
    control.worker_restarts.labels("o", "m").inc()
    control.publish_quota("o", {"models": 1}, {"models": 2})
    control.count_phases(["Ready"])
    series = gateway.series("o", "m")
    series.observe_request(200, 0.001)
    series.observe_inference(100, 10, 0.0001, 0.001, "cpu", 4)
    return {sample.name for family in registry.collect() for sample in family.samples}


def test_committed_dashboards_are_the_generators_output(tmp_path: Path) -> None:
    written = generator().write_all(tmp_path)
    assert {p.name for p in written} == set(committed()), "run dashboards/generate.py"
    for path in written:
        expected = (DASHBOARDS / path.name).read_text()
        assert path.read_text() == expected, f"{path.name} drifted: run dashboards/generate.py"


def test_every_dashboard_is_templated_by_datasource_origin_and_model() -> None:
    for name, board in committed().items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert {"datasource", "origin", "model"} <= variables.keys(), name
        assert variables["datasource"]["query"] == "prometheus"
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == "${datasource}", (name, panel["title"])


def test_dashboards_and_rules_read_only_exported_series() -> None:
    exported = exported_series()
    text = "\n".join(p.read_text() for p in DASHBOARDS.glob("*.json"))
    text += (DASHBOARDS / "rules.yaml").read_text()
    used = set(SERIES.findall(text))
    assert used, "no series found"
    assert used <= exported, sorted(used - exported)


def test_the_main_series_have_the_names_dashboards_and_alerts_depend_on() -> None:
    exported = exported_series()
    for name in (
        "modelloader_request_duration_seconds_bucket",
        "modelloader_queue_duration_seconds_bucket",
        "modelloader_inference_duration_seconds_bucket",
        "modelloader_requests_total",
        "modelloader_request_bytes_bucket",
        "modelloader_response_bytes_bucket",
        "modelloader_model_load_duration_seconds_bucket",
        "modelloader_models",
        "modelloader_worker_restarts_total",
        "modelloader_accelerator_busy_seconds_total",
        "modelloader_gpu_utilization_ratio",
        "modelloader_gpu_memory_used_bytes",
        "modelloader_origin_quota_used",
        "modelloader_origin_quota_limit",
        "modelloader_reconcile_duration_seconds_bucket",
        "modelloader_reconcile_errors_total",
        "modelloader_drift_repairs_total",
        "modelloader_reconcile_queue_depth",
    ):
        assert name in exported, name
