"""The manifests a tenant applies (examples/02-kubernetes): each one is valid for its CRD's
schema (or Kubernetes' own, for built-in kinds), and the schemas reject what is wrong.

The CRDs' CEL rules (x-kubernetes-validations) are the API server's to check; the parser tests
cover the same rules (tests/unit/test_crd.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from modelloader import resource

from tests.support.crd_schema import crd_validator

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "02-kubernetes"
KUBE_VERSION = "1.35.0"


VALIDATORS = {
    "LoadedModel": crd_validator("loadedmodel.yaml"),
    "OriginPolicy": crd_validator("originpolicy.yaml"),
}


def manifests() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                found[f"{path.name}#{index}"] = doc
    return found


def errors(doc: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in VALIDATORS[doc["kind"]].iter_errors(doc)
    ]


def test_the_tenant_has_every_example_the_guide_uses() -> None:
    kinds = sorted(
        (doc["kind"], doc.get("spec", {}).get("accelerator", "")) for doc in manifests().values()
    )
    assert kinds == [
        ("LoadedModel", "cpu"),
        ("LoadedModel", "gpu"),
        ("LoadedModel", "npu"),
        ("Namespace", ""),
        ("OriginPolicy", ""),
        ("Secret", ""),
    ]


@pytest.mark.parametrize("name", sorted(manifests()))
def test_every_example_is_valid(name: str) -> None:
    doc = manifests()[name]
    if doc["kind"] in VALIDATORS:
        assert errors(doc) == []
    else:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    if doc["kind"] == "LoadedModel":
        parsed = resource.parse_loaded_model(doc)  # and the operator's parser agrees
        assert parsed.spec.origin == doc["spec"]["origin"] == doc["metadata"]["namespace"]


OBJECT_STORES = REPO / "examples" / "04-object-stores"


def object_store_docs() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(OBJECT_STORES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def test_object_store_examples_are_valid_and_name_secrets_of_their_namespace() -> None:
    docs = object_store_docs()
    secrets = {
        (d["metadata"]["namespace"], d["metadata"]["name"]): d
        for d in docs
        if d["kind"] == "Secret"
    }
    models = [d for d in docs if d["kind"] == "LoadedModel"]
    assert {urlsplit(m["spec"]["source"]["uri"]).scheme for m in models} == {"s3", "oci"}
    for doc in docs:
        if doc["kind"] in VALIDATORS:
            assert errors(doc) == []
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    for model in models:
        parsed = resource.parse_loaded_model(model)
        key = (model["metadata"]["namespace"], parsed.spec.source.credentials_secret)
        assert key in secrets, key


def test_the_token_secret_is_what_the_operator_looks_for() -> None:
    secret = next(d for d in manifests().values() if d["kind"] == "Secret")
    policy = next(d for d in manifests().values() if d["kind"] == "OriginPolicy")
    assert secret["metadata"]["labels"]["modelloader.dev/origin"] == policy["metadata"]["name"]
    assert secret["metadata"]["namespace"] in policy["spec"]["namespaces"]
    assert "token" in secret["stringData"]


Change = Callable[[dict[str, Any]], None]


@pytest.mark.parametrize(
    ("kind", "change", "field"),
    [
        ("LoadedModel", lambda d: d["spec"].update(accelerator="tpu"), "spec/accelerator"),
        ("LoadedModel", lambda d: d["spec"].update(delegation="some"), "spec/delegation"),
        ("LoadedModel", lambda d: d["spec"].pop("source"), "spec: 'source' is a required"),
        ("LoadedModel", lambda d: d["spec"]["source"].pop("uri"), "spec/source: 'uri'"),
        ("LoadedModel", lambda d: d["spec"]["source"].update(uri="ftp://b/m"), "spec/source/uri"),
        ("LoadedModel", lambda d: d["spec"].update(threads=0), "spec/threads"),
        (
            "LoadedModel",
            lambda d: d["spec"]["resources"].update(memory="-1Gi"),
            "spec/resources/memory",
        ),
        ("OriginPolicy", lambda d: d["spec"]["quota"].update(maxModels=-1), "spec/quota/maxModels"),
        ("OriginPolicy", lambda d: d["spec"]["quota"].update(gpus=-2), "spec/quota/gpus"),
        ("OriginPolicy", lambda d: d["spec"]["quota"].update(memory="-8Gi"), "spec/quota/memory"),
        ("OriginPolicy", lambda d: d["spec"].update(isolation="shared"), "spec/isolation"),
        ("OriginPolicy", lambda d: d["metadata"].update(name="Team_A"), "metadata/name"),
    ],
)
def test_invalid_manifests_are_rejected_by_the_crd(kind: str, change: Change, field: str) -> None:
    doc = next(copy.deepcopy(d) for d in manifests().values() if d["kind"] == kind)
    assert errors(doc) == []
    change(doc)
    found = errors(doc)
    assert any(e.startswith(field) for e in found), found
