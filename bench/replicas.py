"""Replicas and autoscaling, measured side by side in one run of `modelloader local`:

    .venv/bin/python bench/replicas.py [--quick] [--no-write]

- throughput of MobileNetV2 uint8 with 1 and with 2 replicas, each `threads: 1` (rounds of
  two adjacent windows, clients at 2x the replicas), and after it the same rounds for the
  interpreter alone in 1 and in 2 processes: what this host gives a second core, measured
  in the same minutes;
- the first request to a model its autoscaler scaled to zero, with the warm pool;
- the memory a second replica adds, as proportional set size (shared pages counted once);
- requests lost while one of two replicas is SIGKILLed under load.

Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mobilenet
from dataplane import (
    MODEL_CACHE,
    Poster,
    binary_request,
    machine,
    modelloader_local,
    throughput,
    variants,
    versions,
    write_results,
)
from modelloader import control_channel
from modelloader_workers.litert_runner import LiteRTRunner

TITLE = "# Replicas and autoscaling: throughput, scale from zero, memory, a replica killed"


def manifest(name: str, uri: str, **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "modelloader.dev/v1alpha1",
            "kind": "LoadedModel",
            "metadata": {"name": name},
            "spec": {"source": {"uri": uri}, "accelerator": "cpu", "threads": 1, **spec},
        }
    )


def status(state_dir: Path, name: str) -> dict[str, Any]:
    items = control_channel.fetch(state_dir)["items"]
    return dict(next(i["status"] for i in items if i["name"] == name))


def wait(state_dir: Path, name: str, check: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    found: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:  # before the control channel is up, or the model listed: keep asking
            found = status(state_dir, name)
        except (control_channel.ControlUnavailable, StopIteration):
            time.sleep(0.1)
            continue
        if check(found):
            return found
        time.sleep(0.02)
    raise TimeoutError(f"{name}: {found}")


def pss_kib(pid: int) -> int:
    """Proportional set size: each shared page counted once across the processes sharing it."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def children_named(parent: int, comm: str) -> list[int]:
    """The children of `parent` whose comm (what `ps` shows) is `comm`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1]
        if name == comm and int(fields.split()[1]) == parent:
            found.append(int(entry.name))
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def node_pss(root: int) -> int:
    """PSS of `root` and all its descendants (the whole of `modelloader local`: Ray included)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(text.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack += [p for p, parent in parents.items() if parent == pid]
    total = 0
    for pid in tree:
        try:
            total += pss_kib(pid)
        except OSError:
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    window, rounds, cold_runs = (1.0, 2, 2) if args.quick else (3.0, 8, 5)
    path = mobilenet.build(MODEL_CACHE)["uint8"]
    variant = variants({"uint8": path})[0]
    work = Path(tempfile.mkdtemp(prefix="mlrep-"))
    shutil.copy(path, work / "m.tflite")
    (work / "one.yaml").write_text(manifest("one", "file://m.tflite"))
    (work / "two.yaml").write_text(manifest("two", "file://m.tflite", replicas=2))
    (work / "sleepy.yaml").write_text(
        manifest(
            "sleepy",
            "file://m.tflite",
            autoscaling={
                "minReplicas": 0,
                "maxReplicas": 1,
                "scaleDownDelaySeconds": 1,
                "scaleToZeroAfterSeconds": 2,
            },
        )
    )
    results: dict[str, Any] = {}
    try:
        with modelloader_local(work, {}) as (port, state_dir, _, pid):
            for name in ("one", "two"):
                wait(
                    state_dir,
                    name,
                    lambda s: s.get("phase") == "Ready" and s.get("readyReplicas", 0) >= 1,
                )
            # Loaded, and maybe scaled to zero already (2 s idle) while the others loaded.
            wait(state_dir, "sleepy", lambda s: s.get("phase") == "Ready")
            wait(state_dir, "two", lambda s: s.get("readyReplicas") == 2)
            body, header_length = binary_request(variant.input_name, variant.datatype, variant.x)
            headers = {"Inference-Header-Content-Length": header_length}

            def poster(name: str) -> Any:
                return lambda: Poster(port, f"/v2/models/{name}/infer", body, headers)

            # 1. Throughput, 1 vs 2 replicas (threads: 1 each), clients at 2x the replicas,
            # in rounds of two adjacent windows (order alternating): each round's ratio is
            # taken from windows a few seconds apart, so the host's slower spells, which last
            # longer than a round here, fall on both sides of it.
            print("throughput", flush=True)
            rates: dict[str, list[float]] = {"one": [], "two": []}
            for round_ in range(rounds):
                order = (("one", 2), ("two", 4)) if round_ % 2 == 0 else (("two", 4), ("one", 2))
                for name, clients in order:
                    rates[name].append(throughput(poster(name), clients, window))
            results["rps"] = rates
            # The same rounds for the interpreter alone, in 1 and in 2 processes, right after:
            # what this host gives a second core in the same minutes, with nothing between.
            results["raw_rps"] = raw_rounds(
                str(path), variant.input_name, variant.x, rounds, window
            )

            # 2. Memory: the worker processes of `one` and of `two`, and the whole tree.
            placements = status(state_dir, "two")["replicaPlacements"]
            one_pid = status(state_dir, "one")["placement"]["pid"]
            results["pss"] = {
                "one": pss_kib(one_pid),
                "supervisor": pss_kib(parent_of(one_pid)),
                "spawner": sum(
                    pss_kib(c) for c in children_named(parent_of(one_pid), "ml-spawner")
                ),
                "two": [pss_kib(p["pid"]) for p in placements],
            }
            before = node_pss(pid)
            (work / "one.yaml").write_text(manifest("one", "file://m.tflite", replicas=2))
            wait(state_dir, "one", lambda s: s.get("readyReplicas") == 2)
            time.sleep(1.0)
            results["tree"] = (before, node_pss(pid))

            # 3. A replica SIGKILLed under load: requests lost.
            print("a replica killed", flush=True)
            sent, failed = [0], []
            stop = threading.Event()

            def client() -> None:
                call = poster("two")()
                while not stop.is_set():
                    try:
                        call()
                        sent[0] += 1
                    except (RuntimeError, OSError) as error:
                        failed.append(str(error))
                        call = poster("two")()

            threads = [threading.Thread(target=client) for _ in range(4)]
            for thread in threads:
                thread.start()
            time.sleep(2.0)
            victim = status(state_dir, "two")["replicaPlacements"][0]["pid"]
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            back = wait(
                state_dir,
                "two",
                lambda s: (
                    s.get("readyReplicas") == 2
                    and victim not in {p["pid"] for p in s["replicaPlacements"]}
                ),
            )
            recovered = time.monotonic() - killed
            time.sleep(1.0)
            stop.set()
            for thread in threads:
                thread.join()
            results["kill"] = {
                "requests": sent[0],
                "failed": len(failed),
                "replaced_seconds": recovered,
                "errors": failed[:3],
                "ready": back["ready"],
            }

            # 4. The first request to a model scaled to zero (warm pool).
            print("scale from zero", flush=True)
            firsts = []
            for _ in range(cold_runs):
                wait(state_dir, "sleepy", lambda s: s.get("desiredReplicas") == 0, timeout=60)
                wait(state_dir, "sleepy", lambda s: s.get("replicas") == 0, timeout=60)
                time.sleep(0.5)  # let the warm pool refill
                started = time.monotonic()
                call = poster("sleepy")()
                call()
                firsts.append(time.monotonic() - started)
                call.close()
            results["from_zero"] = firsts
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = report(results, args)
    print(section)
    if not args.no_write:
        write_results(section, TITLE)


def round_ratios(rates: dict[str, list[float]]) -> list[float]:
    return [t / o for o, t in zip(rates["one"], rates["two"], strict=True)]


def paired_ratio(rates: dict[str, list[float]]) -> float:
    return statistics.median(round_ratios(rates))


def ratio_range(rates: dict[str, list[float]]) -> str:
    ratios = round_ratios(rates)
    return f"{min(ratios):.2f} to {max(ratios):.2f}"


def _invoke_loop(path: str, input_name: str, x: Any, seconds: float, go: Any, reports: Any) -> None:
    """One process: the interpreter (threads 1) called back to back, through the runner the
    model process uses; puts its rate."""
    runner = LiteRTRunner(path, threads=1)
    inputs = {input_name: x}
    runner.run(inputs)  # the first call prepares XNNPACK's operators
    reports.put(None)  # ready
    go.get(timeout=120)  # the processes of a window start together
    calls, began = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - began) < seconds:
        runner.run(inputs)
        calls += 1
    reports.put(calls / elapsed)


def raw_rounds(
    path: str, input_name: str, x: Any, rounds: int, window: float
) -> dict[str, list[float]]:
    """The interpreter in 1 and in 2 processes, in rounds of adjacent windows as above."""
    context = multiprocessing.get_context("spawn")
    rates: dict[str, list[float]] = {"one": [], "two": []}
    for round_ in range(rounds):
        for name in ("one", "two") if round_ % 2 == 0 else ("two", "one"):
            go, got = context.Queue(), context.Queue()
            processes = [
                context.Process(
                    target=_invoke_loop, args=(path, input_name, x, window, go, got), daemon=True
                )
                for _ in range(1 if name == "one" else 2)
            ]
            try:
                for process in processes:
                    process.start()
                for _ in processes:
                    got.get(timeout=60)  # each started, loaded and past its first call
                for _ in processes:
                    go.put(None)
                rates[name].append(sum(got.get(timeout=60) for _ in processes))
            finally:  # one that failed leaves none behind waiting for its window
                for process in processes:
                    if process.is_alive():
                        process.join(5)
                    if process.is_alive():
                        process.terminate()
                        process.join()
    return rates


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    rps, raw = results["rps"], results["raw_rps"]
    one, two = results["pss"]["one"], results["pss"]["two"]
    supervisor = results["pss"]["supervisor"]
    spawner = results["pss"]["spawner"]
    first = one + supervisor + spawner
    before, after = results["tree"]
    kill = results["kill"]
    firsts = results["from_zero"]
    command = " ".join([".venv/bin/python", "bench/replicas.py", *sys.argv[1:]])
    added = after - before
    rows = [
        (
            f"throughput, 2 replicas vs 1 (clients 4 vs 2; {len(rps['one'])} rounds of two "
            "adjacent windows: medians, and the median of the rounds' ratios)",
            f"{statistics.median(rps['two']):.1f} vs {statistics.median(rps['one']):.1f} "
            f"req/s: **{paired_ratio(rps):.2f}x** (rounds {ratio_range(rps)})",
            ">= 1.8x",
        ),
        (
            "the interpreter alone, 2 processes vs 1 (threads 1, same rounds, after the above)",
            f"{statistics.median(raw['two']):.1f} vs {statistics.median(raw['one']):.1f} "
            f"invokes/s: {paired_ratio(raw):.2f}x (rounds {ratio_range(raw)})",
            "",
        ),
        (
            "first request to a model scaled to zero, warm pool",
            f"median {statistics.median(firsts):.2f} s (min {min(firsts):.2f}, "
            f"max {max(firsts):.2f}; {len(firsts)} runs)",
            "<= 1 s",
        ),
        (
            "a replica's model process (PSS)",
            f"alone {one / 1024:.1f} MiB; the two of a 2-replica model "
            + ", ".join(f"{p / 1024:.1f}" for p in two)
            + " MiB",
            "",
        ),
        (
            "the origin's worker on the node, supervising every model process above, and "
            "its spawner, which forks them (PSS)",
            f"{supervisor / 1024:.1f} and {spawner / 1024:.1f} MiB",
            "",
        ),
        (
            "what a second replica adds (every process of `modelloader local`, PSS)",
            f"{added / 1024:.1f} MiB, **{added / first:.0%}** of the first replica "
            f"({first / 1024:.1f} MiB: its model process, the worker and spawner it needs)",
            "<= 25%",
        ),
        (
            "a replica SIGKILLed under load (4 clients, 2 replicas)",
            f"**{kill['failed']} failed** of {kill['requests']}; replaced and both ready "
            f"in {kill['replaced_seconds']:.2f} s",
            "0 failed",
        ),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return f"""{TITLE}

Machine: {machine()}. Versions: {versions()}.
Date: {time.strftime("%Y-%m-%d %H:%M %Z")}. Command: `{command}`.
MobileNetV2 uint8 on `modelloader local` (warm pool of 2), each replica `threads: 1`.

| what | measured | target |
| --- | --- | --- |
{table}
"""


if __name__ == "__main__":
    main()
