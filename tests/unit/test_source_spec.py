"""spec.source: the object-store schemes, credentialsSecret, and Secrets read from files."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from modelloader.manifests import ManifestReader
from modelloader.resource import ManifestError, parse_loaded_model

GOOD: dict[str, Any] = {
    "apiVersion": "modelloader.dev/v1alpha1",
    "kind": "LoadedModel",
    "metadata": {"name": "m", "namespace": "team-a"},
    "spec": {"source": {"uri": "file:///m.tflite"}},
}


def source(**fields: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    doc["spec"]["source"] = fields
    return doc


@pytest.mark.parametrize(
    "uri", ["s3://bucket/key.tflite", "gs://bucket/o.tflite", "oci://reg:5000/repo:v1"]
)
def test_object_store_uris_with_a_credentials_secret(uri: str) -> None:
    model = parse_loaded_model(source(uri=uri, credentialsSecret="store-creds"))
    assert model.spec.source.uri == uri
    assert model.spec.source.credentials_secret == "store-creds"


def test_a_bad_secret_name_or_scheme_names_the_field() -> None:
    with pytest.raises(ManifestError, match=r"spec\.source\.credentialsSecret"):
        parse_loaded_model(source(uri="s3://b/k", credentialsSecret="Not_A_Name"))
    with pytest.raises(ManifestError, match=r"spec\.source\.uri"):
        parse_loaded_model(source(uri="ftp://host/m.tflite"))


def test_no_credentials_secret_keeps_the_fingerprint_it_had_before() -> None:
    plain = parse_loaded_model(GOOD)
    assert "credentials_secret" not in plain.spec.loaded_as()["source"]
    named = parse_loaded_model(source(uri="file:///m.tflite", credentialsSecret="c"))
    assert named.fingerprint != plain.fingerprint


def test_secrets_in_the_files_are_read_with_data_and_string_data(tmp_path: Path) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "store-creds", "namespace": "team-a"},
        "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(b"AKIA").decode()},
        "stringData": {"AWS_SECRET_ACCESS_KEY": "s3cr3t"},
    }
    broken = {"kind": "Secret", "metadata": {"name": "broken"}, "data": {"k": "%%%"}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump_all([GOOD, secret, broken]))
    found = ManifestReader([tmp_path]).read()
    assert found.secret_data[("team-a", "store-creds")] == {
        "AWS_ACCESS_KEY_ID": "AKIA",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
    }
    assert ("default", "broken") not in found.secret_data
    (problem,) = [p for p in found.file_errors if "broken" in p]
    assert "%%%" not in problem
