"""The chart's Ray pods, run as a cluster: the RayCluster rendered by the real Helm engine with
the chart's defaults (a head and a CPU worker group of 2 pods), each pod in a network namespace
of its own with its own address (`tests/support/pods.py`), Service names resolved by the pod's
hosts file, each pod's `ray start` line built from its rayStartParams the way KubeRay builds it,
and the probes the chart sets run inside the pods until every pod is Ready. Then the faults a
cluster meets: a worker pod cut off (its link down), a raylet killed, the GCS killed.

KubeRay's conventions followed here (docs.ray.io, "RayCluster configuration", rayStartParams):
each `key: value` becomes `--key=value` on `ray start` (the head gets `--head`, workers
`--address=<head Service FQDN>:<GCS port>`, the head Service being `<RayCluster name>-head-svc`),
values pasted verbatim into a shell command line, and `--block` keeps the container's process
in the foreground. KubeRay injects its own probes only into a Ray container that has none; those
ask the dashboard agent on :52365, which the images' environment (plain `ray`, installed by
the Dockerfiles' steps: `tests/support/image_env.py`) does not start: nothing answers there.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import chart_pods as chart
from tests.support import pods
from tests.support.cluster import wait_until

KUBERAY_AGENT_PORT = 52365
# Ready within: the chart's readiness probe allows 10 s + 10 failures 5 s apart.
READY_SECONDS = 90

OBSERVER = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
last = None
while True:
    alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    if alive != last:
        print(json.dumps({"at": time.monotonic(), "alive": alive}), flush=True)
        last = alive
    time.sleep(0.1)
"""


def probe(pod: pods.Pod, container: dict[str, Any], kind: str) -> Any:
    spec = container[kind]
    return pod.run(spec["exec"]["command"], timeout=spec["timeoutSeconds"] + 5)


def alive_nodes(log: Path) -> list[dict[str, Any]]:
    seen = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line still being written
            seen.append(json.loads(line))
    return [s for s in seen if isinstance(s, dict)]


@pytest.mark.timeout(600)
def test_ray_pods_on_their_own_network_become_ready_and_a_node_cut_off_is_found_dead(
    network: pods.PodNetwork, tmp_path: Path
) -> None:
    cluster = chart.one(chart.render({}), "RayCluster")
    spec = cluster["spec"]
    head_spec = spec["headGroupSpec"]
    (cpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "cpu"]
    assert cpu["replicas"] == 2
    head_container = head_spec["template"]["spec"]["containers"][0]
    worker_container = cpu["template"]["spec"]["containers"][0]
    for container in (head_container, worker_container):
        # Our probes are set, so KubeRay injects none of its own.
        assert container["readinessProbe"]["exec"]["command"][:3] == [
            "python",
            "-m",
            "modelloader_workers.node_probe",
        ]
    gcs_port = int(head_spec["rayStartParams"].get("port", "6379"))
    services = chart.head_services(cluster)
    service = services[2]
    token = secrets.token_hex(16)
    head = network.add("head")
    workers = [network.add(f"cpu-{i}") for i in range(cpu["replicas"])]
    for name in services:
        network.serve(name, "head")

    network.start(
        head,
        chart.ray_start(head_spec["rayStartParams"], None),
        chart.environment(head_container, network.shared_tmp, token, head.address),
    )
    wait_until(
        lambda: probe(head, head_container, "readinessProbe").returncode == 0,
        READY_SECONDS,
        lambda: f"the head Ready\n{head.log.read_text()}",
    )
    # Where KubeRay's injected probes would ask, nothing answers: the pods run the images'
    # environment, whose plain `ray` starts no dashboard agent.
    connect = f"import socket; socket.create_connection(('127.0.0.1', {KUBERAY_AGENT_PORT}), 2)"
    refused = head.run(["python", "-c", connect])
    assert "ConnectionRefusedError" in refused.stderr, refused

    for worker in workers:
        network.start(
            worker,
            chart.ray_start(cpu["rayStartParams"], f"{service}:{gcs_port}"),
            chart.environment(worker_container, network.shared_tmp, token, worker.address),
        )
    for worker in workers:
        wait_until(
            lambda w=worker: probe(w, worker_container, "readinessProbe").returncode == 0,
            READY_SECONDS,
            lambda w=worker: f"{w.name} Ready\n{w.log.read_text()}",
        )
        assert probe(worker, worker_container, "livenessProbe").returncode == 0

    # Every node registered with its own pod address, over the pod network.
    observed = tmp_path / "observer.log"
    observer = head.popen(["python", "-c", OBSERVER, f"{head.address}:{gcs_port}"], observed)
    try:
        everyone = sorted(p.address for p in (head, *workers))
        wait_until(
            lambda: any(e["alive"] == everyone for e in alive_nodes(observed)),
            60,
            lambda: f"all three nodes alive, each at its pod's address\n{observed.read_text()}",
        )

        # A worker pod cut off: the GCS finds its node dead, by the chart's health checks.
        lost = workers[0]
        cut = time.monotonic()
        lost.cut_off()
        remaining = sorted(p.address for p in (head, workers[1]))
        seen = wait_until(
            lambda: next(
                (e for e in alive_nodes(observed) if e["at"] > cut and e["alive"] == remaining),
                None,
            ),
            90,
            lambda: f"the cut-off node declared dead\n{observed.read_text()}",
        )
        print(f"node cut off -> declared dead: {seen['at'] - cut:.1f} s")
    finally:
        pods.stop(observer)

    # The other worker's raylet dies: its probes fail, with the reason, and its container
    # (`ray start --block`) exits for the kubelet to restart; the head stays Ready.
    other = workers[1]
    os.kill(other.program_pid("raylet"), signal.SIGKILL)
    failed = wait_until(
        lambda: (r := probe(other, worker_container, "livenessProbe")).returncode == 1 and r,
        10,
        "the worker's liveness probe failing",
    )
    assert "raylet" in failed.stderr, failed
    assert other.process is not None
    wait_until(lambda: other.process.poll() is not None, 30, "the worker's container exiting")
    assert probe(head, head_container, "readinessProbe").returncode == 0

    # The head's GCS dies: the head is no longer Ready.
    os.kill(head.program_pid("gcs_server"), signal.SIGKILL)
    wait_until(
        lambda: probe(head, head_container, "readinessProbe").returncode == 1,
        10,
        "the head unready without its GCS",
    )
