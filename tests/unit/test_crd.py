"""The LoadedModel CRD: its schema accepts the examples, rejects what is wrong, and agrees
with the Python parser on every enum and pattern."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from modelloader import resource
from modelloader.quantity import QUANTITY_PATTERN

from tests.support.crd_schema import cel_failures, crd_validator

REPO = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((REPO / "crds" / "loadedmodel.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC = SCHEMA["properties"]["spec"]["properties"]


def validator() -> jsonschema.Draft7Validator:
    return crd_validator("loadedmodel.yaml")


def example_manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((REPO / "examples").rglob("*.yaml")):
        docs += [
            d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "LoadedModel"
        ]
    return docs


def test_shape_of_the_resource() -> None:
    assert CRD["spec"]["group"] == "modelloader.dev"
    assert CRD["spec"]["scope"] == "Namespaced"
    assert CRD["spec"]["names"]["shortNames"] == ["lm"]
    assert VERSION["name"] == "v1alpha1" and VERSION["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    columns = {c["name"] for c in VERSION["additionalPrinterColumns"]}
    assert columns == {"Origin", "Accelerator", "Phase", "Ready", "Age"}
    assert SCHEMA["properties"]["spec"]["x-kubernetes-validations"]


def test_enums_and_patterns_match_the_parser() -> None:
    assert tuple(SPEC["accelerator"]["enum"]) == resource.ACCELERATORS
    assert tuple(SPEC["delegation"]["enum"]) == resource.DELEGATIONS
    assert tuple(SPEC["precision"]["enum"]) == resource.PRECISIONS
    assert SPEC["origin"]["pattern"] == resource.LABEL_PATTERN
    assert SPEC["source"]["properties"]["sha256"]["pattern"] == resource.SHA256_PATTERN
    assert SPEC["source"]["properties"]["uri"]["pattern"] == resource.URI_PATTERN
    assert SPEC["threads"]["maximum"] == resource.MAX_THREADS
    assert SPEC["replicas"]["maximum"] == resource.MAX_REPLICAS
    scaling = SPEC["autoscaling"]["properties"]
    assert scaling["maxReplicas"]["maximum"] == scaling["minReplicas"]["maximum"]
    assert scaling["maxReplicas"]["maximum"] == resource.MAX_REPLICAS
    for key in ("memory", "cpu"):
        assert SPEC["resources"]["properties"][key]["pattern"] == QUANTITY_PATTERN


def test_every_example_is_valid_for_the_crd_and_the_parser() -> None:
    docs = example_manifests()
    assert docs
    for doc in docs:
        validator().validate(doc)
        resource.parse_loaded_model(doc)


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda s: s.update(accelerator="tpu"), "accelerator"),
        (lambda s: s.pop("source"), "source"),
        (lambda s: s.update(source={"sha256": "a" * 64}), "uri"),
        (lambda s: s.update(threads=0), "threads"),
        (lambda s: s.update(origin="UPPER"), "origin"),
        (lambda s: s.update(resources={"memory": "-1Gi"}), "memory"),
        (lambda s: s.update(source={"uri": "file://x", "sha256": "nothex"}), "sha256"),
    ],
)
def test_the_schema_rejects_invalid_manifests(change: Any, path: str) -> None:
    doc = copy.deepcopy(example_manifests()[0])
    change(doc["spec"])
    errors = list(validator().iter_errors(doc))
    assert errors, f"{path} should have been rejected"
    with pytest.raises(resource.ManifestError):
        resource.parse_loaded_model(doc)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"replicas": 2, "autoscaling": {"maxReplicas": 3}}, "spec.replicas"),
        ({"autoscaling": {"minReplicas": 4, "maxReplicas": 3}}, "spec.autoscaling.minReplicas"),
        ({"autoscaling": {"minReplicas": 1}}, "spec.autoscaling.maxReplicas"),
        ({"autoscaling": {"maxReplicas": 3, "targetInFlight": 0}}, "targetInFlight"),
        ({"autoscaling": {"maxReplicas": 3, "scaleDownDelaySeconds": -1}}, "scaleDownDelay"),
        ({"replicas": -1}, "spec.replicas"),
        ({"replicas": 101}, "spec.replicas"),
        ({"replicas": True}, "spec.replicas"),
    ],
)
def test_replicas_and_autoscaling_are_checked_alike_by_crd_cel_and_parser(
    spec: dict[str, Any], field: str
) -> None:
    doc = copy.deepcopy(example_manifests()[0])
    doc["spec"].update(spec)
    broken = list(validator().iter_errors(doc)) + cel_failures("loadedmodel.yaml", doc)
    assert broken, f"the CRD accepted {spec}"
    with pytest.raises(resource.ManifestError) as caught:
        resource.parse_loaded_model(doc)
    assert field in str(caught.value)


def test_a_fixed_count_or_autoscaling_parse_and_leave_the_fingerprint_alone() -> None:
    doc = copy.deepcopy(example_manifests()[0])
    base = resource.parse_loaded_model(doc)
    assert base.spec.replicas == 1 and base.spec.autoscaling is None
    doc["spec"]["replicas"] = 3
    three = resource.parse_loaded_model(doc)
    assert three.spec.replicas == 3 and three.fingerprint == base.fingerprint
    del doc["spec"]["replicas"]
    doc["spec"]["autoscaling"] = {"minReplicas": 0, "maxReplicas": 4, "targetInFlight": 1.5}
    assert not list(validator().iter_errors(doc)) and not cel_failures("loadedmodel.yaml", doc)
    scaled = resource.parse_loaded_model(doc)
    assert scaled.spec.autoscaling == resource.Autoscaling(
        max_replicas=4, min_replicas=0, target_in_flight=1.5
    )
    assert scaled.fingerprint == base.fingerprint


@pytest.mark.parametrize(
    ("batching", "field"),
    [
        ({}, "spec.batching.maxBatchSize"),
        ({"maxBatchSize": 0}, "spec.batching.maxBatchSize"),
        ({"maxBatchSize": 1025}, "spec.batching.maxBatchSize"),
        ({"maxBatchSize": 8, "maxQueueDelayMicroseconds": -1}, "maxQueueDelayMicroseconds"),
        ({"maxBatchSize": 8, "maxQueueDelayMicroseconds": 1_000_001}, "maxQueueDelay"),
        ({"maxBatchSize": 8, "preferredBatchSizes": [0]}, "preferredBatchSizes"),
        ({"maxBatchSize": 8, "preferredBatchSizes": [16]}, "preferredBatchSizes"),
        ({"maxBatchSize": 8, "preferredBatchSizes": [4, 4]}, "preferredBatchSizes"),
        ({"maxBatchSize": 8, "preferredBatchSizes": 4}, "preferredBatchSizes"),
        ({"maxBatchSize": 32, "preferredBatchSizes": list(range(1, 18))}, "preferredBatchSizes"),
        ({"maxBatchSize": 8, "delay": 5}, "spec.batching"),
    ],
)
def test_batching_nonsense_is_refused_by_crd_cel_and_parser(
    batching: dict[str, Any], field: str
) -> None:
    doc = copy.deepcopy(example_manifests()[0])
    doc["spec"]["batching"] = batching
    # CEL rules run on values that passed the schema, as the API server runs them.
    broken = list(validator().iter_errors(doc)) or cel_failures("loadedmodel.yaml", doc)
    # The API server refuses these itself: a size listed twice (x-kubernetes-list-type: set)
    # and a field the schema does not know (kubectl's strict field validation).
    if batching.get("preferredBatchSizes") != [4, 4] and "delay" not in batching:
        assert broken, f"the CRD accepted {batching}"
    with pytest.raises(resource.ManifestError) as caught:
        resource.parse_loaded_model(doc)
    assert field in str(caught.value)


def test_batching_parses_and_changes_the_fingerprint_only_when_asked() -> None:
    doc = copy.deepcopy(example_manifests()[0])
    base = resource.parse_loaded_model(doc)
    assert base.spec.batching is None and "batching" not in base.spec.loaded_as()
    doc["spec"]["batching"] = {
        "maxBatchSize": 8,
        "maxQueueDelayMicroseconds": 2000,
        "preferredBatchSizes": [8, 4],
    }
    assert not list(validator().iter_errors(doc)) and not cel_failures("loadedmodel.yaml", doc)
    batched = resource.parse_loaded_model(doc)
    assert batched.spec.batching == resource.Batching(8, 2000, (4, 8))
    assert batched.fingerprint != base.fingerprint  # the workers reload with it
