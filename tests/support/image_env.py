"""The Python environment of the project's images, installed by the Dockerfiles' own steps, for
the cluster tier's pods: what `images/runtime.Dockerfile` and `images/operator.Dockerfile` run
(`pip wheel --wheel-dir W .`, then `pip install --no-index --find-links=W modelloader` into a
fresh Python), read from the Dockerfiles themselves so the two cannot drift. A dependency the
images would miss is missing here too; the project's `.venv` plays no part.

Built once per `pyproject.toml` (its dependencies) and kept under ~/.cache; the project's own
wheel is built from the working tree and installed over it on every run, so the pods run the
code under test.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = (REPO / "images" / "runtime.Dockerfile", REPO / "images" / "operator.Dockerfile")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modelloader-images"
# The steps checked for in each Dockerfile, as they are written there.
WHEEL_STEP = re.compile(r"RUN pip wheel --no-cache-dir --wheel-dir /wheels \.\s*$", re.M)
INSTALL_STEP = re.compile(
    r"RUN pip install --no-cache-dir --no-index --find-links=/wheels modelloader", re.M
)


def _pip(python: Path, *args: str) -> None:
    done = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


@functools.cache  # once per test session: the tree does not change under it
def image_bin() -> Path:
    """The `bin` folder of the images' environment, with this tree's project installed."""
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        # If a Dockerfile changes how it installs, this builder must change with it.
        assert WHEEL_STEP.search(text), f"{dockerfile.name}: its pip wheel step changed"
        assert INSTALL_STEP.search(text), f"{dockerfile.name}: its pip install step changed"
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    CACHE.mkdir(parents=True, exist_ok=True)
    built = CACHE / key
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait and reuse
        wheels = Path(tempfile.mkdtemp(prefix="wheels-", dir=CACHE))
        try:
            if not (built / "complete").exists():
                # In place (a venv's scripts name its path) and marked complete at the end.
                shutil.rmtree(built, ignore_errors=True)
                subprocess.run([sys.executable, "-m", "venv", str(built)], check=True)
                python = built / "bin" / "python"
                # The Dockerfiles' two steps: every wheel the project needs, then an install
                # from those wheels alone. (pip's cache may serve the downloads: that changes
                # where the bytes come from, not what is installed.)
                _pip(python, "wheel", "--wheel-dir", str(wheels), str(REPO))
                _pip(python, "install", "--no-cache-dir", "--no-index", "--find-links",
                     str(wheels), "modelloader")  # fmt: skip
                (built / "complete").touch()
            else:
                # The same steps for the project's own wheel, from the tree under test.
                _pip(built / "bin" / "python", "wheel", "--no-deps", "--wheel-dir",
                     str(wheels), str(REPO))  # fmt: skip
                _pip(built / "bin" / "python", "install", "--no-index", "--no-deps",
                     "--force-reinstall", *map(str, wheels.glob("modelloader-*.whl")))  # fmt: skip
        finally:
            shutil.rmtree(wheels, ignore_errors=True)
    return built / "bin"
