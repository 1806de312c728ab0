"""The demo that `make demo` runs works, end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import EXAMPLE

pytestmark = pytest.mark.e2e


def test_demo_classifies_the_samples_and_stops_cleanly() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "demo.py")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "10/10 held-out digits classified correctly" in done.stdout
    assert any(
        line.split()[:4] == ["default", "digits", "default", "Ready"]
        for line in done.stdout.splitlines()
    )
    assert "stopped (exit code 0)" in done.stdout
