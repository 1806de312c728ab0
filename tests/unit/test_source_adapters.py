"""Pure parts of the source adapters: the OCI model layer's choice, references, Docker
configs, and error text scrubbed of credentials."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from modelloader_workers.fetching import SourceError, SourcePolicy, SourceRequest
from modelloader_workers.fetching.fetcher import fetch
from modelloader_workers.fetching.oci_source import _login, _model_layer
from modelloader_workers.fetching.scrub import first_line, scrub

TFLITE = {"mediaType": "application/vnd.tflite", "digest": "sha256:" + "a" * 64}
TITLED = {
    "mediaType": "application/vnd.oci.image.layer.v1.tar",
    "digest": "sha256:" + "b" * 64,
    "annotations": {"org.opencontainers.image.title": "model.tflite"},
}
README = {
    "mediaType": "text/markdown",
    "digest": "sha256:" + "c" * 64,
    "annotations": {"org.opencontainers.image.title": "README.md"},
}


def test_the_model_layer_is_chosen_by_media_type_then_title_then_alone() -> None:
    assert _model_layer("u", [README, TITLED, TFLITE]) is TFLITE
    assert _model_layer("u", [README, TITLED]) is TITLED
    assert _model_layer("u", [README]) is README  # a single layer is the model
    with pytest.raises(SourceError, match="no model layer"):
        _model_layer("u", [README, README])
    with pytest.raises(SourceError, match="no model layer"):
        _model_layer("u", [])


def test_docker_config_logins() -> None:
    auth = base64.b64encode(b"me:secret").decode()
    config = {".dockerconfigjson": json.dumps({"auths": {"reg:5000": {"auth": auth}}})}
    assert _login("u", "reg:5000", config) == ("me", "secret")
    assert _login("u", "other", config) is None
    plain = {"auths": {"https://reg": {"username": "a", "password": "b"}}}
    assert _login("u", "reg", {".dockerconfigjson": json.dumps(plain)}) == ("a", "b")
    with pytest.raises(SourceError, match="not a Docker config"):
        _login("u", "reg", {".dockerconfigjson": "{nope"})


@pytest.mark.parametrize(
    "uri",
    ["oci://registry", "oci://registry/Repo:tag", "oci://registry/repo@sha256:short", "s3://only"],
)
def test_malformed_references_are_refused_before_any_connection(tmp_path: Path, uri: str) -> None:
    with pytest.raises(SourceError, match="expected"):
        fetch(SourceRequest(uri), SourcePolicy((), tmp_path))


def test_unknown_schemes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unsupported source"):
        fetch(SourceRequest("ftp://host/m.tflite"), SourcePolicy((), tmp_path))


def test_credentials_never_reach_a_message() -> None:
    credentials = {
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI",
        "AWS_ENDPOINT_URL": "http://store:9000",
        "AWS_REGION": "eu",
    }
    text = "refused wJalrXUtnFEMI at http://store:9000\nsecond line"
    assert first_line(scrub(text, credentials)) == "refused *** at http://store:9000"
    assert "wJalrXUtnFEMI" not in repr(SourceRequest("s3://b/k", credentials=credentials))
