"""The Dockerfiles (images/): pinned bases, the package built from this repository, a numeric
non-root user that matches the chart's pod security, and the entry point the chart relies on
(no image is built here: no container engine on the test machines)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
VALUES = yaml.safe_load((REPO / "charts/modelloader/values.yaml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_an_operator_and_a_runtime_image() -> None:
    assert [p.name for p in DOCKERFILES] == ["operator.Dockerfile", "runtime.Dockerfile"]
    images = {VALUES["operator"]["image"]["repository"], VALUES["gateway"]["image"]["repository"]}
    assert {i.rsplit("/", 1)[1] for i in images} == {"operator", "runtime"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile(path: Path) -> None:
    steps = instructions(path)
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    for kind, value in steps:
        if kind == "FROM":
            image = value.split()[0]
            image = args.get(image.strip("${}"), image)
            # An exact Python and Debian release, never a floating tag.
            assert re.fullmatch(
                r"python:\d+\.\d+\.\d+-slim-[a-z]+(@sha256:[a-f0-9]{64})?", image
            ), image
    users = [v for k, v in steps if k == "USER"]
    uid = VALUES["podSecurityContext"]["runAsUser"]
    assert users and users[-1] == f"{uid}:{VALUES['podSecurityContext']['runAsGroup']}"
    runs = " ".join(v for k, v in steps if k == "RUN")
    assert "pip wheel --no-cache-dir --wheel-dir /wheels ." in runs  # this repository's package
    assert "--no-index --find-links=/wheels modelloader" in runs
    assert f"--uid {uid}" in runs
    copies = [v for k, v in steps if k == "COPY"]
    assert "operator ./operator" in copies and "workers ./workers" in copies
    entry = [v for k, v in steps if k == "ENTRYPOINT"][-1]
    assert entry == '["/usr/bin/tini", "--", "/usr/local/bin/modelloader-entrypoint"]'
    assert "tini" in runs
    if path.name == "runtime.Dockerfile":  # KubeRay's probes, LiteRT's GPU path
        assert "wget" in runs and "libvulkan1" in runs


def test_entrypoint_joins_ray_with_no_resources() -> None:
    script = IMAGES / "entrypoint.sh"
    subprocess.run(["sh", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--num-cpus=0 --num-gpus=0 --resources='{}'" in text
    assert 'exec modelloader "$@"' in text
    # The chart sets what the script reads.
    helpers = (REPO / "charts/modelloader/templates/_helpers.tpl").read_text()
    for name in ("RAY_HEAD_ADDRESS", "POD_IP", "RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        assert f"name: {name}" in helpers
