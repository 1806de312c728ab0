"""Pods for the cluster tier, as a node's kubelet and CNI would give them: each pod its own
network namespace with an address on a bridge (the pod network), Service names resolved by a
hosts file (`ip netns exec` mounts /etc/netns/<namespace>/hosts over /etc/hosts, standing in
for the cluster's DNS), and its own mount namespace, where its own folder is mounted at the
temporary folder every pod names alike (its emptyDir), its own hostname (UTS namespace) and
its own process IDs (PID namespace: a pod sees only its own processes, as Ray's discovery of
its local raylet relies on). As in Kubernetes, a sandbox process (the pause container) holds
the namespaces, so they outlive the container: the container's command line runs inside them
as rendered, and so do the probes, as the kubelet's exec probes.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NETNS_ETC = Path("/etc/netns")


def available() -> str | None:
    """Why pods cannot run here, or None."""
    if os.geteuid() != 0:
        return "pods need root (network and mount namespaces)"
    for tool in ("ip", "nsenter", "mount", "unshare"):
        if shutil.which(tool) is None:
            return f"pods need {tool} (iproute2, util-linux)"
    tried = subprocess.run(
        ["unshare", "--net", "--mount", "true"], capture_output=True, text=True, check=False
    )
    if tried.returncode != 0:
        return f"pods need network and mount namespaces: {tried.stderr.strip()}"
    return None


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Pod:
    name: str
    netns: str
    address: str
    link: str  # the host's end of the pod's veth pair, on the bridge
    own_tmp: Path
    log: Path
    sandbox: subprocess.Popen[bytes] | None = None  # `unshare`, the holder's parent
    holder: int = 0  # the pod's PID 1 (host PID), which holds its namespaces
    process: subprocess.Popen[bytes] | None = None  # the container
    line: str = ""  # the container's command line
    env: dict[str, str] = field(default_factory=dict)

    def _enter(self) -> list[str]:
        assert self.holder, f"pod {self.name} has not started"
        return ["nsenter", "-t", str(self.holder), "-m", "-n", "-u", "-p", "--"]

    def run(self, command: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A command inside the pod, as an exec probe: one that times out has failed, and is
        killed with what nsenter forked for it."""
        process = subprocess.Popen(
            [*self._enter(), *command],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(process)
            return subprocess.CompletedProcess(command, 124, "", f"timed out after {timeout} s")
        return subprocess.CompletedProcess(command, process.returncode, out, err)

    def popen(self, command: Sequence[str], out: Path) -> subprocess.Popen[bytes]:
        """A long-running command inside the pod; its output goes to `out`. End it with
        `stop` (nsenter forks: killing nsenter alone leaves the command running)."""
        with open(out, "wb") as sink:
            return subprocess.Popen(
                [*self._enter(), *command],
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def pids(self) -> list[int]:
        listed = subprocess.run(
            ["ip", "netns", "pids", self.netns], capture_output=True, text=True, check=False
        )
        return [int(p) for p in listed.stdout.split()]

    def inner_pids(self) -> dict[int, int]:
        """The processes in the pod's PID namespace: the PID the pod sees -> the host's."""
        seen = {}
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError, StopIteration):
                status = Path(f"/proc/{pid}/status").read_text()
                line = next(x for x in status.splitlines() if x.startswith("NSpid:"))
                levels = line.split()[1:]
                if len(levels) > 1:  # not `ip netns exec`'s unshare, which is the host's
                    seen[int(levels[-1])] = pid
        return seen

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
        taken = _ip("-o", "addr", "show") + _ip("route", "show")
        while True:  # a /24 of its own, clear of every address and route of the host
            self.prefix = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
            if f"{self.prefix}." not in taken:
                break
        self.host_address = f"{self.prefix}.1"
        self.root = root
        # Every pod mounts its own folder here: short, as Ray's Unix socket paths must be.
        self.shared_tmp = Path(f"/tmp/mlpod-{tag}")
        self.pods: dict[str, Pod] = {}
        self.services: dict[str, str] = {}
        self._made: list[Path] = []  # mount points made on the host's file system
        self._owns_tmp = self._owns_bridge = False

    def __enter__(self) -> PodNetwork:
        try:
            self.shared_tmp.mkdir()
            self._owns_tmp = True
            _ip("link", "add", self.bridge, "type", "bridge")
            self._owns_bridge = True
            _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        for pod in self.pods.values():
            try:
                self._remove(pod)
            except Exception as error:  # the other pods still go
                print(f"removing pod {pod.name}: {error}")
        if self._owns_bridge:  # only what this network made: never a concurrent run's
            with contextlib.suppress(RuntimeError):
                _ip("link", "del", self.bridge)
        if self._owns_tmp:
            shutil.rmtree(self.shared_tmp, ignore_errors=True)
        for made in self._made:  # empty: what was mounted there was the pods' own
            shutil.rmtree(made, ignore_errors=True)

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

    def start(
        self, pod: Pod, line: str, env: Mapping[str, str], mounts: Mapping[str, Path] = {}
    ) -> None:
        """The pod's container: `line` (a shell command line, as KubeRay writes Ray's) with
        `env`, its own folder mounted at the shared temporary path, and each folder of `mounts`
        at its path (its volumes: a ConfigMap's files, a service account's token)."""
        etc = NETNS_ETC / pod.netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(self._hosts(pod))
        # gRPC's own resolver (c-ares) asks DNS servers and skips hosts files: the resolver of
        # the C library reads the pod's hosts file, where the cluster's DNS would answer.
        pod.env = {**env, "GRPC_DNS_RESOLVER": "native"}
        binds = {str(self.shared_tmp): pod.own_tmp, **mounts}
        for target in binds:
            self._made.extend(_missing_top(Path(target)))
        inner = " && ".join(
            f"mkdir -p {shlex.quote(target)} && mount --bind {shlex.quote(str(source))} "
            f"{shlex.quote(target)}"
            for target, source in binds.items()
        )
        inner += f" && hostname {shlex.quote(pod.name)} && exec sleep infinity"
        namespaces = ["unshare", "--uts", "--pid", "--fork", "--mount-proc"]
        pod.sandbox = subprocess.Popen(
            ["ip", "netns", "exec", pod.netns, *namespaces, "bash", "-c", inner],
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not pod.holder:  # its namespaces and mounts are in place
            if time.monotonic() > deadline or pod.sandbox.poll() is not None:
                raise RuntimeError(f"pod {pod.name}: its sandbox did not start ({inner})")
            time.sleep(0.02)
            for child in _children(pod.sandbox.pid):
                if _program(child) == "sleep":
                    pod.holder = child
        pod.line = line
        self._run_container(pod)

    def _run_container(self, pod: Pod) -> None:
        with open(pod.log, "ab") as out:
            pod.process = subprocess.Popen(
                [*pod._enter(), "bash", "-c", f"exec {pod.line}"],
                env=pod.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def restart(self, pod: Pod) -> None:
        """The container killed (every process of the pod but its PID 1, the sandbox) and
        started again, as the kubelet restarts a container: same namespaces, same volumes."""
        deadline = time.monotonic() + 10
        while set(pod.inner_pids()) - {1}:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pod {pod.name}: its container's processes did not end")
            # From inside: -1 is every process of the namespace but its PID 1 and the caller.
            pod.run(["kill", "-KILL", "-1"], timeout=10)
            time.sleep(0.1)
        if pod.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                pod.process.wait(10)
        self._run_container(pod)

    def remove(self, pod: Pod) -> None:
        """The pod deleted: its processes, namespaces and hosts file gone."""
        self._remove(pod)
        del self.pods[pod.name]

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
        with contextlib.suppress(RuntimeError):
            _ip("netns", "del", pod.netns)
        shutil.rmtree(NETNS_ETC / pod.netns, ignore_errors=True)


def _missing_top(path: Path) -> list[Path]:
    """The outermost folder of `path` that does not exist yet ([] if it does)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return [] if missing is None else [missing]


def stop(process: subprocess.Popen[Any]) -> None:
    """End a command started in a pod, with what nsenter forked for it (its session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _program(pid: int) -> str | None:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return None
    return Path(argv0.decode(errors="replace")).name
