"""The Helm chart, rendered by the real Helm engine (helm-python-sdk: Helm's Go SDK) for the
default values and several value sets, every object validated against the Kubernetes OpenAPI
schemas of a recent release (kubernetes-validate, strict: unknown fields fail), the chart's
own CRDs and the upstream schemas of the third-party kinds (tests/unit/schemas/). No object is
skipped: a kind without a schema fails the test."""

from __future__ import annotations

import base64
import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from kubernetes_validate.utils import schema_contents
from modelloader.cli import _parser
from modelloader.placement import PlacementConfig, Scheduled, choose_accelerator

from tests.support import chart_pods
from tests.support.crd_schema import crd_schema, json_schema

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelloader"
KUBE_VERSION = "1.35.0"
RELEASE, NAMESPACE = "ml", "modelloader"

GPU_NPU = {
    "ray": {
        "resources": {"npu": "example.com-npu", "cpuNode": "modelloader-cpu"},
        "kuberay": {
            "workerGroups": {
                "gpu": {"enabled": True, "gpusPerPod": 2},
                "npu": {
                    "enabled": True,
                    "kubernetesResource": "example.com/npu",
                    "nodeSelector": {"example.com/npu.present": "true"},
                    "tolerations": [{"key": "example.com/npu", "operator": "Exists"}],
                },
            }
        },
    }
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "existing-ray": {
        "ray": {
            "mode": "external",
            "external": {
                "address": "ray-head.ray.svc:6379",
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray"}},
                "podSelector": {"matchLabels": {"ray.io/cluster": "shared"}},
            },
            "auth": {"existingSecret": "ray-token"},
        }
    },
    "kuberay-gpu-npu": GPU_NPU,
    "monitoring": {
        "monitoring": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "podMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
            "dashboards": {"enabled": True},
        }
    },
    "ingress": {
        "gateway": {
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "hosts": [
                    {"host": "models.example.com", "paths": [{"path": "/v2", "pathType": "Prefix"}]}
                ],
                "tls": [{"hosts": ["models.example.com"], "secretName": "models-tls"}],
            },
            "grpcIngress": {"enabled": True, "className": "nginx"},
            "grpcRoute": {"enabled": True, "parentRefs": [{"name": "public"}]},
        }
    },
    "namespaced-policies": {
        "operator": {"namespaces": ["team-a", "team-b"]},
        "originPolicies": [
            {
                "name": "team-a",
                "spec": {
                    "namespaces": ["team-a"],
                    "isolation": "perOrigin",
                    "quota": {"maxModels": 5, "maxWorkers": 2, "memory": "4Gi", "gpus": 1},
                },
            }
        ],
        "modelRoots": [
            {
                "name": "shared",
                "mountPath": "/models",
                "volume": {"nfs": {"server": "nfs", "path": "/m"}},
            }
        ],
    },
    "minimal": {
        "webhook": {"enabled": False},
        "networkPolicy": {"enabled": False},
        "modelCache": {"hostPath": "/var/lib/modelloader-cache", "maxSize": 0},
        "ray": {"auth": {"mode": "disabled"}, "resources": {"cpuNode": ""}},
        "gateway": {"replicas": 1},
        "fullnameOverride": "models",
    },
}

SCHEMA_DIR = f"kubernetes-json-schema/v{KUBE_VERSION}-local-strict"
DEFINITIONS = schema_contents(f"{SCHEMA_DIR}/_definitions.json", KUBE_VERSION)
THIRD_PARTY: dict[str, Any] = yaml.safe_load(
    (REPO / "tests/unit/schemas/third_party.yaml").read_text()
)
REGISTRY: referencing.Registry[Any] = (
    referencing.Resource.from_contents(DEFINITIONS) @ referencing.Registry()
)


OWN_KINDS = {
    "OriginPolicy": json_schema(crd_schema("originpolicy.yaml")),
    "LoadedModel": json_schema(crd_schema("loadedmodel.yaml")),
}


def validate(obj: dict[str, Any]) -> None:
    """Against the schema of its kind; raises with the object's name and the failing field."""
    kind, where = obj.get("kind"), f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    try:
        if kind in THIRD_PARTY:
            schema = {"$id": f"https://kubernetes.io/api/{kind.lower()}", **THIRD_PARTY[kind]}
            jsonschema.Draft202012Validator(schema, registry=REGISTRY).validate(obj)
        elif kind in OWN_KINDS:
            jsonschema.Draft7Validator(OWN_KINDS[kind]).validate(obj)
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        pytest.fail(f"{where}: no schema for {obj.get('apiVersion')} {kind}")
    except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as error:
        pytest.fail(f"{where}: {error}")


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    return chart_pods.render(values, chart)


find = chart_pods.one


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod the chart makes: Deployments' templates and the RayCluster's groups."""
    pods: dict[str, dict[str, Any]] = {}
    for obj in objects:
        name = obj["metadata"]["name"]
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            pods[name] = obj["spec"]["template"]["spec"]
        if obj["kind"] == "RayCluster":
            pods[f"{name}/head"] = obj["spec"]["headGroupSpec"]["template"]["spec"]
            for group in obj["spec"].get("workerGroupSpecs", []):
                pods[f"{name}/{group['groupName']}"] = group["template"]["spec"]
    return pods


def operator_args(objects: list[dict[str, Any]]) -> list[str]:
    container = find(objects, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][
        0
    ]
    return list(container["args"])


def flag(args: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return values[-1] if values else None


# Lint, render, validate


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_lint_strict_is_clean(values: dict[str, Any]) -> None:
    report = helm.lint(
        CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_rendered_object_is_valid_for_its_schema(
    chart: helm.Chart, values: dict[str, Any]
) -> None:
    objects = render(chart, values)
    assert len(objects) >= 10
    for obj in objects:
        validate(obj)
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == RELEASE, obj["metadata"]["name"]
        assert labels.get("app.kubernetes.io/managed-by") == "Helm"
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "OriginPolicy") and not obj[
            "kind"
        ].startswith("Validating"):
            assert obj["metadata"].get("namespace"), f"{obj['kind']} without a namespace"


def test_the_chart_crds_are_the_repository_crds_and_valid(chart: helm.Chart) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_chart", REPO / "tools" / "sync_chart.py")
    assert spec is not None and spec.loader is not None
    sync_chart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync_chart)
    assert sync_chart.differences() == [], "run: python tools/sync_chart.py"
    names = {c["filename"] for c in chart.crds}
    assert names == {"modelloader/crds/loadedmodel.yaml", "modelloader/crds/originpolicy.yaml"}
    for crd in chart.crds:
        validate(yaml.safe_load(crd["data"]))


def test_the_values_file_passes_its_schema(chart: helm.Chart) -> None:
    chart.validate_schema(yaml.safe_load((CHART / "values.yaml").read_text()))


# values.schema.json rejects bad values, and says where


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"operator": {"replicas": 2}}, "/operator/replicas"),
        ({"ray": {"mode": "external"}}, "/ray/external/address"),
        ({"ray": {"mode": "remote"}}, "/ray/mode"),
        ({"ray": {"resources": {"npu": "example.com/npu"}}}, "/ray/resources/npu"),
        ({"ray": {"external": {"address": "ray://head:10001"}}}, "/ray/external/address"),
        ({"defaultPolicy": {"quota": {"maxModels": -1}}}, "/defaultPolicy/quota/maxModels"),
        ({"defaultPolicy": {"isolation": "shared"}}, "/defaultPolicy/isolation"),
        ({"originPolicies": [{"name": "Team_A"}]}, "/originPolicies/0/name"),
        ({"containerSecurityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRootFilesystem"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
        ({"gateway": {"port": 0}}, "/gateway/port"),
        ({"webhook": {"failurePolicy": "Maybe"}}, "/webhook/failurePolicy"),
        ({"operatr": {}}, "operatr"),
        ({"gateway": {"image": {"digest": "latest"}}}, "/gateway/image/digest"),
    ],
)
def test_bad_values_are_rejected_with_a_readable_message(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as raised:
        chart.validate_schema(values)
    assert message in str(raised.value), str(raised.value)
    with pytest.raises(helm.HelmValuesError):  # `helm install` and `helm template` refuse too
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_the_policy_values_follow_the_originpolicy_crd(chart: helm.Chart) -> None:
    """values.schema.json describes an OriginPolicy spec: the same fields and enums as the CRD."""
    schema = chart.schema
    assert schema is not None
    values_spec = schema["properties"]["defaultPolicy"]["properties"]
    crd_spec = crd_schema("originpolicy.yaml")["properties"]["spec"]["properties"]
    assert set(values_spec) == set(crd_spec)
    assert set(values_spec["quota"]["properties"]) == set(crd_spec["quota"]["properties"])
    assert values_spec["isolation"]["enum"] == crd_spec["isolation"]["enum"]


# What the objects say


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_pod_is_locked_down(chart: helm.Chart, values: dict[str, Any]) -> None:
    pods = pod_specs(render(chart, values))
    assert len(pods) >= 2
    for name, pod in pods.items():
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, name
        assert security["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in context["capabilities"], name
            assert "resources" in container, name
        writable = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert "/tmp" in writable, f"{name}: Ray and Python need a writable /tmp"


def test_only_the_operator_talks_to_the_kubernetes_api(chart: helm.Chart) -> None:
    objects = render(chart, VALUE_SETS["kuberay-gpu-npu"])
    for name, pod in pod_specs(objects).items():
        if name.endswith("-operator"):
            assert pod["automountServiceAccountToken"] is True
        else:
            assert pod["automountServiceAccountToken"] is False, name
    bound = {
        s["name"]
        for o in objects
        if o["kind"] in ("RoleBinding", "ClusterRoleBinding")
        for s in o["subjects"]
    }
    assert bound == {f"{RELEASE}-modelloader-operator"}


def test_operator_runs_one_standalone_replica(chart: helm.Chart) -> None:
    deployment = find(render(chart, {}), "Deployment", "-operator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two at once


def test_kuberay_groups_offer_what_the_operator_asks_for(chart: helm.Chart) -> None:
    """The operator's placement (the real planner, given the flags the chart passes) lands GPU
    models on the GPU group only, NPU models on the NPU group only, CPU models on the CPU group."""
    objects = render(chart, VALUE_SETS["kuberay-gpu-npu"])
    args = operator_args(objects)
    config = PlacementConfig(
        npu_resource=flag(args, "--npu-resource") or "NPU",
        cpu_resource=flag(args, "--cpu-node-resource"),
    )
    cluster = find(objects, "RayCluster")["spec"]
    offers: dict[str, dict[str, float]] = {}
    head = cluster["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0" and "resources" not in head  # nothing runs on the head
    for group in cluster["workerGroupSpecs"]:
        params = group["rayStartParams"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        # What Ray will advertise: KubeRay turns nvidia.com/gpu into GPU; custom resources
        # come from rayStartParams' shell-quoted JSON.
        offered = {"GPU": float(limits.get("nvidia.com/gpu", 0))}
        if "resources" in params:
            offered.update(json.loads(shlex.split(params["resources"])[0]))
        offers[group["groupName"]] = offered
        if group["groupName"] == "gpu":
            assert params["num-gpus"] == str(limits["nvidia.com/gpu"]) == "2"
            assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
            assert group["template"]["spec"]["nodeSelector"]
        if group["groupName"] == "npu":
            assert limits["example.com/npu"] == 1
            assert group["template"]["spec"]["nodeSelector"] == {"example.com/npu.present": "true"}
    capacity: dict[str, float] = {}
    for offered in offers.values():
        for key, amount in offered.items():
            capacity[key] = capacity.get(key, 0) + amount
    for accelerator, group_name in (("gpu", "gpu"), ("npu", "npu"), ("cpu", "cpu")):
        decision = choose_accelerator(accelerator, capacity, config)  # type: ignore[arg-type]
        assert isinstance(decision, Scheduled), (accelerator, decision)
        fits = {
            g
            for g, offered in offers.items()
            if all(offered.get(k, 0) >= v for k, v in decision.resources.items())
        }
        assert fits == {group_name}, (accelerator, decision.resources, offers)


def test_existing_ray_is_joined_by_address(chart: helm.Chart) -> None:
    objects = render(chart, VALUE_SETS["existing-ray"])
    assert not [o for o in objects if o["kind"] == "RayCluster"]
    for suffix in ("-operator", "-gateway"):
        container = find(objects, "Deployment", suffix)["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_ADDRESS"]["value"] == "ray-head.ray.svc:6379"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ray-token"
    assert not [
        o for o in objects if o["kind"] == "Secret" and "ray-token" in o["metadata"]["name"]
    ]


# Contract flags another change adds to `modelloader operator`/`gateway`; drop each from here
# once the CLI has it, so that a typo in the chart cannot hide behind this list.
PENDING_FLAGS: set[str] = set()  # flags the chart passes before the CLI has them


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_each_ray_pod_has_its_own_model_cache_and_nothing_is_shared(
    chart: helm.Chart, values: dict[str, Any]
) -> None:
    objects = render(chart, values)
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    cache_dir = flag(operator_args(objects), "--cache-dir")
    assert cache_dir is not None and flag(operator_args(objects), "--cache-max-bytes") is not None
    for name, pod in pod_specs(objects).items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        if "/" not in name:  # operator and gateway: they fetch nothing
            assert "model-cache" not in volumes, name
            continue
        cache = volumes["model-cache"]
        assert ("emptyDir" in cache) != ("hostPath" in cache), name
        for volume in volumes.values():
            claim = volume.get("persistentVolumeClaim")
            assert claim is None, f"{name} mounts a shared claim {claim}"
        ray = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in ray["env"]}
        mounts = {m["name"]: m["mountPath"] for m in ray["volumeMounts"]}
        assert env["MODELLOADER_CACHE_DIR"].startswith(mounts["model-cache"]), name
        assert env["MODELLOADER_CACHE_DIR"] == cache_dir


def test_ray_probes_look_where_each_group_keeps_ray(chart: helm.Chart) -> None:
    """Ray's temp-dir: a group's own, else the head's (worker nodes take the head's)."""
    kuberay = {
        "head": {"rayStartParams": {"temp-dir": "/data/ray"}},
        "workerGroups": {"gpu": {"enabled": True, "rayStartParams": {"temp-dir": "/scratch/ray"}}},
    }
    probes = {
        name: pod["containers"][0]["readinessProbe"]["exec"]["command"]
        for name, pod in pod_specs(render(chart, {"ray": {"kuberay": kuberay}})).items()
        if "/" in name
    }
    assert probes[f"{RELEASE}-modelloader-ray/head"][-2:] == ["--port=6379", "--temp-dir=/data/ray"]
    assert probes[f"{RELEASE}-modelloader-ray/cpu"][-1] == "--temp-dir=/data/ray"
    assert probes[f"{RELEASE}-modelloader-ray/gpu"][-1] == "--temp-dir=/scratch/ray"
    default = pod_specs(render(chart, {}))[f"{RELEASE}-modelloader-ray/cpu"]
    command = default["containers"][0]["livenessProbe"]["exec"]["command"]
    assert command == ["python", "-m", "modelloader_workers.node_probe", "raylet"]


def test_the_cli_accepts_the_arguments_the_chart_passes(chart: helm.Chart) -> None:
    objects = render(
        chart,
        {
            **VALUE_SETS["namespaced-policies"],
            "operator": {
                "delegates": ["npu=/usr/lib/libedgetpu.so.1:device=usb"],
                "namespaces": ["a"],
            },
        },
    )
    for suffix in ("-operator", "-gateway"):
        args = find(objects, "Deployment", suffix)["spec"]["template"]["spec"]["containers"][0][
            "args"
        ]
        known = [a for a in args if a.split("=", 1)[0] not in PENDING_FLAGS]
        _parser().parse_args(known)  # exits (SystemExit) on an unknown flag


def test_default_policy_and_origin_policies(chart: helm.Chart) -> None:
    objects = render(chart, VALUE_SETS["namespaced-policies"])
    config = find(objects, "ConfigMap", "-default-policy")
    policy = yaml.safe_load(config["data"]["default-policy.yaml"])
    validate(
        {
            "apiVersion": "modelloader.dev/v1alpha1",
            "kind": "OriginPolicy",
            "metadata": {"name": "default"},
            "spec": policy,
        }
    )
    assert policy == chart.values["defaultPolicy"]
    assert (
        flag(operator_args(objects), "--default-policy")
        == "/etc/modelloader/policy/default-policy.yaml"
    )
    team = find(objects, "OriginPolicy", "team-a")
    assert team["spec"]["isolation"] == "perOrigin" and "namespace" not in team["metadata"]


def test_namespaced_operator_gets_roles_not_cluster_wide_secrets(chart: helm.Chart) -> None:
    objects = render(chart, VALUE_SETS["namespaced-policies"])
    roles = [o for o in objects if o["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    cluster = find(objects, "ClusterRole")
    resources = {r for rule in cluster["rules"] for r in rule["resources"]}
    assert "secrets" not in resources and "namespaces" in resources
    args = operator_args(objects)
    assert [a for a in args if a.startswith("--namespace=")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]


def test_webhook_certificate_and_configuration(chart: helm.Chart) -> None:
    objects = render(chart, {"webhook": {"path": "/validate-lm"}})
    secret = find(objects, "Secret", "-webhook-tls")
    config = find(objects, "ValidatingWebhookConfiguration")["webhooks"][0]
    assert config["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    assert config["clientConfig"]["service"]["path"] == "/validate-lm"
    assert config["rules"][0]["resources"] == ["loadedmodels"]
    for key in ("tls.crt", "ca.crt"):
        assert base64.b64decode(secret["data"][key]).startswith(b"-----BEGIN CERTIFICATE-----")
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{RELEASE}-modelloader-operator.{NAMESPACE}.svc" in names.get_values_for_type(
        x509.DNSName
    )
    args = operator_args(objects)
    assert flag(args, "--webhook-cert") == "/etc/modelloader/webhook/tls.crt"
    off = render(chart, {"webhook": {"enabled": False}})
    assert not [
        o
        for o in off
        if "webhook" in o["kind"].lower() or o["metadata"]["name"].endswith("-webhook-tls")
    ]


def test_network_policies_keep_tenants_off_the_workers(chart: helm.Chart) -> None:
    objects = render(chart, VALUE_SETS["kuberay-gpu-npu"])
    ray = find(objects, "NetworkPolicy", "-ray")["spec"]
    node_label = {"modelloader.dev/ray-node": f"{RELEASE}-modelloader"}
    assert ray["podSelector"]["matchLabels"] == node_label
    full, scrape = ray["ingress"]
    # All ports only from this release's Ray nodes, in this namespace (no namespaceSelector).
    assert full["from"] == [{"podSelector": {"matchLabels": node_label}}] and "ports" not in full
    assert scrape["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    # The gateway and the operator carry the label: they reach the workers; nothing else does.
    for obj in objects:
        if obj["kind"] == "Deployment":
            assert obj["spec"]["template"]["metadata"]["labels"]["modelloader.dev/ray-node"]
        if obj["kind"] == "RayCluster":
            groups = [obj["spec"]["headGroupSpec"], *obj["spec"]["workerGroupSpecs"]]
            for group in groups:
                assert group["template"]["metadata"]["labels"]["modelloader.dev/ray-node"]


def test_monitoring_objects_and_dashboards(chart: helm.Chart) -> None:
    objects = render(chart, VALUE_SETS["monitoring"])
    monitors = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceMonitor"}
    assert monitors == {f"{RELEASE}-modelloader-operator", f"{RELEASE}-modelloader-gateway"}
    find(objects, "PodMonitor")
    sources = sorted((REPO / "dashboards").glob("*.json"))
    boards = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]
    ]
    assert len(boards) == len(sources)  # none yet is fine: the template tolerates absence
    for board, source in zip(
        sorted(boards, key=lambda b: b["metadata"]["name"]), sources, strict=True
    ):
        assert board["data"] == {source.name: source.read_text().rstrip("\n")}
        json.loads(board["data"][source.name])
    rules = [o for o in objects if o["kind"] == "PrometheusRule"]
    rule_files = (
        [p for p in (CHART / "files" / "prometheus").glob("*.yaml")]
        if (CHART / "files" / "prometheus").exists()
        else []
    )
    assert len(rules) == (1 if rule_files else 0)
    if rules:
        expected = [g for p in sorted(rule_files) for g in yaml.safe_load(p.read_text())["groups"]]
        assert rules[0]["spec"]["groups"] == expected
    assert not [o for o in render(chart, {}) if o["kind"] in ("ServiceMonitor", "PrometheusRule")]


def test_ingress_routes_to_the_gateway(chart: helm.Chart) -> None:
    objects = render(chart, VALUE_SETS["ingress"])
    ingress = find(objects, "Ingress", "-gateway")["spec"]
    backend = ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{RELEASE}-modelloader-gateway", "port": {"name": "http"}}
    assert ingress["ingressClassName"] == "nginx"


def test_grpc_is_served_exposed_and_allowed(chart: helm.Chart) -> None:
    objects = render(chart, VALUE_SETS["ingress"])
    service = find(objects, "Service", "-gateway")["spec"]["ports"]
    grpc = next(p for p in service if p["name"] == "grpc")
    assert grpc["port"] == 8081 and grpc["appProtocol"] == "kubernetes.io/h2c"
    container = pod_specs(objects)[f"{RELEASE}-modelloader-gateway"]["containers"][0]
    assert "--grpc-port=8081" in container["args"]
    assert {"name": "grpc", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    ingress = find(objects, "Ingress", "-grpc")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == (
        "GRPC"
    )
    route = find(objects, "GRPCRoute")["spec"]
    assert route["rules"][0]["backendRefs"][0]["port"] == 8081
    policy = find(objects, "NetworkPolicy", "-gateway")["spec"]["ingress"][0]["ports"]
    assert {"port": "grpc", "protocol": "TCP"} in policy


def test_names_and_images_follow_overrides(chart: helm.Chart) -> None:
    objects = render(
        chart,
        {"fullnameOverride": "models", "operator": {"image": {"digest": "sha256:" + "a" * 64}}},
    )
    assert all(
        o["metadata"]["name"].startswith("models") for o in objects if o["kind"] != "OriginPolicy"
    )
    image = find(objects, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0][
        "image"
    ]
    assert image == "ghcr.io/modelloader/operator@sha256:" + "a" * 64
    gateway = find(objects, "Deployment", "-gateway")["spec"]["template"]["spec"]["containers"][0][
        "image"
    ]
    assert gateway == f"ghcr.io/modelloader/runtime:{chart.metadata['appVersion']}"
