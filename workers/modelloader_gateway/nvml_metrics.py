"""GPU utilisation and memory per device, read through NVML (`nvidia-ml-py`) at scrape time.

Only real numbers are exported: where NVML is missing or cannot initialise (no NVIDIA driver,
no GPU) the collector yields nothing, so the series are absent rather than zero. A device that
fails to answer is left out of that scrape; the others still are reported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


def _load_nvml() -> Any | None:
    try:
        import pynvml  # type: ignore[import-untyped]  # nvidia-ml-py

        pynvml.nvmlInit()
    except Exception as error:  # ImportError, or NVMLError when there is no driver or GPU
        log.debug("NVML unavailable, no GPU metrics: %s", error)
        return None
    return pynvml


class NvmlCollector(Collector):
    """Collects `modelloader_gpu_*` per device. `nvml` is the `pynvml` module (a stand-in in
    tests); by default it is imported and initialised here, once."""

    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml = nvml if nvml is not None else _load_nvml()

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def describe(self) -> list[Metric]:
        return []  # no fixed series: nothing at all where there is no GPU

    def collect(self) -> Iterator[Metric]:
        nvml = self._nvml
        if nvml is None:
            return
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as error:
            log.warning("NVML: counting devices failed: %s", error)
            return
        utilization = GaugeMetricFamily(
            "modelloader_gpu_utilization_ratio",
            "Share of the last sample period in which the GPU was running a kernel (NVML).",
            labels=["device"],
        )
        used = GaugeMetricFamily(
            "modelloader_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["device"]
        )
        total = GaugeMetricFamily(
            "modelloader_gpu_memory_total_bytes", "GPU memory installed (NVML).", labels=["device"]
        )
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as error:
                log.warning("NVML: reading device %d failed: %s", index, error)
                continue
            device = [str(index)]
            utilization.add_metric(device, float(rates.gpu) / 100.0)
            used.add_metric(device, float(memory.used))
            total.add_metric(device, float(memory.total))
        if utilization.samples:
            yield from (utilization, used, total)
