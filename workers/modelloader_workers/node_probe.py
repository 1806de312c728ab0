"""Readiness and liveness of a Ray pod, for the chart's probes.

KubeRay injects probes into Ray pods that ask Ray's dashboard agent (`:52365`) and, on the head,
the dashboard (`:8265`); both come with `ray[default]`, which the runtime image does not carry
(the data plane needs neither: an agent process per node and some twenty packages for nothing
else). The chart sets these probes instead, and KubeRay injects none where a container has its
own. They ask Ray itself, as cheaply as a probe should (no `import ray`, tens of milliseconds):

  python -m modelloader_workers.node_probe raylet        the local raylet accepts on its socket
  python -m modelloader_workers.node_probe gcs [--port]  and the GCS accepts on its port

Exit 0 when healthy, else 1 with the reason on stderr. Ray's session folder is found as Ray
finds it: `$RAY_TMPDIR/ray` (else the system's temporary folder), `session_latest`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

TIMEOUT_SECONDS = 2.0
GCS_PORT = 6379  # `ray start --head`'s default, and KubeRay's


def raylet_problem(temp_dir: Path) -> str | None:
    path = temp_dir / "session_latest" / "sockets" / "raylet"
    if not path.exists():
        return f"no raylet socket at {path}: Ray has not started on this node"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT_SECONDS)
        try:
            sock.connect(str(path))
        except OSError as error:
            return f"the raylet does not accept on {path}: {error.strerror or error}"
    return None


def gcs_problem(port: int, host: str = "127.0.0.1") -> str | None:
    try:
        socket.create_connection((host, port), timeout=TIMEOUT_SECONDS).close()
    except OSError as error:
        return f"the GCS does not accept on {host}:{port}: {error.strerror or error}"
    return None


def ray_temp_dir() -> Path:
    return Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelloader_workers.node_probe")
    parser.add_argument("component", choices=["raylet", "gcs"])
    parser.add_argument("--port", type=int, default=GCS_PORT, help="the GCS port (gcs)")
    args = parser.parse_args(argv)
    problem = raylet_problem(ray_temp_dir())
    if problem is None and args.component == "gcs":
        problem = gcs_problem(args.port)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
