"""The real kopf operator (`modelloader operator`) against the Kubernetes API emulator
(KMock's KubernetesEmulator + the extensions in tests/support/kube_emulator.py) and the
multi-node Ray cluster: placement, deletion with the finalizer, restarts and adoption,
zero-downtime updates, unschedulable models waiting for capacity, a killed worker."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from modelloader.cluster_gateway import ClusterGateway
from modelloader.operator_main import FINALIZER, OperatorConfig
from modelloader.placement import PlacementConfig
from modelloader.ray_workers import RayWorkers
from modelloader_workers.gateway.errors import DataPlaneError

from tests.conftest import EXAMPLE
from tests.integration.conftest import CPU_RESOURCE, NPU_RESOURCE, Nodes
from tests.support.cluster import EmulatorThread, OperatorThread, wait_until

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


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorThread]:
    emulator = EmulatorThread()
    emulator.start()
    assert emulator.ready.wait(10)
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(
        emulator.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")
    )
    yield emulator
    emulator.stop()
    if old is None:
        os.environ.pop("KUBECONFIG", None)
    else:
        os.environ["KUBECONFIG"] = old


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> OperatorConfig:
    return OperatorConfig(
        model_roots=(EXAMPLE,),
        cache_dir=tmp_path_factory.mktemp("cache"),
        state_dir=Path(f"/tmp/mlop-{os.getpid()}"),
        placement=PlacementConfig(cpu_resource=CPU_RESOURCE, npu_resource=NPU_RESOURCE),
        interval_seconds=0.5,
        liveness_seconds=0.5,
        scan_seconds=1.0,
        # These tests follow workers by their names (lm.<ns>.<name>...); warm processes keep
        # names of their own, and are covered in tests/e2e/test_faults.py.
        warm_workers=0,
    )


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
    client = GatewayThread(config.state_dir, "keeper")
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

    second = start_operator(config)
    try:
        wait_until(lambda: not [w for w in worker_names() if ".goner." in w], what="orphan gone")
        time.sleep(2)
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


def test_a_worker_nobody_asked_for_is_removed(
    kube: EmulatorThread, operator: OperatorThread, config: OperatorConfig
) -> None:
    from modelloader.ray_workers import worker_name
    from modelloader.resource import LoadedModel, LoadedModelSpec, Source

    stray = LoadedModel("default", "stray", LoadedModelSpec("default", Source("file://x")))
    workers = RayWorkers(config.state_dir, detached=True)
    asyncio.run(
        workers.start(
            worker_name(stray), stray, EXAMPLE / "digits.tflite", "cpu", {CPU_RESOURCE: 1.0}
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
    late = OperatorConfig(
        **{
            **config.__dict__,
            "placement": PlacementConfig(cpu_resource=CPU_RESOURCE, npu_resource="late-npu"),
        }
    )
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
    """`modelloader gateway`'s core, finding workers through Ray, with a client looping."""

    def __init__(self, socket_dir: Path, model: str = "rolling") -> None:
        super().__init__(daemon=True)
        self.model = model
        self.gateway = ClusterGateway(socket_dir, refresh_seconds=0.2)
        self.ok = 0
        self.errors: list[str] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        workers = RayWorkers(self.gateway._socket_dir)
        plane = self.gateway
        from modelloader_workers.gateway.dataplane import DataPlane

        dataplane = DataPlane(plane.directory, plane.clients)
        while not self.stop_flag.is_set():
            await plane.refresh_once(workers)
            if plane.directory.lookup("default", self.model) is None:
                await asyncio.sleep(0.1)
                continue
            for _ in range(20):
                try:
                    await dataplane.infer("default", self.model, None, {"pixels": PIXELS}, [])
                    self.ok += 1
                except DataPlaneError as error:
                    self.errors.append(error.message)
        plane.clients.close()


def test_spec_update_switches_without_failed_requests(
    kube: EmulatorThread, operator: OperatorThread, config: OperatorConfig
) -> None:
    kube.apply(manifest("rolling", threads=1))
    first = wait_until(lambda: ready(kube, "rolling"), what="Ready")
    client = GatewayThread(config.state_dir)
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    import dataclasses
    import json
    import urllib.request

    from modelloader.ray_workers import read_access
    from modelloader_workers.gateway.access import token_digest

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
        # Tokens reach the gateways through Ray, as digests.
        table = wait_until(lambda: asyncio.run(read_access()), 30, "the access table")
        assert table.token_digests == {token_digest("a-token-for-default-0123456789"): "default"}
        assert table.anonymous_origin is None

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
