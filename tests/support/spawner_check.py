"""Model processes forked by a spawner, observed from their supervisor: run as a process of its
own (`python -m tests.support.spawner_check MODEL FOLDER`), because it makes itself a child
subreaper, which a test runner must not become. Prints what it saw as one JSON line, waits for
a line on stdin, kills the first model process, prints how it died, and stops."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from modelloader_workers.listeners import listen
from modelloader_workers.model_process import ProcessLoad
from modelloader_workers.spawner import Spawner
from modelloader_workers.wire.address import Address


def status_fields(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def holdings(pid: int) -> dict[str, Any]:
    """Its descriptors and environment: read before its load, while it is still dumpable
    (after, only a ptrace-capable reader may look)."""
    proc = Path(f"/proc/{pid}")
    return {
        "fds": {fd.name: os.readlink(fd) for fd in (proc / "fd").iterdir()},
        "environment": sorted(
            k.split("=", 1)[0]
            for k in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
            if k
        ),
    }


def seccomp(pid: int) -> list[str]:
    """Each thread's seccomp mode (its status is readable by anyone)."""
    modes = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            modes.append(_mode(task))
    return modes


def _mode(task: Path) -> str:
    status = (task / "status").read_text()
    return next(x for x in status.splitlines() if x.startswith("Seccomp:")).split()[1]


def main(model: str, folder: str) -> None:
    spawner = Spawner.start()
    assert spawner is not None, "this kernel cannot adopt: no child subreaper"
    processes = [spawner.spawn(), spawner.spawn()]
    report: dict[str, Any] = {"supervisor": os.getpid(), "models": []}
    for index, process in enumerate(processes):
        before = holdings(process.pid)
        listener, address = listen(Address("unix", f"{folder}/m{index}.sock"))
        loaded = process.load(ProcessLoad(model=model), listener)
        listener.close()
        report["models"].append(
            {
                "pid": process.pid,
                "address": address.where,
                "sandbox": loaded.sandbox,
                "ppid": int(status_fields(process.pid)["PPid"]),
                "seccomp": seccomp(process.pid),
            }
            | before
        )
    print(json.dumps(report), flush=True)
    sys.stdin.readline()
    os.kill(processes[0].pid, signal.SIGKILL)
    code = processes[0].wait(10)
    print(
        json.dumps({"code": code, "death": processes[0]._death(), "other": processes[1].running}),
        flush=True,
    )
    for process in processes:
        process.stop()
    spawner.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
