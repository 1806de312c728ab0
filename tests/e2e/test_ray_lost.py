"""`modelloader local` when its own Ray dies: the gateway stops saying it is ready, status says
why, a fresh Ray is started and the models are loaded again; never a gateway that answers 503
forever while looking alive."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE
from tests.e2e.conftest import LocalServer, manifest, running_local
from tests.support.cluster import wait_until

PIXELS = json.dumps(
    {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
)


def get(server: LocalServer, path: str, body: str | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST" if body else "GET", path, body)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def processes(name: str, under: str) -> list[int]:
    """Pids of the processes whose program is `name` and whose command line mentions `under`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and Path(args[0].decode()).name == name and under.encode() in b" ".join(args):
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("victim", ["raylet", "gcs_server"])
def test_a_lost_ray_is_reported_then_replaced_and_the_models_load_again(
    tmp_path: Path, victim: str
) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    shutil.copy(EXAMPLE / "digits.tflite", folder)
    (folder / "digits.yaml").write_text(manifest("digits", "file://digits.tflite"))
    with running_local(folder, "--warm-workers", "0") as local:
        local.wait_for({"digits": "Ready"})
        assert get(local, "/v2/models/digits/infer", PIXELS) == 200
        first = local.ray_temp_dir()
        (pid,) = processes(victim, first)
        os.kill(pid, signal.SIGKILL)

        # Not ready, and status says why, rather than a gateway that looks alive.
        def reported() -> str | None:
            errors = local.status()["errors"]
            return next((e for e in errors if victim in e), None)

        unready = False
        reason = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (unready and reason):
            unready = unready or get(local, "/v2/health/ready") == 503
            reason = reason or reported()
            time.sleep(0.05)
        assert unready, local.log()
        assert reason is not None and "starting a new Ray" in reason, local.log()

        # A fresh Ray, the model loaded again, serving.
        wait_until(
            lambda: (
                get(local, "/v2/health/ready") == 200
                and local.phases().get("digits") == "Ready"
                and get(local, "/v2/models/digits/infer", PIXELS) == 200
            ),
            timeout=90,
            what="digits serving again on a new Ray",
        )
        assert local.process.poll() is None
        assert not [e for e in local.status()["errors"] if victim in e]
        assert local.log().count("local Ray started") == 2
