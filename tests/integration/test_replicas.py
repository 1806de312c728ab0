"""Replicas on a real multi-node Ray cluster, through the real kopf operator against the API
emulator: spread over the nodes, balanced, a replica SIGKILLed under load from several clients
without a failed request, `kubectl scale` (the real binary), and an origin's quota capping them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import ray
from modelloader.operator_main import OperatorConfig
from modelloader.placement import PlacementConfig
from modelloader_gateway import route_board
from modelloader_gateway.errors import DataPlaneError
from modelloader_gateway.routes import RouteTable
from modelloader_gateway.server import Gateway, GatewayConfig

from tests.integration.conftest import NPU_RESOURCE, Nodes
from tests.integration.test_operator import manifest, start_operator, status
from tests.support.calls import infer
from tests.support.cluster import EmulatorThread, OperatorThread, wait_until
from tests.support.kube_tools import tool

PIXELS = np.zeros((1, 64), dtype=np.float32)


@pytest.fixture(scope="module")
def spreading(
    config: OperatorConfig, kube: EmulatorThread, ray_cluster: Nodes
) -> Iterator[OperatorThread]:
    """An operator whose CPU models may run on any node with CPUs (no CPU-node resource), so
    that replicas can spread over all three."""
    placement = PlacementConfig(npu_resource=NPU_RESOURCE)
    running = start_operator(
        dataclasses.replace(config, loop=dataclasses.replace(config.loop, placement=placement))
    )
    yield running
    running.stop()


class Clients(threading.Thread):
    """A gateway following the published routes, and `count` clients sending requests to one
    model through its data plane without pause; every answer is recorded."""

    def __init__(self, model: str, count: int = 4) -> None:
        super().__init__(daemon=True)
        self.model, self.count = model, count
        self.ok = 0
        self.errors: list[str] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        gateway = Gateway(GatewayConfig(port=0))
        stop = asyncio.Event()

        def publish(table: RouteTable) -> None:
            gateway.publish(table)

        following = asyncio.ensure_future(route_board.follow(publish, stop))

        async def client() -> None:
            while not self.stop_flag.is_set():
                route = gateway.routes.lookup("default", self.model)
                if route is None or not route.ready:
                    await asyncio.sleep(0.05)
                    continue
                try:
                    await infer(gateway.dataplane, "default", self.model, {"pixels": PIXELS})
                    self.ok += 1
                except DataPlaneError as error:
                    self.errors.append(error.message)

        await asyncio.gather(*(client() for _ in range(self.count)))
        stop.set()
        await following
        gateway.clients.close()

    def __enter__(self) -> Clients:
        self.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop_flag.set()
        self.join(15)


def kubectl(kube: EmulatorThread, *args: str) -> str:
    done = subprocess.run(
        [str(tool("kubectl")), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": os.environ["KUBECONFIG"]},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_replicas_spread_balance_survive_a_kill_and_follow_kubectl_scale(
    kube: EmulatorThread, spreading: OperatorThread, ray_cluster: Nodes
) -> None:
    kube.apply(manifest("spread", replicas=3))
    try:
        _spread_balance_kill_and_scale(kube)
    finally:
        kube.delete("spread")
        wait_until(lambda: kube.get("spread") is None, what="deleted")


def _spread_balance_kill_and_scale(kube: EmulatorThread) -> None:
    ready = wait_until(
        lambda: (s := status(kube, "spread")).get("readyReplicas") == 3 and s,
        timeout=120,
        what="3 replicas ready",
    )
    nodes = {p["nodeId"] for p in ready["replicaPlacements"]}
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 3 and nodes <= alive, ready  # one replica per node
    assert ready["ready"] == "3/3" and ready["phase"] == "Ready"
    listed = kubectl(kube, "get", "lm", "spread", "-n", "default")
    assert "3/3" in listed, listed

    with Clients("spread", count=4) as clients:
        wait_until(lambda: clients.ok > 60, what="traffic on every replica")
        victim = ready["replicaPlacements"][1]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: (
                (s := status(kube, "spread")).get("readyReplicas") == 3
                and victim not in {p["pid"] for p in s["replicaPlacements"]}
            ),
            timeout=60,
            what="the killed replica replaced",
        )
        served = clients.ok
        wait_until(lambda: clients.ok > served + 40, what="traffic after the replacement")
    assert clients.errors == [], clients.errors[:5]
    print(f"FIGURES replica-kill requests={clients.ok} errors=0")

    # kubectl scale (the scale subresource) changes the count; the operator follows.
    kubectl(kube, "scale", "lm/spread", "--replicas=1", "-n", "default")
    assert (kube.get("spread") or {})["spec"]["replicas"] == 1
    one = wait_until(
        lambda: (
            (s := status(kube, "spread")).get("desiredReplicas") == 1
            and s.get("replicas") == 1
            and s
        ),
        timeout=60,
        what="scaled to 1",
    )
    assert one["ready"] == "1/1"


def test_an_origins_quota_caps_its_replicas_with_quota_exceeded(
    kube: EmulatorThread, spreading: OperatorThread
) -> None:
    path = "/apis/modelloader.dev/v1alpha1/originpolicies"
    policy = {
        "apiVersion": "modelloader.dev/v1alpha1",
        "kind": "OriginPolicy",
        "metadata": {"name": "default"},
        "spec": {"quota": {"maxWorkers": 2}},
    }
    code, body = kube.request("POST", path, policy)
    assert code in (200, 201), body
    try:
        kube.apply(manifest("capped", replicas=4))
        capped = wait_until(
            lambda: (
                (s := status(kube, "capped")).get("readyReplicas") == 2
                and next(
                    (c for c in s.get("conditions", []) if c["type"] == "QuotaExceeded"), {}
                ).get("status")
                == "True"
                and s
            ),
            timeout=90,
            what="2 of 4 replicas and QuotaExceeded",
        )
        condition = next(c for c in capped["conditions"] if c["type"] == "QuotaExceeded")
        assert condition["reason"] == "maxWorkers"
        assert "runs 2 of 4 replicas" in condition["message"]
        assert capped["phase"] == "Ready" and capped["ready"] == "2/4"
    finally:
        kube.delete("capped")
        wait_until(lambda: kube.get("capped") is None, what="deleted")
        kube.request("DELETE", f"{path}/default")
