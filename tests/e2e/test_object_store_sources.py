"""Models from S3, GCS and an OCI registry through a real `modelloader local`: real servers on
loopback (moto's S3 with its IAM checks on, gcp-storage-emulator, the distribution registry
with htpasswd logins and a model pushed by ORAS), credentials from Secret manifests. Each scheme
loads and answers like the interpreter; each bad input ends Failed with its message and harms
nothing else; one origin's Secret does not fetch for another; no credential reaches a status
or the log."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from modelloader_workers.litert_runner import LiteRTRunner

from tests.conftest import EXAMPLE
from tests.e2e.conftest import LocalServer, running_local
from tests.support.object_stores import (
    GCS,
    S3,
    Registry,
    gcs_server,
    registry_server,
    s3_server,
)

MODEL = EXAMPLE / "digits.tflite"
DIGEST = hashlib.sha256(MODEL.read_bytes()).hexdigest()
PIXELS = np.array(
    [s["pixels"] for s in json.loads((EXAMPLE / "samples.json").read_text())["samples"]],
    dtype=np.float32,
)
READY = ("s3-digits", "gs-digits", "oci-digits", "oci-pinned")
FAILED = {
    "s3-wrong-key": "refused the credentials (SignatureDoesNotMatch)",
    # The node's cache holds these bytes (s3-digits): a digest is still no capability.
    "s3-pinned-wrong-key": "refused the credentials (SignatureDoesNotMatch)",
    "s3-no-bucket": "bucket 'nobucket' does not exist",
    "s3-no-object": "no object 'missing.tflite' in bucket 'models'",
    "s3-digest": "but the manifest says " + "0" * 64,
    "s3-unreachable": "cannot reach the store: 127.0.0.1:9: Connection refused",
    "gs-no-object": "no object 'missing.tflite' in bucket 'gmodels'",
    "oci-no-tag": "no tag 'v9' in repository 'models/digits'",
    "oci-no-layer": "no model layer",
    "oci-no-login": "refused access (401)",
    "b-borrows": "there is no Secret 's3-creds' in namespace 'team-b'",
    "tiny-too-big": "over the origin's maxModelBytes of 1000 bytes",
}


def loaded_model(name: str, namespace: str, uri: str, secret: str | None, **extra: Any) -> Any:
    source: dict[str, Any] = {"uri": uri, **extra}
    if secret:
        source["credentialsSecret"] = secret
    return {
        "apiVersion": "modelloader.dev/v1alpha1",
        "kind": "LoadedModel",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"source": source},
    }


def secret(
    name: str, data: dict[str, str], kind: str = "Opaque", namespace: str = "default"
) -> Any:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": kind,
        "metadata": {"name": name, "namespace": namespace},
        "stringData": data,
    }


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3, GCS, Registry]]:
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(s3_server())
        gcs = stack.enter_context(gcs_server())
        registry = stack.enter_context(registry_server(tmp_path_factory.mktemp("registry")))
        s3.put("models", "digits.tflite", MODEL.read_bytes())
        gcs.put("gmodels", "digits.tflite", MODEL.read_bytes())
        registry.push("models/digits:v1", MODEL)
        docs = tmp_path_factory.mktemp("docs")
        (docs / "README.md").write_text("not a model")
        (docs / "notes.txt").write_text("nor this")
        registry.push_files("models/docs:v1", [docs / "README.md", docs / "notes.txt"])
        yield s3, gcs, registry


@pytest.fixture(scope="module")
def local(
    stores: tuple[S3, GCS, Registry], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    s3, gcs, registry = stores
    folder = tmp_path_factory.mktemp("stores") / "manifests"
    folder.mkdir()
    manifest_digest = registry.push("models/digits:v2", MODEL)
    oci = f"oci://{registry.host}/models"
    docs = [
        secret("s3-creds", s3.credentials()),
        secret("s3-creds", s3.credentials(), namespace="tiny"),
        secret("s3-wrong", s3.credentials() | {"AWS_SECRET_ACCESS_KEY": "not-the-secret-key"}),
        secret("s3-dead", s3.credentials() | {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}),
        secret("gcs-creds", gcs.credentials()),
        secret("oci-creds", registry.dockerconfig(), "kubernetes.io/dockerconfigjson"),
        {
            "apiVersion": "modelloader.dev/v1alpha1",
            "kind": "OriginPolicy",
            "metadata": {"name": "tiny"},
            "spec": {"namespaces": ["tiny"], "quota": {"maxModelBytes": 1000}},
        },
        loaded_model("s3-digits", "default", "s3://models/digits.tflite", "s3-creds"),
        loaded_model("gs-digits", "default", "gs://gmodels/digits.tflite", "gcs-creds"),
        loaded_model("oci-digits", "default", f"{oci}/digits:v1", "oci-creds"),
        loaded_model("oci-pinned", "default", f"{oci}/digits@{manifest_digest}", "oci-creds"),
        loaded_model("s3-wrong-key", "default", "s3://models/digits.tflite", "s3-wrong"),
        loaded_model(
            "s3-pinned-wrong-key",
            "default",
            "s3://models/digits.tflite",
            "s3-wrong",
            sha256=DIGEST,
        ),
        loaded_model("s3-no-bucket", "default", "s3://nobucket/digits.tflite", "s3-creds"),
        loaded_model("s3-no-object", "default", "s3://models/missing.tflite", "s3-creds"),
        loaded_model(
            "s3-digest", "default", "s3://models/digits.tflite", "s3-creds", sha256="0" * 64
        ),
        loaded_model("s3-unreachable", "default", "s3://models/digits.tflite", "s3-dead"),
        loaded_model("gs-no-object", "default", "gs://gmodels/missing.tflite", "gcs-creds"),
        loaded_model("oci-no-tag", "default", f"{oci}/digits:v9", "oci-creds"),
        loaded_model("oci-no-layer", "default", f"{oci}/docs:v1", "oci-creds"),
        loaded_model("oci-no-login", "default", f"{oci}/digits:v1", None),
        loaded_model("b-borrows", "team-b", "s3://models/digits.tflite", "s3-creds"),
        loaded_model("tiny-too-big", "tiny", "s3://models/digits.tflite", "s3-creds"),
    ]
    (folder / "models.yaml").write_text("---\n".join(json.dumps(d) + "\n" for d in docs))
    extra = ("--allow-source-host", "127.0.0.1", "--plain-http-registry", registry.host)
    with running_local(folder, *extra, "--warm-workers", "0") as server:
        server.wait_for(dict.fromkeys(READY, "Ready") | dict.fromkeys(FAILED, "Failed"), 120)
        yield server


def test_each_scheme_loads_and_answers_like_the_interpreter(local: LocalServer) -> None:
    expected = LiteRTRunner(str(MODEL)).run({"pixels": PIXELS})["probabilities"]
    client = triton.InferenceServerClient(local.url)
    try:
        for name in READY:
            tensor = triton.InferInput("pixels", list(PIXELS.shape), "FP32")
            tensor.set_data_from_numpy(PIXELS, binary_data=True)
            got = client.infer(name, [tensor]).as_numpy("probabilities")
            np.testing.assert_array_equal(got, expected, err_msg=name)
    finally:
        client.close()
    for name in READY:
        assert local.item(name)["status"]["model"]["sha256"] == DIGEST


def test_a_tag_is_shown_resolved_to_its_digest(local: LocalServer) -> None:
    resolved = local.item("oci-digits")["status"]["model"]["resolved"]
    assert resolved.startswith("oci://") and "/models/digits@sha256:" in resolved
    pinned = local.item("oci-pinned")["status"]["model"]["resolved"]
    assert pinned.startswith("oci://") and "@sha256:" in pinned


def test_each_bad_input_fails_its_own_model_with_a_message(local: LocalServer) -> None:
    messages = {name: local.item(name)["status"]["message"] for name in FAILED}
    print(json.dumps(messages, indent=1))
    for name, needle in FAILED.items():
        assert needle in messages[name], (name, messages[name])


def test_no_credential_reaches_a_status_or_the_log(
    local: LocalServer, stores: tuple[S3, GCS, Registry]
) -> None:
    s3, _, registry = stores
    shown = json.dumps(local.status()) + local.log()
    for value in (s3.secret, registry.password, "not-the-secret-key"):
        assert value not in shown
