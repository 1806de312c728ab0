"""Pods for the cluster tier, as a node's kubelet and CNI would give them: each pod its own
network namespace with an address on a bridge (the pod network), Service names resolved by a
hosts file (`ip netns exec` mounts /etc/netns/<namespace>/hosts over /etc/hosts, standing in
for the cluster's DNS), and its own mount namespace, where its own folder is mounted at the
temporary folder every pod names alike (its emptyDir). As in Kubernetes, a sandbox process
(the pause container) holds the namespaces, so they outlive the container: the container's
command line runs inside them as rendered, and so do the probes, as the kubelet's exec probes.

Needs root and iproute2; `available()` says why not, for a test to skip (or fail under CI).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

NETNS_ETC = Path("/etc/netns")


def available() -> str | None:
    """Why pods cannot run here, or None."""
    if os.geteuid() != 0:
        return "pods need root (network and mount namespaces)"
    for tool in ("ip", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"pods need {tool} (iproute2, util-linux)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Pod:
    name: str
    netns: str
    address: str
    link: str  # the host's end of the pod's veth pair, on the bridge
    own_tmp: Path
    log: Path
    sandbox: subprocess.Popen[bytes] | None = None  # holds the namespaces
    process: subprocess.Popen[bytes] | None = None  # the container
    env: dict[str, str] = field(default_factory=dict)

    def _enter(self) -> list[str]:
        assert self.sandbox is not None, f"pod {self.name} has not started"
        return ["nsenter", "-t", str(self.sandbox.pid), "-m", "-n", "--"]

    def run(self, command: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A command inside the pod (its network and mount namespaces), as an exec probe."""
        return subprocess.run(
            [*self._enter(), *command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def popen(self, command: Sequence[str], out: Path) -> subprocess.Popen[bytes]:
        """A long-running command inside the pod; its output goes to `out`."""
        with open(out, "wb") as sink:
            return subprocess.Popen(
                [*self._enter(), *command],
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    def pids(self) -> list[int]:
        listed = subprocess.run(
            ["ip", "netns", "pids", self.netns], capture_output=True, text=True, check=False
        )
        return [int(p) for p in listed.stdout.split()]

    def program_pid(self, program: str) -> int:
        """The pid of the pod's process running `program` (e.g. raylet)."""
        for pid in self.pids():
            if _program(pid) == program:
                return pid
        raise LookupError(f"no {program} in pod {self.name}")

    def cut_off(self) -> None:
        """Its link down: the pod is alive but unreachable, as a node that lost its network."""
        _ip("link", "set", self.link, "down")


class PodNetwork:
    """A bridge and the pods on it. `services`: name -> pod name, written into every pod's
    hosts file (a Service resolving to its one pod); the bridge's own address is named
    `kubernetes` (the API server's Service), for what the test serves from the host."""

    def __init__(self, root: Path) -> None:
        tag = secrets.token_hex(2)
        self.tag = tag
        self.bridge = f"mlbr{tag}"
        self.prefix = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
        self.host_address = f"{self.prefix}.1"
        self.root = root
        # Every pod mounts its own folder here: short, as Ray's Unix socket paths must be.
        self.shared_tmp = Path(f"/tmp/mlpod-{tag}")
        self.pods: dict[str, Pod] = {}
        self.services: dict[str, str] = {}

    def __enter__(self) -> PodNetwork:
        self.shared_tmp.mkdir()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def __exit__(self, *_: object) -> None:
        for pod in self.pods.values():
            self._remove(pod)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.bridge)
        shutil.rmtree(self.shared_tmp, ignore_errors=True)

    def add(self, name: str) -> Pod:
        index = len(self.pods) + 2
        netns = f"ml{self.tag}-{name}"
        link = f"vh{self.tag}{index}"
        pod = Pod(
            name,
            netns,
            f"{self.prefix}.{index}",
            link,
            own_tmp=self.root / name / "tmp",
            log=self.root / name / "container.log",
        )
        pod.own_tmp.mkdir(parents=True)
        _ip("netns", "add", netns)
        self.pods[name] = pod
        _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", link, "master", self.bridge, "up")
        _ip("-n", netns, "addr", "add", f"{pod.address}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "route", "add", "default", "via", self.host_address)
        return pod

    def serve(self, service: str, pod: str) -> None:
        self.services[service] = pod

    def _hosts(self, pod: Pod) -> str:
        lines = ["127.0.0.1 localhost", f"{pod.address} {pod.name}"]
        lines.append(f"{self.host_address} kubernetes kubernetes.default.svc")
        for service, target in sorted(self.services.items()):
            lines.append(f"{self.pods[target].address} {service}")
        return "\n".join(lines) + "\n"

    def start(self, pod: Pod, line: str, env: Mapping[str, str]) -> None:
        """The pod's container: `line` (a shell command line, as KubeRay writes Ray's) with
        `env`, its own folder mounted at the shared temporary path."""
        etc = NETNS_ETC / pod.netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(self._hosts(pod))
        # gRPC's own resolver (c-ares) asks DNS servers and skips hosts files: the resolver of
        # the C library reads the pod's hosts file, where the cluster's DNS would answer.
        pod.env = {**env, "GRPC_DNS_RESOLVER": "native"}
        inner = (
            f"mount --bind {shlex.quote(str(pod.own_tmp))} {shlex.quote(str(self.shared_tmp))}"
            " && exec sleep infinity"
        )
        pod.sandbox = subprocess.Popen(
            ["ip", "netns", "exec", pod.netns, "bash", "-c", inner], start_new_session=True
        )
        deadline = time.monotonic() + 10
        while _program(pod.sandbox.pid) != "sleep":  # its namespaces and mounts are in place
            assert time.monotonic() < deadline and pod.sandbox.poll() is None, "no sandbox"
            time.sleep(0.02)
        with open(pod.log, "wb") as out:
            pod.process = subprocess.Popen(
                [*pod._enter(), "bash", "-c", f"exec {line}"],
                env=pod.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _remove(self, pod: Pod) -> None:
        # Every process in its network namespace: the container's and what it started (Ray's
        # daemons leave the process group).
        for _ in range(3):
            pids = pod.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        for process in (pod.process, pod.sandbox):
            if process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(10)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", pod.netns)
        shutil.rmtree(NETNS_ETC / pod.netns, ignore_errors=True)


def _program(pid: int) -> str | None:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return None
    return Path(argv0.decode(errors="replace")).name


@contextlib.contextmanager
def pod_network(root: Path) -> Iterator[PodNetwork]:
    with PodNetwork(root) as network:
        yield network
