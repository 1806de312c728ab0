"""The chart's RBAC rules against the real operator's traffic: `modelloader operator` (real
kopf, real Ray) runs a LoadedModel's life (create, Ready, update, delete) against the API
emulator, which records every request. Each request must be allowed by the rules the chart
renders for the operator's ServiceAccount, and each rule must be used: by a recorded request,
or by an API call the operator's contract names (CONTRACT, with the reason it is not seen
here). Run cluster-wide and for specific namespaces (Roles there)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from modelloader.control_loop import LoopSettings
from modelloader.operator_main import OperatorConfig
from modelloader.placement import PlacementConfig
from modelloader.sources import SourcePolicy

from tests.conftest import EXAMPLE
from tests.integration.conftest import CPU_RESOURCE, NPU_RESOURCE, Nodes
from tests.support.cluster import EmulatorThread, OperatorThread, wait_until

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelloader"
RELEASE, RELEASE_NAMESPACE = "ml", "modelloader"

# API calls the operator makes under its contract that this scenario cannot show.
CONTRACT: dict[tuple[str, str, str], str] = {
    ("modelloader.dev", "originpolicies", "list"): "quotas: kopf lists OriginPolicies",
    ("modelloader.dev", "originpolicies", "watch"): "quotas: kopf watches OriginPolicies",
    ("modelloader.dev", "originpolicies/status", "patch"): "usage is reported in status",
    ("", "secrets", "list"): "per-origin bearer tokens (label modelloader.dev/origin)",
    ("", "secrets", "watch"): "per-origin bearer tokens, followed for rotation",
}
# Paths every authenticated client may GET (system:discovery): no rule needed.
DISCOVERY_PREFIXES = ("/api", "/apis", "/version", "/openapi")


@dataclass(frozen=True)
class Call:
    verb: str
    group: str
    resource: str  # "plural" or "plural/subresource"
    namespace: str | None  # None: cluster-scoped or across all namespaces

    def __str__(self) -> str:
        where = f" in {self.namespace}" if self.namespace else " (cluster)"
        return f"{self.verb} {self.group or 'core'}/{self.resource}{where}"


def classify(method: str, path: str, query: dict[str, str]) -> Call | None:
    """An API request as RBAC sees it; None for discovery."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        rest = []
    if not rest:
        assert method == "GET" and path.startswith(DISCOVERY_PREFIXES), (method, path)
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    plural, name, sub = (
        rest[0],
        rest[1] if len(rest) > 1 else None,
        rest[2] if len(rest) > 2 else None,
    )
    watching = query.get("watch") in ("true", "1")
    verb = {
        "GET": "watch" if watching else ("get" if name else "list"),
        "POST": "create",
        "PATCH": "patch",
        "PUT": "update",
        "DELETE": "delete" if name else "deletecollection",
    }[method]
    return Call(verb, group, f"{plural}/{sub}" if sub else plural, namespace)


def rule_grants(rule: dict[str, Any], call: Call) -> bool:
    return (
        call.group in rule.get("apiGroups", [])
        and call.resource in rule.get("resources", [])
        and call.verb in rule.get("verbs", [])
        and not rule.get("resourceNames")
    )


@dataclass(frozen=True)
class Grants:
    cluster: list[dict[str, Any]]  # ClusterRole rules bound cluster-wide
    roles: dict[str, list[dict[str, Any]]]  # namespace -> Role rules bound there

    def allow(self, call: Call) -> bool:
        if any(rule_grants(r, call) for r in self.cluster):
            return True
        return call.namespace is not None and any(
            rule_grants(r, call) for r in self.roles.get(call.namespace, [])
        )

    def triples(self) -> set[tuple[str, str, str]]:
        rules = self.cluster + [r for rs in self.roles.values() for r in rs]
        return {
            (g, res, v)
            for r in rules
            for g in r["apiGroups"]
            for res in r["resources"]
            for v in r["verbs"]
        }


def chart_grants(values: dict[str, Any]) -> Grants:
    """The rules bound to the operator's ServiceAccount in the rendered chart."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=RELEASE_NAMESPACE)
    objects = [
        d
        for path, text in rendered.items()
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d
    ]
    account = f"{RELEASE}-modelloader-operator"
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objects}
    cluster: list[dict[str, Any]] = []
    namespaced: dict[str, list[dict[str, Any]]] = {}
    for binding in objects:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if not any(s["name"] == account for s in binding["subjects"]):
            continue
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace")
        role = roles[(ref["kind"], namespace if ref["kind"] == "Role" else None, ref["name"])]
        if binding["kind"] == "ClusterRoleBinding":
            cluster += role["rules"]
        else:
            namespaced.setdefault(namespace, []).extend(role["rules"])
    # Nothing else in the chart may hold API rights (the gateway and Ray pods have none).
    others = {
        s["name"]
        for o in objects
        if o["kind"] in ("ClusterRoleBinding", "RoleBinding")
        for s in o["subjects"]
    }
    assert others == {account}, others
    return Grants(cluster, namespaced)


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[EmulatorThread]:
    emulator = EmulatorThread()
    emulator.start()
    assert emulator.ready.wait(10)
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(emulator.write_kubeconfig(tmp_path / "kubeconfig"))
    yield emulator
    emulator.stop()
    if old is None:
        os.environ.pop("KUBECONFIG", None)
    else:
        os.environ["KUBECONFIG"] = old


def model(threads: int) -> dict[str, Any]:
    return {
        "apiVersion": "modelloader.dev/v1alpha1",
        "kind": "LoadedModel",
        "metadata": {"name": "rbac-digits", "namespace": "default"},
        "spec": {
            # A credentials Secret, though a file needs none: the operator reads it (GET).
            "source": {
                "uri": f"file://{EXAMPLE / 'digits.tflite'}",
                "credentialsSecret": "rbac-store",
            },
            "accelerator": "cpu",
            "threads": threads,
        },
    }


def phase(kube: EmulatorThread, generation: int) -> bool:
    status = (kube.get("rbac-digits") or {}).get("status") or {}
    return status.get("phase") == "Ready" and status.get("observedGeneration") == generation


def operator_calls(kube: EmulatorThread, namespaces: tuple[str, ...], tmp_path: Path) -> list[Call]:
    config = OperatorConfig(
        sources=SourcePolicy(roots=(EXAMPLE,), cache_dir=tmp_path / "cache"),
        state_dir=Path(f"/tmp/mlrbac-{os.getpid()}"),
        loop=LoopSettings(
            placement=PlacementConfig(cpu_resource=CPU_RESOURCE, npu_resource=NPU_RESOURCE),
            interval_seconds=0.5,
            liveness_seconds=0.5,
            scan_seconds=1.0,
        ),
        namespaces=namespaces,
    )
    operator = OperatorThread(config)
    operator.start()
    try:
        assert operator.ready_flag.wait(30), operator.error
        store = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "rbac-store", "namespace": "default"},
            "stringData": {"AWS_ACCESS_KEY_ID": "unused"},
        }
        code, _ = kube.request("POST", "/api/v1/namespaces/default/secrets", store)
        assert code in (200, 201, 409)
        kube.apply(model(threads=1))
        wait_until(lambda: phase(kube, 1), what="Ready")
        kube.apply(model(threads=2))
        wait_until(lambda: phase(kube, 2), what="generation 2 Ready")
        kube.delete("rbac-digits")
        wait_until(lambda: kube.get("rbac-digits") is None, what="deleted")
    finally:
        operator.stop()
    # The test's own requests (urllib) are not the operator's.
    calls = [
        classify(method, path, query)
        for method, path, query, agent in kube.emulator.requests
        if not agent.startswith("Python-urllib")
    ]
    return [c for c in calls if c is not None]


@pytest.mark.parametrize(
    "namespaces", [(), ("default",)], ids=["cluster-wide", "specific-namespaces"]
)
def test_rbac_rules_are_exactly_what_the_operator_uses(
    kube: EmulatorThread, ray_cluster: Nodes, tmp_path: Path, namespaces: tuple[str, ...]
) -> None:
    grants = chart_grants({"operator": {"namespaces": list(namespaces)}})
    calls = operator_calls(kube, namespaces, tmp_path)
    assert calls, "the emulator recorded no operator request"

    denied = sorted({str(c) for c in calls if not grants.allow(c)})
    assert denied == [], f"calls the chart's RBAC would forbid: {denied}"

    used = {(c.group, c.resource, c.verb) for c in calls}
    unused = sorted(grants.triples() - used - set(CONTRACT))
    assert unused == [], f"rules no call needs (drop them, or justify them in CONTRACT): {unused}"
    missing = sorted(set(CONTRACT) - grants.triples())
    assert missing == [], f"contract calls the chart does not allow: {missing}"
    # The operator's core traffic is really there (the test exercises something).
    assert {
        ("modelloader.dev", "loadedmodels", "watch"),
        ("modelloader.dev", "loadedmodels", "patch"),
        ("modelloader.dev", "loadedmodels/status", "patch"),
        ("", "events", "create"),
        ("", "secrets", "get"),  # spec.source.credentialsSecret, read at load
    } <= used, used
