"""Parsing LoadedModel manifests: defaults, and errors that name the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from modelloader.quantity import QuantityError, parse_quantity
from modelloader.resource import (
    LoadedModel,
    LoadedModelSpec,
    ManifestError,
    Source,
    parse_loaded_model,
)

GOOD: dict[str, Any] = {
    "apiVersion": "modelloader.dev/v1alpha1",
    "kind": "LoadedModel",
    "metadata": {"name": "digits", "namespace": "team-a"},
    "spec": {"source": {"uri": "file://digits.tflite"}},
}


def with_spec(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    doc["spec"].update(changes)
    return doc


def test_defaults_and_origin_from_namespace() -> None:
    model = parse_loaded_model(GOOD)
    assert str(model.key) == "team-a/digits"
    assert model.spec == LoadedModelSpec(origin="team-a", source=model.spec.source)
    assert (model.spec.accelerator, model.spec.delegation, model.spec.precision) == (
        "auto",
        "partitioned",
        "fp32",
    )
    assert model.spec.threads == 1


def test_full_spec() -> None:
    model = parse_loaded_model(
        with_spec(
            origin="shop",
            accelerator="gpu",
            delegation="whole",
            precision="fp16",
            threads=4,
            resources={"memory": "256Mi", "cpu": "500m"},
            source={"uri": "https://example.test/m.tflite", "sha256": "a" * 64},
        )
    )
    assert model.spec.origin == "shop"
    assert model.spec.resources.memory_bytes == 256 << 20
    assert model.spec.resources.cpu == 0.5
    assert model.spec.source.sha256 == "a" * 64


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (with_spec(accelerator="tpu"), "spec.accelerator"),
        (with_spec(delegation="some"), "spec.delegation"),
        (with_spec(precision="int4"), "spec.precision"),
        (with_spec(threads=0), "spec.threads"),
        (with_spec(threads="2"), "spec.threads"),
        (with_spec(origin="Not_A_Label"), "spec.origin"),
        (with_spec(source={"uri": "ftp://x/y"}), "spec.source.uri"),
        (with_spec(source={"uri": "file://x", "sha256": "xyz"}), "spec.source.sha256"),
        (with_spec(source={}), "spec.source.uri"),
        (with_spec(resources={"memory": "lots"}), "spec.resources.memory"),
        (with_spec(resources={"cpu": "0"}), "spec.resources.cpu"),
        (with_spec(resources={"gpu": 1}), "spec.resources.gpu"),
        (with_spec(accelerator="cpu", delegation="whole"), "spec.delegation"),
        (with_spec(colour="blue"), "spec.colour"),
        ({**GOOD, "spec": None}, "spec"),
        ({**GOOD, "metadata": {"name": "Bad Name"}}, "metadata.name"),
        ({**GOOD, "metadata": {}}, "metadata.name"),
        ({**GOOD, "apiVersion": "v1"}, "apiVersion/kind"),
    ],
)
def test_invalid_manifests_name_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_loaded_model(doc)
    assert str(caught.value).startswith(field + ":"), str(caught.value)


def test_fingerprint_follows_the_spec_only() -> None:
    a = parse_loaded_model(GOOD)
    b = parse_loaded_model({**GOOD, "metadata": {**GOOD["metadata"], "generation": 7}})
    c = parse_loaded_model(with_spec(threads=2))
    assert a.fingerprint == b.fingerprint != c.fingerprint


@pytest.mark.parametrize(
    ("text", "value"),
    [("512Ki", 524288), ("1.5Gi", 1.5 * 2**30), ("500m", 0.5), ("2", 2), (3, 3), ("1k", 1000)],
)
def test_quantities(text: object, value: float) -> None:
    assert float(parse_quantity(text)) == value


@pytest.mark.parametrize("text", ["", "1.2.3", "10XB", "-1", True, None, "1 Gi"])
def test_bad_quantities(text: object) -> None:
    with pytest.raises(QuantityError):
        parse_quantity(text)


def test_files_count_generations_and_keep_each_stamped_model_while_it_is_unchanged() -> None:
    """Files have no metadata.generation: `modelloader local` counts spec changes. The same
    object comes back while nothing changes, so its fingerprint is hashed once (a pass over
    500 models asked for each fingerprint several times)."""
    from modelloader.local_runtime import Generations

    def model(uri: str) -> LoadedModel:
        return LoadedModel("o", "m", LoadedModelSpec("o", Source(uri)))

    generations = Generations()
    read = model("file://a.tflite")
    first = generations.stamp((read,))[0]
    assert first.generation == 1 and first.fingerprint == read.fingerprint
    assert generations.stamp((read,))[0] is first
    assert generations.stamp((model("file://a.tflite"),))[0].generation == 1  # read again
    changed = generations.stamp((model("file://b.tflite"),))[0]
    assert changed.generation == 2 and changed.fingerprint != first.fingerprint
    assert generations.stamp((model("file://b.tflite"),))[0].generation == 2
    assert generations.stamp(())[:] == [] and generations.stamp((read,))[0].generation == 1
