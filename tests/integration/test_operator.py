"""The real kopf operator (`modelloader operator`) against the Kubernetes API emulator
(KMock's KubernetesEmulator + the extensions in tests/support/kube_emulator.py) and the
multi-node Ray cluster: placement, deletion with the finalizer, restarts and adoption,
zero-downtime updates, unschedulable models waiting for capacity, a killed worker."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import ray
from modelloader.operator_main import FINALIZER, OperatorConfig
from modelloader.placement import PlacementConfig
from modelloader.ray_workers import RayWorkers
from modelloader_gateway import route_board
from modelloader_gateway.errors import DataPlaneError
from modelloader_gateway.routes import RouteTable
from modelloader_gateway.server import Gateway, GatewayConfig

from tests.conftest import EXAMPLE
from tests.integration.conftest import CPU_RESOURCE, Nodes
from tests.support.calls import from_file, identity, infer
from tests.support.cluster import EmulatorThread, OperatorThread, wait_until
from tests.support.ports import free_port

PIXELS = np.zeros((1, 64), dtype=np.float32)


def manifest(name: str, accelerator: str = "cpu", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "modelloader.dev/v1alpha1",
        "kind": "LoadedModel",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "source": {"uri": f"file://{EXAMPLE / 'digits.tflite'}"},
            "accelerator": accelerator,
            **spec,
        },
    }


def start_operator(config: OperatorConfig) -> OperatorThread:
    operator = OperatorThread(config)
    operator.start()
    assert operator.ready_flag.wait(30), operator.error
    return operator


@pytest.fixture
def operator(
    kube: EmulatorThread, ray_cluster: Nodes, config: OperatorConfig
) -> Iterator[OperatorThread]:
    running = start_operator(config)
    yield running
    running.stop()


def status(kube: EmulatorThread, name: str) -> dict[str, Any]:
    body = kube.get(name) or {}
    return dict(body.get("status") or {})


def ready(kube: EmulatorThread, name: str) -> dict[str, Any] | None:
    current = status(kube, name)
    return current if current.get("phase") == "Ready" else None


def worker_names() -> list[str]:
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("lm.")
    )


def test_create_places_each_accelerator_and_delete_releases_it(
    kube: EmulatorThread, operator: OperatorThread, ray_cluster: Nodes
) -> None:
    for name, accelerator in (("on-cpu", "cpu"), ("on-gpu", "gpu"), ("on-npu", "npu")):
        kube.apply(manifest(name, accelerator))
    expected_nodes = {
        "on-cpu": ray_cluster.head,
        "on-gpu": ray_cluster.gpu,
        "on-npu": ray_cluster.npu,
    }
    for name, node in expected_nodes.items():
        current = wait_until(lambda n=name: ready(kube, n), what=f"{name} Ready")
        assert current["placement"]["nodeId"] == node, name
        assert current["observedGeneration"] == 1
        assert {c["type"]: c["status"] for c in current["conditions"]}["Ready"] == "True"
        assert FINALIZER in (kube.get(name) or {})["metadata"]["finalizers"]
    code, events = kube.request("GET", "/api/v1/namespaces/default/events")
    assert code == 200
    reasons = {(e["involvedObject"]["name"], e["reason"]) for e in events["items"]}
    assert ("on-cpu", "Ready") in reasons, reasons
    # No GPU runtime here: the partitioned GPU model says it runs on the CPU, and why.
    gpu = status(kube, "on-gpu")
    assert gpu["placement"]["accelerator"] == "cpu" and "Vulkan" in gpu["message"]

    for name in expected_nodes:
        kube.delete(name)
    for name in expected_nodes:
        wait_until(lambda n=name: kube.get(n) is None, what=f"{name} deleted")
    wait_until(lambda: not [w for w in worker_names() if ".on-" in w], what="workers gone")


def test_restarted_operator_adopts_workers_and_removes_orphans(
    kube: EmulatorThread, ray_cluster: Nodes, config: OperatorConfig
) -> None:
    first = start_operator(config)
    kube.apply(manifest("keeper"))
    kube.apply(manifest("goner"))
    keeper = wait_until(lambda: ready(kube, "keeper"), what="keeper Ready")
    wait_until(lambda: ready(kube, "goner"), what="goner Ready")
    # Traffic throughout: the data plane must not notice the control plane going away.
    client = GatewayThread("keeper")
    client.start()
    wait_until(lambda: client.ok > 20, what="traffic flowing")
    first.stop()

    # While the operator is away: workers keep running; a LoadedModel disappears for good.
    code, body = kube.request(
        "PATCH",
        "/apis/modelloader.dev/v1alpha1/namespaces/default/loadedmodels/goner",
        {"metadata": {"finalizers": []}},
        "application/merge-patch+json",
    )
    assert code == 200, body
    kube.delete("goner")
    assert any(".keeper." in w for w in worker_names())
    # A gateway started now, with no operator running, serves the last published table.
    late = GatewayThread("keeper")
    late.start()
    try:
        wait_until(lambda: late.ok > 20, what="a gateway started while the operator is away")
        assert late.errors == [] and late.tables
    finally:
        late.stop_flag.set()
        late.join(10)

    metrics_port = free_port()
    second = start_operator(dataclasses.replace(config, metrics_port=metrics_port))
    try:
        wait_until(lambda: not [w for w in worker_names() if ".goner." in w], what="orphan gone")
        # Several passes of the new operator: none starts a second worker for `keeper`.
        passes = reconcile_passes(metrics_port)
        wait_until(lambda: reconcile_passes(metrics_port) >= passes + 3, what="3 more passes")
        keepers = [w for w in worker_names() if ".keeper." in w]
        assert len(keepers) == 1, keepers  # adopted, not duplicated
        assert status(kube, "keeper")["placement"]["pid"] == keeper["placement"]["pid"]
        served = client.ok
        wait_until(lambda: client.ok > served + 20, what="traffic after the restart")
        assert client.errors == []
        print(f"FIGURES operator-restart requests={client.ok} errors=0")
    finally:
        client.stop_flag.set()
        client.join(10)
        kube.delete("keeper")
        wait_until(lambda: kube.get("keeper") is None, what="keeper deleted")
        second.stop()


def reconcile_passes(port: int) -> float:
    """The operator's reconcile passes so far, from its /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("modelloader_reconcile_duration_seconds_count"):
            return float(line.split()[-1])
    return 0.0


def test_a_worker_nobody_asked_for_is_removed(
    kube: EmulatorThread, operator: OperatorThread, config: OperatorConfig
) -> None:
    from modelloader.resource import LoadedModel, LoadedModelSpec, Source

    stray = LoadedModel("default", "stray", LoadedModelSpec("default", Source("file://x")))
    workers = RayWorkers(config.state_dir, detached=True)
    asyncio.run(
        workers.start(
            identity(stray), stray, from_file(EXAMPLE / "digits.tflite"), "cpu", {CPU_RESOURCE: 1.0}
        )
    )
    assert any(".stray." in w for w in worker_names())
    wait_until(
        lambda: not [w for w in worker_names() if ".stray." in w],
        timeout=30,
        what="stray worker removed",
    )


def test_unschedulable_waits_pending_then_runs_when_a_node_appears(
    kube: EmulatorThread, ray_cluster: Nodes, config: OperatorConfig
) -> None:
    placement = PlacementConfig(cpu_resource=CPU_RESOURCE, npu_resource="late-npu")
    late = dataclasses.replace(config, loop=dataclasses.replace(config.loop, placement=placement))
    operator = start_operator(late)
    try:
        kube.apply(manifest("waiting", "npu"))
        pending = wait_until(
            lambda: status(kube, "waiting").get("phase") == "Pending" and status(kube, "waiting"),
            what="Pending",
        )
        scheduled = next(c for c in pending["conditions"] if c["type"] == "Scheduled")
        assert scheduled["status"] == "False" and "late-npu" in scheduled["message"]
        node = ray_cluster.cluster.add_node(num_cpus=1, resources={"late-npu": 1})
        current = wait_until(lambda: ready(kube, "waiting"), timeout=60, what="Ready")
        assert current["placement"]["nodeId"] == node.node_id
        kube.delete("waiting")
        wait_until(lambda: kube.get("waiting") is None, what="deleted")
    finally:
        operator.stop()


class GatewayThread(threading.Thread):
    """`modelloader gateway`'s core: a gateway routing from the table the operator publishes
    through Ray, and a client sending it requests through the data plane (origin `default`)."""

    def __init__(self, model: str = "rolling") -> None:
        super().__init__(daemon=True)
        self.model = model
        self.ok = 0
        self.errors: list[str] = []
        self.tables: list[RouteTable] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        gateway = Gateway(GatewayConfig(port=0))
        stop = asyncio.Event()

        def publish(table: RouteTable) -> None:
            self.tables.append(table)
            gateway.publish(table)

        following = asyncio.ensure_future(route_board.follow(publish, stop))
        await gateway.start()
        while not self.stop_flag.is_set():
            route = gateway.routes.lookup("default", self.model)
            if route is None or not route.ready:
                await asyncio.sleep(0.1)
                continue
            for _ in range(20):
                try:
                    await infer(gateway.dataplane, "default", self.model, {"pixels": PIXELS})
                    self.ok += 1
                except DataPlaneError as error:
                    self.errors.append(error.message)
        stop.set()
        await following
        await gateway.close()


def test_spec_update_switches_without_failed_requests(
    kube: EmulatorThread, operator: OperatorThread, config: OperatorConfig
) -> None:
    kube.apply(manifest("rolling", threads=1))
    first = wait_until(lambda: ready(kube, "rolling"), what="Ready")
    client = GatewayThread()
    client.start()
    try:
        wait_until(lambda: client.ok > 20, what="traffic flowing")
        kube.apply(manifest("rolling", threads=2))
        updated = wait_until(
            lambda: (
                (s := ready(kube, "rolling"))
                and s["observedGeneration"] == 2
                and s["placement"]["pid"] != first["placement"]["pid"]
                and s
            ),
            what="generation 2 serving",
        )
        wait_until(
            lambda: len([w for w in worker_names() if ".rolling." in w]) == 1,
            what="old worker drained and removed",
        )
        served = client.ok
        wait_until(lambda: client.ok > served + 20, what="traffic on the new worker")
    finally:
        client.stop_flag.set()
        client.join(10)
    assert client.errors == []
    assert updated["observedGeneration"] == 2

    # A worker killed: Degraded (or not Ready) meanwhile, then Ready again on a new process.
    pid = updated["placement"]["pid"]
    os.kill(pid, signal.SIGKILL)

    def degraded() -> bool:
        conditions = {c["type"]: c for c in status(kube, "rolling").get("conditions", [])}
        return conditions.get("Degraded", {}).get("status") == "True"

    wait_until(degraded, timeout=15, what="Degraded while the worker is replaced")
    wait_until(
        lambda: (
            status(kube, "rolling").get("placement", {}).get("pid") != pid
            and ready(kube, "rolling")
        ),
        what="Ready again",
    )
    kube.delete("rolling")
    wait_until(lambda: kube.get("rolling") is None, what="deleted")


def admission_review(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0f0e0d0c",
            "kind": {"group": "modelloader.dev", "version": "v1alpha1", "kind": "LoadedModel"},
            "resource": {
                "group": "modelloader.dev",
                "version": "v1alpha1",
                "resource": "loadedmodels",
            },
            "operation": "CREATE",
            "namespace": obj["metadata"]["namespace"],
            "name": obj["metadata"]["name"],
            "object": obj,
            "userInfo": {"username": "tenant"},
            "dryRun": False,
        },
    }


def test_origin_policy_quota_tokens_and_the_admission_webhook(
    kube: EmulatorThread, ray_cluster: Nodes, config: OperatorConfig
) -> None:
    import json
    import urllib.request

    from modelloader_gateway.access import token_digest

    policies_path = "/apis/modelloader.dev/v1alpha1/originpolicies"
    policy = {
        "apiVersion": "modelloader.dev/v1alpha1",
        "kind": "OriginPolicy",
        "metadata": {"name": "default"},
        "spec": {"quota": {"maxModels": 1}},
    }
    code, body = kube.request("POST", policies_path, policy)
    assert code in (200, 201), body
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "default-token",
            "namespace": "default",
            "labels": {"modelloader.dev/origin": "default"},
        },
        "stringData": {"token": "a-token-for-default-0123456789"},
    }
    code, body = kube.request("POST", "/api/v1/namespaces/default/secrets", secret)
    assert code in (200, 201), body
    port = free_port()
    running = start_operator(dataclasses.replace(config, webhook_port=port))
    try:
        kube.apply(manifest("quota-1"))
        wait_until(lambda: ready(kube, "quota-1"), 90, "the first model within quota")
        kube.apply(manifest("quota-2"))
        waiting = wait_until(
            lambda: next(
                (
                    c
                    for c in status(kube, "quota-2").get("conditions", [])
                    if c["type"] == "QuotaExceeded" and c["status"] == "True"
                ),
                None,
            ),
            30,
            "the second model waiting for quota",
        )
        assert waiting["reason"] == "maxModels" and status(kube, "quota-2")["phase"] == "Pending"
        usage = wait_until(
            lambda: (kube.request("GET", f"{policies_path}/default")[1].get("status") or {}).get(
                "usage"
            ),
            30,
            "usage in the OriginPolicy's status",
        )
        assert usage["models"] == 1
        # Tokens reach the gateways through Ray, as digests, with the routes.
        board = ray.get_actor(route_board.BOARD_NAME, route_board.SYSTEM_NAMESPACE)
        table = wait_until(
            lambda: (t := ray.get(board.get.remote())) and t.access.token_digests and t,
            30,
            "the access table",
        )
        access = table.access
        assert access.token_digests == {token_digest("a-token-for-default-0123456789"): "default"}
        assert access.anonymous_origin is None
        assert {(r.origin, r.name, r.ready) for r in table.routes} == {
            ("default", "quota-1", True),
            ("default", "quota-2", False),
        }

        def review(obj: dict[str, Any]) -> dict[str, Any]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/validate-loadedmodel",
                data=json.dumps(admission_review(obj)).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                answer: dict[str, Any] = json.loads(response.read())["response"]
                return answer

        assert review(manifest("fine"))["allowed"] is True
        claim = manifest("intruder", origin="shop")
        rejected = review(claim)
        assert rejected["allowed"] is False
        assert "may not act for origin 'shop'" in rejected["status"]["message"]
        wrong = manifest("wrong", accelerator="tpu")
        assert "spec.accelerator" in review(wrong)["status"]["message"]
        # Room frees up: the waiting model proceeds.
        kube.delete("quota-1")
        wait_until(lambda: ready(kube, "quota-2"), 90, "the waiting model once room frees up")
    finally:
        for name in ("quota-1", "quota-2"):
            kube.delete(name)
        wait_until(lambda: kube.get("quota-2") is None, 60, "cleanup")
        kube.request("DELETE", f"{policies_path}/default")
        kube.request("DELETE", "/api/v1/namespaces/default/secrets/default-token")
        running.stop()
