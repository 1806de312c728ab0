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
# As the raylet does: a process that names the dir starts one that does not.
STARTS_A_CHILD = (
    "import subprocess, sys, time; "
    "child = subprocess.Popen(['sleep', '60']); print(child.pid, flush=True); time.sleep(60)"
)


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class FailingInit:
    """Fails the first `failures` calls after starting a process, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[str] = []
        self.started: list[subprocess.Popen[bytes]] = []
        self.children: list[int] = []  # what they started, not naming the dir (ray::IDLE)

    def __call__(self, **options: Any) -> None:
        temp_dir = options["_temp_dir"]
        self.calls.append(temp_dir)
        if len(self.calls) <= self.failures:
            started = subprocess.Popen(
                [sys.executable, "-c", STARTS_A_CHILD, temp_dir], stdout=subprocess.PIPE
            )
            assert started.stdout is not None
            self.children.append(int(started.stdout.readline()))
            self.started.append(started)
            raise Exception(TIMED_OUT)


def test_a_start_that_times_out_is_cleaned_up_and_tried_again() -> None:
    init = FailingInit(failures=1)
    temp_dir = start_local_ray(1, init=init)
    try:
        first, second = init.calls
        assert temp_dir == second != first
        assert not Path(first).exists()
        assert init.started[0].wait(5) == -9  # what the failed start left running is ended
        assert gone(init.children[0])  # and what that started
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
    assert all(gone(pid) for pid in init.children)
