"""A tenant's day on the chart, run as a cluster: every pod the chart renders (the Ray head,
two CPU workers, the operator, the gateway) in a network namespace of its own
(`tests/support/pods.py`), started as the kubelet would from what the real Helm engine renders
(`tests/support/chart_pods.py`): the operator and gateway through the images' entry point,
which joins Ray as a node of its own. The API server is the emulator the operator tests use,
behind TLS at `kubernetes.default.svc` with a service-account token mounted in the operator's
pod; the example's model store `models.example.com` is an HTTPS server in a pod of its own,
its CA given to the Ray pods as a cluster's CA bundle would be.

The tenant then does what `examples/02-kubernetes/README.md` says: `kubectl apply` (the real
binary) of the folder, waits for Ready, infers through the gateway with `tritonclient` and the
origin's token. Then the faults: the operator's container restarted under load (no request
fails), the gateway's restarted (it serves again from the published state), and a Ray worker
pod cut off (the model comes back on the other worker, within the time printed), then deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
import tritonclient.http as triton
import yaml
from modelloader_workers.litert_runner import LiteRTRunner

from tests.support import chart_pods as chart
from tests.support import pods, tls
from tests.support.cluster import EmulatorThread, wait_until
from tests.support.image_env import image_bin
from tests.support.kube_tools import tool

EXAMPLE = chart.REPO / "examples" / "02-kubernetes"
DIGITS = chart.REPO / "examples" / "01-digits"
VALUES = {
    # The example's store is in the cluster, at a private address: the admin allows it.
    "operator": {"allowSourceHosts": ["models.example.com"]},
    # The emulator calls no admission webhooks; the reconcile loop checks the same rules.
    "webhook": {"enabled": False},
}
READY_SECONDS = 90
ADOPTED = re.compile(r"adopted \d+ running workers")  # the operator's first act on start
PIXELS = np.array(
    [s["pixels"] for s in json.loads((DIGITS / "samples.json").read_text())["samples"]],
    dtype=np.float32,
)

MODEL_STORE = """
import functools, http.server, ssl, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
server = http.server.ThreadingHTTPServer(("0.0.0.0", 443), handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[2], sys.argv[3])
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


@pytest.fixture
def kube() -> Iterator[EmulatorThread]:
    emulator = EmulatorThread(namespaces=("default", chart.NAMESPACE))
    emulator.start()
    assert emulator.ready.wait(10)
    yield emulator
    emulator.stop()


def example_token() -> str:
    for doc in yaml.safe_load_all((EXAMPLE / "token-secret.yaml").read_text()):
        if doc and doc.get("kind") == "Secret":
            return str(doc["stringData"]["token"])
    raise AssertionError("no token Secret in the example")


@dataclass
class Served:
    answered: int = 0
    failures: list[str] = field(default_factory=list)


@contextlib.contextmanager
def load(infer: Callable[[], Any], expected: Any) -> Iterator[Served]:
    """A client asking all the while, every 50 ms; what it saw."""
    served, stop = Served(), threading.Event()

    def ask() -> None:
        while not stop.is_set():
            try:
                np.testing.assert_array_equal(infer(), expected)
                served.answered += 1
            except Exception as error:
                served.failures.append(repr(error))
            stop.wait(0.05)

    client = threading.Thread(target=ask, daemon=True)
    client.start()
    try:
        yield served
    finally:
        stop.set()
        client.join(30)


def phase(kube: EmulatorThread, name: str) -> tuple[str | None, dict[str, Any]]:
    status = (kube.get(name, "team-a") or {}).get("status") or {}
    return status.get("phase"), status


@pytest.mark.timeout(900)
def test_a_tenant_applies_the_example_infers_and_survives_a_lost_node(
    network: pods.PodNetwork, kube: EmulatorThread, tmp_path: Path
) -> None:
    docs = chart.render(VALUES)
    cluster = chart.one(docs, "RayCluster")
    head_spec = cluster["spec"]["headGroupSpec"]
    (cpu,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "cpu"]
    ray_token = secrets.token_hex(16)
    authority = tls.Authority(tmp_path / "ca")
    api_cert = authority.issue("api", ["kubernetes.default.svc", network.host_address])
    store_cert = authority.issue("store", ["models.example.com"])
    api_port = urlparse(kube.url).port
    assert api_port is not None

    head = network.add("head")
    workers = [network.add(f"cpu-{i}") for i in range(cpu["replicas"])]
    store = network.add("models")
    operator = network.add("operator")
    gateway = network.add("gateway")
    services = chart.head_services(cluster)
    for service in services:
        network.serve(service, "head")
    network.serve("models.example.com", "models")
    gcs = f"{services[2]}:{head_spec['rayStartParams'].get('port', '6379')}"

    def ray_pod(pod: pods.Pod, spec: dict[str, Any], address: str | None) -> None:
        pod_spec = spec["template"]["spec"]
        container = pod_spec["containers"][0]
        env = chart.environment(container, network.shared_tmp, ray_token, pod.address)
        env["SSL_CERT_FILE"] = str(authority.cert_path)  # the cluster's CA bundle
        mounts = chart.volumes(pod_spec, container, docs, pod.own_tmp.parent)
        network.start(pod, chart.ray_start(spec["rayStartParams"], address), env, mounts)
        wait_until(
            lambda: chart.probe(pod, container, "readinessProbe"),
            READY_SECONDS,
            lambda: f"{pod.name} Ready\n{pod.log.read_text()[-3000:]}",
        )

    def deployment(pod: pods.Pod, name: str) -> dict[str, Any]:
        pod_spec = chart.one(docs, "Deployment", name)["spec"]["template"]["spec"]
        container = pod_spec["containers"][0]
        env = chart.environment(container, network.shared_tmp, ray_token, pod.address)
        env |= {"KUBERNETES_SERVICE_HOST": network.host_address, "KUBERNETES_SERVICE_PORT": "443"}
        account = {
            "token": b"a-service-account-token",
            "ca.crt": authority.cert_path.read_bytes(),
            "namespace": chart.NAMESPACE.encode(),
        }
        mounts = chart.volumes(pod_spec, container, docs, pod.own_tmp.parent, account)
        network.start(pod, chart.entrypoint(container), env, mounts)
        return container

    with tls.tls_front((network.host_address, 443), ("127.0.0.1", api_port), *api_cert):
        ray_pod(head, head_spec, None)
        for worker in workers:
            ray_pod(worker, cpu, gcs)
        store_dir = tmp_path / "store"
        store_dir.mkdir()
        (store_dir / "digits.tflite").write_bytes((DIGITS / "digits.tflite").read_bytes())
        network.start(
            store,
            f"python -c '{MODEL_STORE}' {store_dir} {store_cert[0]} {store_cert[1]}",
            {"PATH": f"{image_bin()}:{os.environ['PATH']}"},
        )

        # Up when the kubelet would have it so: the rendered probes pass (the operator has no
        # readiness probe, so its liveness probe is what says it is up).
        operator_container = deployment(operator, "-operator")
        wait_until(
            lambda: chart.probe(operator, operator_container, "livenessProbe"),
            120,
            lambda: f"the operator's liveness port\n{operator.log.read_text()[-3000:]}",
        )
        gateway_container = deployment(gateway, "-gateway")
        wait_until(
            lambda: chart.probe(gateway, gateway_container, "readinessProbe"),
            120,
            lambda: f"the gateway Ready\n{gateway.log.read_text()[-3000:]}",
        )

        # The tenant's part, as the example's README has it.
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        kubectl = [str(tool("kubectl")), "--kubeconfig", str(kubeconfig)]
        # The emulator serves no OpenAPI document for kubectl to validate against.
        applied = subprocess.run(
            [*kubectl, "apply", "--validate=false", "-f", str(EXAMPLE)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert applied.returncode == 0, applied.stderr
        started = time.monotonic()
        wait_until(
            lambda: phase(kube, "digits")[0] == "Ready",
            180,
            lambda: f"digits Ready\n{operator.log.read_text()[-3000:]}",
        )
        print(f"apply -> Ready: {time.monotonic() - started:.1f} s")
        listed = subprocess.run(
            [*kubectl, "get", "lm", "-n", "team-a"], capture_output=True, text=True, check=True
        ).stdout
        rows = [line.split() for line in listed.splitlines()]
        assert any(row[:1] == ["digits"] and "Ready" in row for row in rows), listed

        # The gateway Service's http port leads to this container port of the pod.
        ports = gateway_container["ports"]
        (http_port,) = [p["containerPort"] for p in ports if p["name"] == "http"]
        expected = LiteRTRunner(str(DIGITS / "digits.tflite")).run({"pixels": PIXELS})
        headers = {"Authorization": f"Bearer {example_token()}"}

        def infer() -> np.ndarray[Any, Any]:
            client = triton.InferenceServerClient(f"{gateway.address}:{http_port}")
            try:
                tensor = triton.InferInput("pixels", list(PIXELS.shape), "FP32")
                tensor.set_data_from_numpy(PIXELS, binary_data=True)
                got = client.infer("digits", [tensor], headers=headers)
                return np.asarray(got.as_numpy("probabilities"))
            finally:
                client.close()

        np.testing.assert_array_equal(infer(), expected["probabilities"])

        # The operator pod's container killed and restarted: serving never stops, and the
        # new operator adopts the running worker rather than starting another.
        _, status = phase(kube, "digits")
        pid = status["placement"]["pid"]
        before = operator.log.stat().st_size
        with load(infer, expected["probabilities"]) as served:
            network.restart(operator)
            wait_until(
                lambda: ADOPTED.search(operator.log.read_text()[before:]),
                120,
                lambda: f"the restarted operator adopting\n{operator.log.read_text()[-3000:]}",
            )
            time.sleep(3)  # its first passes, under load
        assert served.failures == [] and served.answered > 0, served.failures[:3]
        print(f"operator restarted under load: {served.answered} answered, none failed")
        assert phase(kube, "digits")[1]["placement"]["pid"] == pid

        # The gateway pod's container restarted: it serves again from the published state.
        network.restart(gateway)
        wait_until(
            lambda: chart.probe(gateway, gateway_container, "readinessProbe"),
            120,
            "the restarted gateway Ready",
        )
        assert chart.probe(operator, operator_container, "livenessProbe")
        np.testing.assert_array_equal(infer(), expected["probabilities"])

        # A Ray worker pod cut off: the model is placed on the other one and serves again.
        _, status = phase(kube, "digits")
        print(json.dumps(status, indent=1))
        # The node is the pod's hostname; pids repeat across pods' namespaces.
        (lost,) = [w for w in workers if w.name == status["placement"]["node"]]
        (other,) = [w for w in workers if w is not lost]
        cut = time.monotonic()
        lost.cut_off()

        def serving_again() -> bool:
            now, status = phase(kube, "digits")
            if now != "Ready" or status["placement"]["node"] != other.name:
                return False
            try:
                np.testing.assert_array_equal(infer(), expected["probabilities"])
            except Exception:
                return False
            return True

        wait_until(serving_again, 180, f"digits serving from {other.name}")
        print(f"worker pod cut off -> digits answering again: {time.monotonic() - cut:.1f} s")
        # Then the cut-off pod is deleted, as Kubernetes does with a node gone: nothing changes.
        network.remove(lost)
        np.testing.assert_array_equal(infer(), expected["probabilities"])
        assert phase(kube, "digits")[1]["placement"]["node"] == other.name
