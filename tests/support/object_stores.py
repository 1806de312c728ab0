"""Real object-store servers for the tests, started on loopback: moto's S3 server (with its IAM
checks on, so wrong keys are refused), gcp-storage-emulator, and the distribution registry
(Debian's `docker-registry`) with htpasswd logins, models pushed to it by ORAS's client.

Each server is a context manager yielding what a test needs to point a LoadedModel at it. With
CI=true a missing server program fails the test instead of skipping it."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ports import free_port

BIN = Path(sys.executable).parent
REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def need(program: str) -> None:
    if not Path(program).exists() and shutil.which(program) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{program} is missing: .ci/run installs it")
        pytest.skip(f"{program} is not installed")


def _wait_listening(url: str, process: subprocess.Popen[bytes], what: str) -> None:
    """Until the server accepts connections. Not an HTTP request: moto counts every request
    towards the calls it serves before its IAM checks begin."""
    parsed = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            socket.create_connection((parsed.hostname, parsed.port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer at {url}")


@contextlib.contextmanager
def _running(
    command: list[str], url: str, what: str, env: dict[str, str] | None = None
) -> Iterator[None]:
    process = subprocess.Popen(
        command,
        env=None if env is None else os.environ | env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(url, process, what)
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@dataclass(frozen=True)
class S3:
    endpoint: str
    key_id: str
    secret: str

    def credentials(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
        )

    def put(self, bucket: str, key: str, data: bytes) -> None:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=key, Body=data)


@contextlib.contextmanager
def s3_server() -> Iterator[S3]:
    """moto in server mode; IAM checks start after the three calls that create the user."""
    import boto3

    need(str(BIN / "moto_server"))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with _running(command, endpoint, "moto_server", {"INITIAL_NO_AUTH_ACTION_COUNT": "3"}):
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
            region_name="us-east-1",
        )
        iam.create_user(UserName="models")
        everything = {"Effect": "Allow", "Action": "*", "Resource": "*"}
        iam.put_user_policy(
            UserName="models",
            PolicyName="all",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [everything]}),
        )
        key = iam.create_access_key(UserName="models")["AccessKey"]
        yield S3(endpoint, key["AccessKeyId"], key["SecretAccessKey"])


@dataclass(frozen=True)
class GCS:
    endpoint: str

    def credentials(self) -> dict[str, str]:
        return {"GCS_ENDPOINT_URL": self.endpoint}

    def put(self, bucket: str, name: str, data: bytes) -> None:
        with contextlib.suppress(urllib.error.HTTPError):  # 409: it exists
            _post(f"{self.endpoint}/storage/v1/b", json.dumps({"name": bucket}).encode(), "json")
        _post(
            f"{self.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}",
            data,
            "octet-stream",
        )


def _post(url: str, data: bytes, kind: str) -> None:
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": f"application/{kind}"}
    )
    urllib.request.urlopen(request, timeout=10).close()


@contextlib.contextmanager
def gcs_server() -> Iterator[GCS]:
    need(str(BIN / "gcp-storage-emulator"))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [
        str(BIN / "gcp-storage-emulator"),
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--in-memory",
    ]
    with _running(command, f"{endpoint}/storage/v1/b", "gcp-storage-emulator"):
        yield GCS(endpoint)


@dataclass(frozen=True)
class Registry:
    host: str  # 127.0.0.1:PORT
    user: str
    password: str

    def dockerconfig(self, password: str | None = None) -> dict[str, str]:
        auth = base64.b64encode(f"{self.user}:{password or self.password}".encode()).decode()
        return {".dockerconfigjson": json.dumps({"auths": {self.host: {"auth": auth}}})}

    def push(self, reference: str, model: Path) -> str:
        """`oras push` with ORAS's client; returns the manifest's digest."""
        return self.push_files(reference, [model])

    def push_files(self, reference: str, files: list[Path]) -> str:
        import oras.client

        client = oras.client.OrasClient(hostname=self.host, insecure=True, auth_backend="basic")
        client.auth.set_basic_auth(self.user, self.password)  # no login: no ~/.docker written
        # ORAS names each layer by its file's name (org.opencontainers.image.title).
        with contextlib.chdir(files[0].parent):
            response = client.push(target=f"{self.host}/{reference}", files=[f.name for f in files])
        response.raise_for_status()
        return str(response.headers["Docker-Content-Digest"])


@contextlib.contextmanager
def registry_server(tmp: Path) -> Iterator[Registry]:
    import bcrypt

    need(REGISTRY)
    port = free_port()
    user, password = "tenant", "registry-password"
    htpasswd = tmp / "htpasswd"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"{user}:{hashed}\n")
    config = tmp / "registry.yml"
    config.write_text(
        json.dumps(
            {
                "version": 0.1,
                "log": {"level": "error"},
                "storage": {"filesystem": {"rootdirectory": str(tmp / "blobs")}},
                "http": {"addr": f"127.0.0.1:{port}"},
                "auth": {"htpasswd": {"realm": "models", "path": str(htpasswd)}},
            }
        )
    )
    with _running([REGISTRY, "serve", str(config)], f"http://127.0.0.1:{port}/v2/", "registry"):
        yield Registry(f"127.0.0.1:{port}", user, password)
