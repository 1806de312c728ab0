"""What every test of the cluster tier needs: a pod network, where pods can run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import pods


@pytest.fixture
def network(tmp_path: Path) -> Iterator[pods.PodNetwork]:
    problem = pods.available()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    with pods.PodNetwork(tmp_path) as network:
        yield network
