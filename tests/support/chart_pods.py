"""The chart's pods as a kubelet would run them, from what the real Helm engine renders: each
container's environment (a Secret's value given by the test, a pod's own address), its volumes
as folders (ConfigMaps and Secrets written out, emptyDirs empty), its service account token, and
the command line: for Ray pods the `ray start` line KubeRay builds from `rayStartParams`, for
the operator and gateway the images' entry point (`images/entrypoint.sh`) with the container's
arguments; every pod runs the images' Python environment, installed by the Dockerfiles' own
steps (`tests/support/image_env.py`).

KubeRay's conventions (docs.ray.io, "RayCluster configuration", rayStartParams): each
`key: value` becomes `--key=value` on `ray start`, the head gets `--head`, workers
`--address=<head Service FQDN>:<GCS port>` (the head Service being `<RayCluster>-head-svc`),
values pasted verbatim into a shell command line, and `--block` keeps the container in the
foreground.
"""

from __future__ import annotations

import base64
import os
import shlex
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

from tests.support.image_env import image_bin

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelloader"
ENTRYPOINT = REPO / "images" / "entrypoint.sh"
NAMESPACE = "modelloader"
RELEASE = "ml"
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def render(values: Mapping[str, Any], chart: helm.Chart | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders for `values` (an install of release `ml`)."""
    if chart is None:
        with helm.Chart.load(CHART) as loaded:
            return render(values, loaded)
    manifests = chart.render(dict(values), name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if not path.endswith("NOTES.txt"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def one(objects: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    """The one object of `kind` whose name ends with `suffix`."""
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{kind} *{suffix}: {[o['metadata']['name'] for o in found]}"
    return found[0]


def head_services(cluster: dict[str, Any]) -> list[str]:
    """The head Service's names as the cluster's DNS answers them."""
    short = f"{cluster['metadata']['name']}-head-svc"
    return [short, f"{short}.{NAMESPACE}.svc", f"{short}.{NAMESPACE}.svc.cluster.local"]


def ray_start(params: Mapping[str, str], head_address: str | None) -> str:
    """`ray start` as KubeRay builds it from rayStartParams."""
    flags = [f"--{key}={value}" for key, value in params.items()]
    where = ["--head"] if head_address is None else [f"--address={head_address}"]
    return " ".join(["ray", "start", *where, *flags, "--block"])


def entrypoint(container: Mapping[str, Any]) -> str:
    """The operator's and gateway's images run `images/entrypoint.sh` with the args."""
    assert not container.get("command"), "the chart keeps the image's entry point"
    return " ".join(shlex.quote(a) for a in ["sh", str(ENTRYPOINT), *container["args"]])


def environment(
    container: Mapping[str, Any], temp: Path, secret_value: str, pod_ip: str
) -> dict[str, str]:
    """The container's rendered environment: every Secret reference is the test's value (the
    chart's only one is the Ray token), `status.podIP` the pod's address. HOME and Ray's
    temporary folder are the pod's own (its /tmp emptyDir)."""
    env = {"PATH": f"{image_bin()}:{os.environ['PATH']}", "LANG": "C.UTF-8"}
    for entry in container.get("env", []):
        source = entry.get("valueFrom", {})
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        elif "secretKeyRef" in source:
            env[entry["name"]] = secret_value
        elif source.get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[entry["name"]] = pod_ip
    env["HOME"] = env["RAY_TMPDIR"] = str(temp)
    return env


def volumes(
    pod_spec: Mapping[str, Any],
    container: Mapping[str, Any],
    docs: list[dict[str, Any]],
    root: Path,
    service_account: Mapping[str, bytes] | None = None,
) -> dict[str, Path]:
    """Mount path -> a folder holding the volume, for every mount but /tmp and /dev/shm (the
    pod's own temporary folder, and the host's shared memory). ConfigMaps and Secrets are
    written out as the kubelet projects them; with `service_account`, its files appear where
    Kubernetes mounts them unless the pod opts out."""
    by_name = {v["name"]: v for v in pod_spec.get("volumes", [])}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"] in ("/tmp", "/dev/shm"):
            continue
        volume = by_name[mount["name"]]
        folder = root / "volumes" / mount["name"]
        folder.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            data = one(docs, "ConfigMap", volume["configMap"]["name"]).get("data", {})
            for key, value in data.items():
                (folder / key).write_text(value)
        elif "secret" in volume:
            secret = one(docs, "Secret", volume["secret"]["secretName"])
            for key, value in (secret.get("data") or {}).items():
                (folder / key).write_bytes(base64.b64decode(value))
            for key, value in (secret.get("stringData") or {}).items():
                (folder / key).write_text(value)
        mounts[mount["mountPath"]] = folder
    if service_account is not None and pod_spec.get("automountServiceAccountToken", True):
        folder = root / "volumes" / "serviceaccount"
        folder.mkdir(parents=True, exist_ok=True)
        for key, value in service_account.items():
            (folder / key).write_bytes(value)
        mounts[SERVICE_ACCOUNT] = folder
    return mounts


def probe(pod: Any, container: Mapping[str, Any], kind: str) -> bool:
    """The container's `kind` probe (readinessProbe, livenessProbe) once, as the kubelet runs
    it: exec inside the pod, httpGet and tcpSocket from the node to the pod's address (ports by
    number or by the container's port names), within timeoutSeconds. No probe: success."""
    spec = container.get(kind)
    if not spec:
        return True
    timeout = float(spec.get("timeoutSeconds", 1))
    if "exec" in spec:
        return bool(pod.run(spec["exec"]["command"], timeout=timeout).returncode == 0)
    action = spec.get("httpGet") or spec.get("tcpSocket")
    assert action is not None, f"an unknown probe: {spec}"
    port = action["port"]
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    try:
        if "tcpSocket" in spec:
            socket.create_connection((pod.address, port), timeout=timeout).close()
            return True
        url = f"http://{pod.address}:{port}{action.get('path', '/')}"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(200 <= response.status < 400)
    except (OSError, urllib.error.URLError):
        return False
