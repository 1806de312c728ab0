"""`start_local_ray` tries again when Ray does not start, and a failed start leaves nothing
behind. Ray's `init` raises after it has started the GCS and the raylet when the raylet does
not register within its fixed 30 s (once in CI, under load): the stand-in `init` here starts a
real process that names the attempt's temp dir, as Ray's do, and then raises as Ray did."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from modelloader.ray_workers import start_local_ray

TIMED_OUT = "The current node timed out during startup."


class FailingInit:
    """Fails the first `failures` calls after starting a process, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[str] = []
        self.started: list[subprocess.Popen[bytes]] = []

    def __call__(self, **options: Any) -> None:
        temp_dir = options["_temp_dir"]
        self.calls.append(temp_dir)
        if len(self.calls) <= self.failures:
            self.started.append(
                subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", temp_dir])
            )
            raise Exception(TIMED_OUT)


def test_a_start_that_times_out_is_cleaned_up_and_tried_again() -> None:
    init = FailingInit(failures=1)
    temp_dir = start_local_ray(1, init=init)
    try:
        first, second = init.calls
        assert temp_dir == second != first
        assert not Path(first).exists()
        assert init.started[0].wait(5) == -9  # what the failed start left running is ended
        assert Path(second).is_dir()
    finally:
        os.rmdir(temp_dir)


def test_the_last_failure_is_raised_and_nothing_is_left() -> None:
    init = FailingInit(failures=2)
    with pytest.raises(Exception, match=TIMED_OUT):
        start_local_ray(1, init=init, attempts=2)
    assert len(init.calls) == 2
    assert not any(Path(d).exists() for d in init.calls)
    assert all(p.wait(5) == -9 for p in init.started)
