"""A real local Ray for the integration tier, started once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from modelloader.ray_workers import start_local_ray, stop_ray


@pytest.fixture(scope="session")
def local_ray() -> Iterator[str]:
    temp_dir = start_local_ray(num_cpus=2)
    yield temp_dir
    stop_ray()
