"""A stand-in for the `pynvml` module: two GPUs, the second of which fails to answer when
`broken` is set."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

GIB = 1 << 30


class FakeNvml:  # method names are NVML's
    def __init__(self, broken: bool = False) -> None:
        self.broken = broken

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if self.broken and index == 1:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=[37, 100][handle], memory=5)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=(handle + 1) * GIB, total=16 * GIB, free=0)
