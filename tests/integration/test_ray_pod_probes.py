"""The Ray pods' probes, run for real: the chart rendered by the real Helm engine, each Ray
pod's `ray start` line built from its rayStartParams the way KubeRay builds it, started with the
pod's rendered environment in a mount namespace of its own (each pod has its own /tmp, where Ray
keeps its sockets), and the probes the chart sets on the Ray container executed in that
namespace, as the kubelet would.

KubeRay's conventions followed here (docs.ray.io, "RayCluster configuration", rayStartParams):
each `key: value` becomes `--key=value` on `ray start` (the head gets `--head`, workers
`--address=<head service>:<GCS port>`), values pasted verbatim into a shell command line, and
`--block` keeps the container's process in the foreground. KubeRay injects its own probes only
into a Ray container that has none; those ask the dashboard agent on :52365, which the runtime
environment (plain `ray`) does not start: the test shows nothing answers there.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.support.cluster import wait_until
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelloader"
BIN = Path(sys.executable).parent
KUBERAY_AGENT_PORT = 52365


def rendered(gcs_port: int) -> dict[str, Any]:
    """The RayCluster's spec, with ports free on this machine (pods share its network here)."""
    values = {
        "ray": {
            "kuberay": {
                "head": {
                    "rayStartParams": {
                        "port": str(gcs_port),
                        "metrics-export-port": str(free_port()),
                    }
                },
                "workerGroups": {
                    "cpu": {"rayStartParams": {"metrics-export-port": str(free_port())}}
                },
            }
        }
    }
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="ml", namespace="modelloader", is_install=True)
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc and doc.get("kind") == "RayCluster":
                return dict(doc["spec"])
    raise AssertionError("no RayCluster rendered")


def start_line(params: dict[str, str], head: bool, gcs_port: int) -> str:
    """`ray start` as KubeRay builds it from rayStartParams."""
    flags = [f"--{key}={value}" for key, value in params.items()]
    where = ["--head"] if head else [f"--address=127.0.0.1:{gcs_port}"]
    return " ".join(["ray", "start", *where, *flags, "--block"])


def environment(container: dict[str, Any], temp: Path, token: str) -> dict[str, str]:
    """The container's rendered environment; a Secret's value is the test's token. `temp`:
    where every pod's own temporary folder is mounted (`pod`)."""
    env = {"PATH": f"{BIN}:{os.environ['PATH']}", "RAY_TMPDIR": str(temp), "LANG": "C.UTF-8"}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            env[entry["name"]] = token
    env["HOME"] = str(temp)
    return env


@contextlib.contextmanager
def pod(
    line: str, env: dict[str, str], own_tmp: Path, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A pod's Ray container: its own mount namespace, where its own folder is mounted at the
    temporary folder every pod names alike."""
    shared = shlex.quote(env["RAY_TMPDIR"])
    inner = f"mount --bind {shlex.quote(str(own_tmp))} {shared} && exec {line}"
    command = ["unshare", "--mount", "--propagation", "private", "bash", "-c", inner]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    time.sleep(0.2)  # unshare has made the namespace
    namespace = os.readlink(f"/proc/{process.pid}/ns/mnt")
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        for pid in in_namespace(namespace):  # Ray's daemons that left the process group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def in_namespace(namespace: str, name: str | None = None) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(entry / "ns" / "mnt") != namespace:
                continue
            program = (entry / "cmdline").read_bytes().split(b"\0")[0]
            if name is None or Path(program.decode()).name == name:
                found.append(int(entry.name))
    return found


def probe(
    container: dict[str, Any], kind: str, env: dict[str, str], pod: subprocess.Popen[bytes]
) -> subprocess.CompletedProcess[str]:
    """The container's probe, executed in the pod's mount namespace as the kubelet would."""
    spec = container[kind]
    return subprocess.run(
        ["nsenter", "-t", str(pod.pid), "-m", "--", *spec["exec"]["command"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=spec["timeoutSeconds"] + 5,
        check=False,
    )


def ray_daemon(name: str, pod: subprocess.Popen[bytes]) -> int:
    (pid,) = in_namespace(os.readlink(f"/proc/{pod.pid}/ns/mnt"), name)
    return pid


def dashboard_agent_installed() -> bool:
    try:
        import ray.dashboard.optional_deps  # noqa: F401  (what the agent needs)
    except ImportError:
        return False
    return True


@pytest.fixture
def folders() -> Iterator[tuple[Path, Path, Path]]:
    """The head's and the worker's own /tmp, and the path both mount theirs at (short: Ray's
    Unix sockets live under it)."""
    head, worker, shared = (Path(tempfile.mkdtemp(prefix=p, dir="/tmp")) for p in "hws")
    yield head, worker, shared
    for folder in (head, worker, shared):
        shutil.rmtree(folder, ignore_errors=True)


def test_ray_pods_become_ready_by_the_charts_probes_and_fail_them_when_ray_dies(
    tmp_path: Path, folders: tuple[Path, Path, Path]
) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("pods need root and unshare (mount namespaces)")
        pytest.skip("pods need root and unshare (mount namespaces)")
    gcs_port = free_port()
    spec = rendered(gcs_port)
    head_spec = spec["headGroupSpec"]
    (cpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "cpu"]
    head_container = head_spec["template"]["spec"]["containers"][0]
    worker_container = cpu["template"]["spec"]["containers"][0]
    for container in (head_container, worker_container):
        # Our probes are set, so KubeRay injects none of its own.
        command = container["readinessProbe"]["exec"]["command"]
        assert command[:3] == ["python", "-m", "modelloader_workers.node_probe"]
    token = secrets.token_hex(16)
    head_tmp, worker_tmp, shared = folders
    head_env = environment(head_container, shared, token)
    worker_env = environment(worker_container, shared, token)
    head_line = start_line(head_spec["rayStartParams"], True, gcs_port)
    worker_line = start_line(cpu["rayStartParams"], False, gcs_port)
    print(head_line, worker_line, sep="\n")

    with pod(head_line, head_env, head_tmp, tmp_path / "head.log") as head:
        wait_until(
            lambda: probe(head_container, "readinessProbe", head_env, head).returncode == 0,
            timeout=90,
            what=f"the head Ready\n{(tmp_path / 'head.log').read_text()}",
        )
        # What KubeRay's injected probes would ask: nothing answers there, where Ray is
        # installed as the runtime image installs it (plain `ray`; `make bench` adds
        # ray[serve], whose dependencies start the agent).
        if not dashboard_agent_installed():
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", KUBERAY_AGENT_PORT), timeout=2).close()

        with pod(worker_line, worker_env, worker_tmp, tmp_path / "worker.log") as worker:
            wait_until(
                lambda: (
                    probe(worker_container, "readinessProbe", worker_env, worker).returncode == 0
                ),
                timeout=90,
                what=f"the worker Ready\n{(tmp_path / 'worker.log').read_text()}",
            )
            assert probe(worker_container, "livenessProbe", worker_env, worker).returncode == 0

            # The worker's raylet dies: its probes fail, with the reason; the head's do not.
            os.kill(ray_daemon("raylet", worker), signal.SIGKILL)
            time.sleep(0.5)
            failed = probe(worker_container, "livenessProbe", worker_env, worker)
            assert failed.returncode == 1 and "raylet" in failed.stderr, failed
            assert probe(head_container, "readinessProbe", head_env, head).returncode == 0

        # The head's GCS dies: the head is no longer Ready.
        os.kill(ray_daemon("gcs_server", head), signal.SIGKILL)
        wait_until(
            lambda: probe(head_container, "readinessProbe", head_env, head).returncode == 1,
            timeout=10,
            what="the head unready without its GCS",
        )
