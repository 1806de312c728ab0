"""`modelloader local` as a user runs it: a subprocess on free ports, driven over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.broken_models import write_broken_models
from tests.conftest import EXAMPLE, MODELS
from tests.support.ports import free_port

BIN = Path(sys.executable).parent / "modelloader"
MAX_REQUEST_BYTES = 1 << 20


def manifest(name: str, uri: str, **spec: Any) -> str:
    body = {"source": {"uri": uri}, **spec}
    return (
        json.dumps(
            {
                "apiVersion": "modelloader.dev/v1alpha1",
                "kind": "LoadedModel",
                "metadata": {"name": name},
                "spec": body,
            }
        )
        + "\n"
    )


@dataclass
class LocalServer:
    process: subprocess.Popen[str]
    folder: Path
    state_dir: Path
    port: int
    metrics_port: int
    log_path: Path
    grpc_port: int = 0

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [str(BIN), "status", "-o", "json", "--state-dir", str(self.state_dir)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        data: dict[str, Any] = json.loads(out.stdout)
        return data

    def phases(self) -> dict[str, str]:
        return {i["name"]: i["status"]["phase"] for i in self.status()["items"]}

    def item(self, name: str) -> dict[str, Any]:
        return next(i for i in self.status()["items"] if i["name"] == name)

    def item_or_none(self, name: str) -> dict[str, Any] | None:
        return next((i for i in self.status()["items"] if i["name"] == name), None)

    def wait_for(self, want: dict[str, str], timeout: float = 90.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        phases: dict[str, str] = {}
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            phases = self.phases()
            if all(phases.get(name) == phase for name, phase in want.items()):
                return phases
            time.sleep(0.2)
        raise AssertionError(f"wanted {want}, have {phases}\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def reconcile_passes(self) -> float:
        """The control loop's passes so far, from its /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as response:
            for line in response.read().decode().splitlines():
                if line.startswith("modelloader_reconcile_duration_seconds_count"):
                    return float(line.split()[-1])
        return 0.0

    def wait_passes(self, count: int, timeout: float = 30.0) -> None:
        """Until the control loop has made `count` more passes: for a test that checks that
        something does not happen, a wait on what would have made it happen."""
        target = self.reconcile_passes() + count
        deadline = time.monotonic() + timeout
        while self.reconcile_passes() < target:
            assert time.monotonic() < deadline, f"fewer than {count} passes in {timeout} s"
            time.sleep(0.05)

    def ray_temp_dir(self) -> str:
        match = re.search(r"local Ray started in \S+ \((\S+)\)", self.log())
        assert match, self.log()
        return match.group(1)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                return self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                raise
        return int(self.process.returncode)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    folder = tmp_path_factory.mktemp("manifests")
    shutil.copy(EXAMPLE / "digits.tflite", folder)
    shutil.copy(MODELS / "dtypes.tflite", folder)
    write_broken_models(EXAMPLE / "digits.tflite", folder)
    (folder / "digits.yaml").write_text(
        manifest("digits", "file://digits.tflite", accelerator="cpu")
    )
    (folder / "dtypes.yaml").write_text(manifest("dtypes", "file://dtypes.tflite", threads=2))
    (folder / "broken.yaml").write_text(
        "---\n".join(
            manifest(n, f"file://{n}.tflite") for n in ("corrupt", "truncated", "not-a-model")
        )
    )
    (folder / "gpu.yaml").write_text(manifest("on-gpu", "file://digits.tflite", accelerator="gpu"))
    (folder / "invalid.yaml").write_text(
        manifest("invalid", "file://digits.tflite", accelerator="tpu")
    )
    with running_local(folder) as local:
        local.wait_for({"digits": "Ready", "dtypes": "Ready"})
        yield local


@contextlib.contextmanager
def running_local(folder: Path, *extra: str) -> Iterator[LocalServer]:
    """`modelloader local FOLDER` on free ports, stopped (Ctrl-C) at the end."""
    state_dir = Path(tempfile.mkdtemp(prefix="mlst-", dir="/tmp"))
    port, metrics_port, grpc_port = free_port(), free_port(), free_port()
    log_path = folder.parent / f"{folder.name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                str(BIN),
                "local",
                str(folder),
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
                "--grpc-port",
                str(grpc_port),
                "--state-dir",
                str(state_dir),
                "--cache-dir",
                str(folder.parent / "cache"),
                "--max-request-bytes",
                str(MAX_REQUEST_BYTES),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
    local = LocalServer(process, folder, state_dir, port, metrics_port, log_path, grpc_port)
    try:
        deadline = time.monotonic() + 90
        while not (state_dir / "control.sock").exists():
            assert process.poll() is None, local.log()
            assert time.monotonic() < deadline, local.log()
            time.sleep(0.2)
        yield local
    finally:
        local.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


def parent_of(pid: int) -> int:
    """A process's parent (a model process's: its worker)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
