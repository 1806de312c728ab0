"""What happens over a run: manifests edited, added and removed; a worker killed; Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from tests.e2e.conftest import LocalServer, manifest
from tests.support.cluster import wait_until

pytestmark = pytest.mark.e2e

PIXELS = np.zeros((1, 64), dtype=np.float32)


def classify(server: LocalServer, model: str) -> np.ndarray[Any, Any]:
    client = triton.InferenceServerClient(server.url)
    try:
        tensor = triton.InferInput("pixels", [1, 64], "FP32")
        tensor.set_data_from_numpy(PIXELS, binary_data=True)
        result = client.infer(model, [tensor])
        out: np.ndarray[Any, Any] = result.as_numpy("probabilities")
        return out
    finally:
        client.close()


class Traffic:
    """A client looping on one model, counting what fails."""

    def __init__(self, server: LocalServer, model: str) -> None:
        self.server, self.model = server, model
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                classify(self.server, self.model)
                self.ok += 1
            except Exception as error:
                self.errors.append(str(error))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_a_new_manifest_is_loaded_an_edit_rolls_out_without_errors_and_removal_unloads(
    server: LocalServer,
) -> None:
    path = server.folder / "extra.yaml"
    path.write_text(manifest("extra", "file://digits.tflite", threads=1))
    server.wait_for({"extra": "Ready"}, timeout=60)
    assert classify(server, "extra").shape == (1, 10)
    first_pid = server.item("extra")["status"]["placement"]["pid"]

    with Traffic(server, "extra") as traffic:
        time.sleep(0.5)
        path.write_text(manifest("extra", "file://digits.tflite", threads=2))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = server.item("extra")["status"]
            if status["observedGeneration"] == 2 and status["placement"]["pid"] != first_pid:
                break
            time.sleep(0.2)
        # Traffic goes on until the old worker has drained and gone.
        wait_until(lambda: not _alive(first_pid), timeout=30, what="the old worker stopped")
    assert status["observedGeneration"] == 2 and status["phase"] == "Ready"
    assert traffic.ok > 10 and traffic.errors == []

    path.unlink()
    deadline = time.monotonic() + 30
    while "extra" in server.phases():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    client = triton.InferenceServerClient(server.url)
    try:
        assert not client.is_model_ready("extra")
    finally:
        client.close()


def test_a_killed_worker_is_replaced(server: LocalServer) -> None:
    pid = server.item("digits")["status"]["placement"]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = server.item("digits")["status"]
        if status["phase"] == "Ready" and status.get("placement", {}).get("pid") not in (None, pid):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"digits did not come back: {status}")
    assert classify(server, "digits").shape == (1, 10)


def test_ctrl_c_stops_everything_it_started(server: LocalServer) -> None:
    worker_pids = [
        i["status"]["placement"]["pid"]
        for i in server.status()["items"]
        if "placement" in i["status"]
    ]
    assert worker_pids
    temp_dir = server.ray_temp_dir()
    assert server.stop() == 0, server.log()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = _processes_mentioning(temp_dir) + [p for p in worker_pids if _alive(p)]
        if not left:
            break
        time.sleep(0.3)
    assert left == [], f"left behind: {left}\n{server.log()}"
    assert not (server.state_dir / "control.sock").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead; it waits for a parent that is gone too.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    return [
        line
        for line in out.splitlines()[1:]
        if text in line and "ps -eo" not in line and line.split()[1][0] != "Z"
    ]
