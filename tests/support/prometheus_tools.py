"""Debian's `prometheus` and `promtool` for tests: found on PATH (or /usr/bin); where they are
missing the test skips, except under CI=true, where a missing tool is a failure (`.ci/run`
installs them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def prometheus_tool(name: str) -> Path:
    found = shutil.which(name) or shutil.which(name, path="/usr/bin")
    if found is None:
        message = f"{name} not found: apt-get install prometheus"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return Path(found)
