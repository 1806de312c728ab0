"""GPU series come from NVML where it finds GPUs, and are absent (not zero) elsewhere."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest
from modelloader_gateway.nvml_metrics import NvmlCollector
from prometheus_client import CollectorRegistry, generate_latest

from tests.support.fake_nvml import GIB, FakeNvml


def samples(collector: NvmlCollector) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {
        (s.name, s.labels["device"]): s.value
        for family in registry.collect()
        for s in family.samples
    }


def test_without_nvml_there_are_no_gpu_series(monkeypatch: pytest.MonkeyPatch) -> None:
    failing = ModuleType("pynvml")

    def no_driver() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    failing.nvmlInit = no_driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", failing)
    collector = NvmlCollector()
    assert not collector.available
    registry = CollectorRegistry()
    registry.register(collector)
    assert b"modelloader_gpu" not in generate_latest(registry)


def test_on_this_machine_nvml_finds_no_gpu_or_reports_real_ones() -> None:
    collector = NvmlCollector()  # the real nvidia-ml-py: no driver here, a GPU on a GPU host
    names = {name for name, _ in samples(collector)}
    if collector.available:
        assert "modelloader_gpu_utilization_ratio" in names
    else:
        assert names == set()


def test_series_per_device_in_base_units() -> None:
    assert samples(NvmlCollector(FakeNvml())) == {
        ("modelloader_gpu_utilization_ratio", "0"): 0.37,
        ("modelloader_gpu_utilization_ratio", "1"): 1.0,
        ("modelloader_gpu_memory_used_bytes", "0"): 1.0 * GIB,
        ("modelloader_gpu_memory_used_bytes", "1"): 2.0 * GIB,
        ("modelloader_gpu_memory_total_bytes", "0"): 16.0 * GIB,
        ("modelloader_gpu_memory_total_bytes", "1"): 16.0 * GIB,
    }


def test_a_device_that_fails_is_left_out_and_the_others_reported() -> None:
    got = samples(NvmlCollector(FakeNvml(broken=True)))
    assert {device for _, device in got} == {"0"}
