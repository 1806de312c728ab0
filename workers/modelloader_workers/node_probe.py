"""Readiness and liveness of a Ray pod, for the chart's probes.

KubeRay injects probes into Ray pods that ask Ray's dashboard agent (`:52365`) and, on the head,
the dashboard (`:8265`); both come with `ray[default]`, which the runtime image does not carry
(the data plane needs neither: an agent process per node and some twenty packages for nothing
else). The chart sets these probes instead, and KubeRay injects none where a container has its
own. They ask Ray itself, as cheaply as a probe should (no `import ray`, tens of milliseconds):

  python -m modelloader_workers.node_probe raylet        the container's raylet is alive
  python -m modelloader_workers.node_probe gcs [--port]  and the GCS accepts on its port

Exit 0 when healthy, else 1 with the reason on stderr. Ray's session folder is found as Ray
finds it: the head's `temp-dir` (`--temp-dir`, which worker nodes also take from the head), else
`$RAY_TMPDIR`, `$TMPDIR` or /tmp, then `ray/session_latest`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

TIMEOUT_SECONDS = 2.0
GCS_PORT = 6379  # `ray start --head`'s default, and KubeRay's


def raylet_problem(temp_dir: Path) -> str | None:
    """The raylet's socket is there and a raylet process of this container (this mount
    namespace: the probe runs in the container's) is alive. Not a connection to the socket:
    the raylet logs every unregistered client that leaves, which a probe every few seconds
    would fill its log with."""
    path = temp_dir / "session_latest" / "sockets" / "raylet"
    if not path.exists():
        return f"no raylet socket at {path}: Ray has not started on this node"
    if not _alive("raylet"):
        return "the raylet process is gone (its socket remains)"
    return None


def _alive(name: str) -> bool:
    """A process called `name` in this mount namespace, not a zombie."""
    here = os.readlink("/proc/self/ns/mnt")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != name:
                continue
            if os.readlink(entry / "ns" / "mnt") != here:
                continue
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            return True
    return False


def gcs_problem(port: int, host: str = "127.0.0.1") -> str | None:
    try:
        socket.create_connection((host, port), timeout=TIMEOUT_SECONDS).close()
    except OSError as error:
        return f"the GCS does not accept on {host}:{port}: {error.strerror or error}"
    return None


def ray_temp_dir(temp_dir: str | None = None) -> Path:
    """Where Ray keeps its sessions: its own order (ray._common.utils.get_user_temp_dir)."""
    if temp_dir:
        return Path(temp_dir)
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelloader_workers.node_probe")
    parser.add_argument("component", choices=["raylet", "gcs"])
    parser.add_argument("--port", type=int, default=GCS_PORT, help="the GCS port (gcs)")
    parser.add_argument("--temp-dir", default=None, help="the head's rayStartParams temp-dir")
    args = parser.parse_args(argv)
    problem = raylet_problem(ray_temp_dir(args.temp_dir))
    if problem is None and args.component == "gcs":
        problem = gcs_problem(args.port)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
