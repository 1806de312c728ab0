"""What starting one model process costs: a spawner's fork, the sandbox, the digits model's
load, as a worker does it (`Spawner.spawn`, then `ModelProcess.load`), N in a row:

    .venv/bin/python bench/model_start.py [--models 20]

Prints the median wall time from spawn to loaded, the CPU time per model (the model process
and whatever it ran, reaped here: this process is their subreaper, as the worker is; and the
spawner's share, its forks) and a loaded model process's proportional set size (read from
/proc: needs root or CAP_SYS_PTRACE, as a model process is not dumpable). The spawner is
started from wherever `modelloader_workers` was imported (PYTHONPATH picks the code).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

from modelloader_workers import model_process, spawner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replicas import pss_kib

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "01-digits" / "digits.tflite"


def _cpu_ms_of(pid: int) -> float:
    """CPU of `pid` and of its reaped children, in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK") * 1000


def _children_cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=20)
    args = parser.parse_args()
    print(f"code: {Path(spawner.__file__).parent}")
    started = spawner.Spawner.start()
    if started is None:
        raise SystemExit("no spawner here: it needs pidfds and a child subreaper (Linux)")
    spawner_pid = started.pid
    started.spawn().stop()  # the spawner has imported everything and forked once
    request = model_process.ProcessLoad(model=str(DIGITS), memory_limit=256 << 20)
    walls: list[float] = []
    sizes: list[int] = []
    children, forks = _children_cpu_ms(), _cpu_ms_of(spawner_pid)
    for i in range(args.models):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(f"\0model-start-{os.getpid()}-{i}")
        listener.listen()
        began = time.perf_counter()
        process = started.spawn()
        process.load(request, listener)
        walls.append((time.perf_counter() - began) * 1000)
        sizes.append(pss_kib(process.pid))
        process.stop()
        listener.close()
    cpu = (_children_cpu_ms() - children + _cpu_ms_of(spawner_pid) - forks) / args.models
    started.stop()
    print(
        f"{args.models} model processes: spawn to loaded, median {statistics.median(walls):.1f}"
        f" ms of wall time; {cpu:.1f} ms of CPU per model; a loaded one's PSS, median"
        f" {statistics.median(sizes) / 1024:.1f} MiB"
    )


if __name__ == "__main__":
    main()
