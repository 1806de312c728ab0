"""Dynamic batching: throughput and latency with it on and off, against the raw interpreter's
batch-1 loop, side by side in one run.

    .venv/bin/python bench/batching.py [--quick] [--no-write]

The digits model (examples/01-digits) and MobileNetV2 224 uint8 and float32 (`threads: 2`),
each loaded three times by one `modelloader local`: without batching, with `maxBatchSize: 16`
and no queue delay (a batch is what arrived while the interpreter ran the last one), and with
a delay of DELAY_US. At concurrency 1, 4 and 16, perf_analyzer (`-i http`, binary tensors,
the same image in every request; fetched as `protocols.py` fetches it) drives the three one
after another (at 1 client ROUNDS_AT_ONE times, the order alternating), and the raw
interpreter's batch-1 loop (`LiteRTRunner.run` in this process, back to back) runs before
each model and after each concurrency. perf_analyzer rather than Python client threads: on 2
cores the client's own CPU time is taken from the server's, and perf_analyzer's is the
smaller. The mean batch comes from Triton's statistics (inferences per execution).

Each served run also reads from /proc what each part of the machine spent per request (the
gateway's process, the model processes, perf_analyzer, the rest), and at the end
perf_analyzer drives a server that answers at once (`fixed_answer.py`) with the digits request:
the rate these two cores allow when serving costs nothing.

First of all, the worker alone (no Ray, no HTTP: the gateway's own links to a `WorkerServer`
in this process, one per configuration, all on one interpreter), one request at a time, the
configurations interleaved call by call, for what batching adds to a lone request's latency
without the rest of the path's noise; and how late the serving thread's timed waits wake on
this machine, with the serving thread's timer slack and with Linux's default
(`worker_server.WAKE_LATE`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mobilenet
from dataplane import (
    MODEL_CACHE,
    REPO,
    Poster,
    RawRunner,
    Variant,
    machine,
    modelloader_local,
    variants,
    versions,
    wait_phase,
    write_results,
)
from modelloader_gateway.worker_client import WorkerClients, request_prefix
from modelloader_workers import worker_server
from modelloader_workers.batch_runner import check_batchable
from modelloader_workers.batching import BatchPolicy
from modelloader_workers.litert_runner import LiteRTRunner
from modelloader_workers.model_process import PROCESS_NAME
from modelloader_workers.wire import ipc
from modelloader_workers.wire.address import Address
from modelloader_workers.worker_server import WorkerServer, tighten_timer_slack
from protocols import (
    Settings,
    cpu_seconds,
    fixed_answers,
    input_data,
    perf_analyzer,
    run_perf_analyzer,
)

TITLE = "# Batching: throughput and latency, on and off, against the raw batch-1 loop"
THREADS = 2
MAX_BATCH = 16
DELAY_US = 2000
CONFIGS = {
    "off": None,
    "on, no delay": {"maxBatchSize": MAX_BATCH},
    f"on, {DELAY_US} us": {"maxBatchSize": MAX_BATCH, "maxQueueDelayMicroseconds": DELAY_US},
}
CONCURRENCY = (1, 4, 16)
ROUNDS_AT_ONE = 3


@dataclass(frozen=True)
class Load:
    per_second: float
    p50_ms: float
    p99_ms: float
    mean_batch: float = 1.0
    # CPU ms per request by part (`Cores`), for served runs
    cpu_ms: dict[str, float] | None = None


class Cores:
    """CPU time by part while perf_analyzer drives the server: `modelloader local` (the
    gateway, with the control loop and Ray's driver beside it), the model processes,
    perf_analyzer (this process's children) and the rest of the machine (Ray, the kernel's
    threads, this process)."""

    def __init__(self, gateway: int) -> None:
        self.gateway = gateway
        self.began = self._now()

    def _now(self) -> dict[str, float]:
        tick = os.sysconf("SC_CLK_TCK")
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
        busy = (sum(ticks) - ticks[3] - ticks[4]) / tick
        models = 0.0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == PROCESS_NAME:
                    models += cpu_seconds(int(entry.name))
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "gateway": cpu_seconds(self.gateway),
            "model processes": models,
            "perf_analyzer": children.ru_utime + children.ru_stime,
            "machine": busy,
        }

    def per_request(self, requests: int) -> dict[str, float]:
        now = self._now()
        used = {part: now[part] - self.began[part] for part in now}
        used["rest"] = used["machine"] - sum(v for k, v in used.items() if k != "machine")
        return {part: seconds * 1000 / max(1, requests) for part, seconds in used.items()}


def under_load(make: Callable[[], Callable[[], None]], concurrency: int, seconds: float) -> Load:
    """`concurrency` threads calling back to back for `seconds`: calls per second and the
    calls' latency."""
    calls = [make() for _ in range(concurrency)]
    timings: list[list[float]] = [[] for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)
    stop = threading.Event()

    def loop(i: int) -> None:
        call, mine = calls[i], timings[i]
        start.wait()
        while not stop.is_set():
            began = time.perf_counter()
            call()
            mine.append(time.perf_counter() - began)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    for call in calls:
        if isinstance(call, Poster):
            call.close()
    every = sorted(t * 1000 for mine in timings for t in mine)
    if not every:
        raise RuntimeError("no call finished")
    return Load(
        len(every) / elapsed,
        statistics.median(every),
        every[min(len(every) - 1, int(len(every) * 0.99))],
    )


def counts(port: int, model: str) -> tuple[int, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/stats") as answer:
        found = json.load(answer)["model_stats"][0]
    return int(found["inference_count"]), int(found["execution_count"])


def digits_variant() -> Variant:
    path = REPO / "examples" / "01-digits" / "digits.tflite"
    samples = json.loads((path.parent / "samples.json").read_text())["samples"]
    x = np.array([samples[3]["pixels"]], np.float32)
    spec = LiteRTRunner(str(path), threads=1).signature.inputs[0]
    return Variant("digits", path, spec.name, spec.datatype, x)


def input_files(variant: Variant, folder: Path) -> dict[bool, Path]:
    """perf_analyzer's input data, by whether the model batches: the same image, with its
    shape whole, or without the batch dimension (which perf_analyzer then adds)."""
    files = {}
    for batched in (False, True):
        shape = list(variant.x.shape[1:] if batched else variant.x.shape)
        content = {"content": variant.x.ravel().tolist(), "shape": shape}
        path = folder / f"{variant.name}-{'batched' if batched else 'whole'}.json"
        path.write_text(json.dumps({"data": [{variant.input_name: content}]}))
        files[batched] = path
    return files


def drive(
    command: list[str],
    port: int,
    model: str,
    concurrency: int,
    data: Path,
    window: float,
    gateway: int,
) -> Load:
    """perf_analyzer against one model: throughput and p50/p99 of its stable windows, the
    mean batch over the run (Triton's statistics), and the CPU per request by part."""
    before = counts(port, model)
    cores = Cores(gateway)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "pa.csv"
        args = [
            *command,
            *("-m", model, "-u", f"127.0.0.1:{port}", "-i", "http"),
            *("--concurrency-range", str(concurrency)),
            *("--measurement-interval", str(int(window * 1000)), "--max-trials", "8"),
            *("--input-data", str(data), "-f", str(out)),
        ]
        for stability in ("25", "60"):
            done = subprocess.run(
                [*args, "--stability-percentage", stability], capture_output=True, text=True
            )
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"perf_analyzer failed on {model}:\n{done.stdout[-1500:]}")
        row = next(csv.DictReader(out.read_text().splitlines()))
    after = counts(port, model)
    return Load(
        float(row["Inferences/Second"]),
        float(row["p50 latency"]) / 1000,
        float(row["p99 latency"]) / 1000,
        (after[0] - before[0]) / max(1, after[1] - before[1]),
        cores.per_request(after[0] - before[0]),
    )


def floor(command: list[str], variant: Variant, folder: Path, window: float) -> dict[int, float]:
    """perf_analyzer against a server that answers at once (`fixed_answer.py`, HTTP), by
    concurrency: requests a second with no model, no worker and no checks, on these cores."""
    data = input_data(variant, folder)
    settings = Settings(window_ms=int(window * 1000), raw_calls=0, raw_window=0, poster_calls=0)
    with fixed_answers(variant) as ports:
        return {
            concurrency: run_perf_analyzer(
                command, variant.name, "REST binary", ports, concurrency, settings, None, data
            ).per_second
            for concurrency in CONCURRENCY
        }


def measure(
    command: list[str], port: int, gateway: int, variant: Variant, window: float, folder: Path
) -> dict[str, Any]:
    raw_runner = RawRunner(variant.path, variant.input_name, variant.x)
    data = input_files(variant, folder)

    def raw() -> Load:
        return under_load(lambda: raw_runner, 1, window)

    def run(config: str, concurrency: int) -> Load:
        return drive(
            command,
            port,
            name(variant.name, config),
            concurrency,
            data[CONFIGS[config] is not None],
            window,
            gateway,
        )

    out: dict[str, Any] = {"raw": [raw()]}
    for turn, concurrency in enumerate(CONCURRENCY):
        # One client: what batching adds to a lone request is a fraction of a millisecond,
        # less than one run's p50 moves here, so the configurations take ROUNDS_AT_ONE turns
        # in alternating order and each keeps its run of median p50.
        rounds = ROUNDS_AT_ONE if concurrency == 1 else 1
        runs: dict[str, list[Load]] = {config: [] for config in CONFIGS}
        for round_ in range(rounds):
            order = list(CONFIGS) if (turn + round_) % 2 == 0 else list(CONFIGS)[::-1]
            for config in order:
                runs[config].append(run(config, concurrency))
        out[concurrency] = {
            config: sorted(loads, key=lambda load: load.p50_ms)[len(loads) // 2]
            for config, loads in runs.items()
        }
        out["raw"].append(raw())
    return out


def policy(config: str) -> BatchPolicy | None:
    found = CONFIGS[config]
    if found is None:
        return None
    return BatchPolicy(found["maxBatchSize"], found.get("maxQueueDelayMicroseconds", 0) / 1e6)


def worker_alone(variant: Variant, folder: Path, calls: int) -> dict[str, float]:
    """p50 (ms) of one request at a time to a WorkerServer of each configuration, through
    the gateway's links, the configurations interleaved call by call (so the host's drift
    falls on each alike). Every server runs the same interpreter (grown to a full batch once,
    as a batching model's is at load), so the configurations differ in the serving path
    alone. One request is in flight at a time, so no two servers use it at once."""
    runner = LiteRTRunner(str(variant.path), threads=THREADS)
    check_batchable(runner, MAX_BATCH)
    entries, buffers = ipc.describe({variant.input_name: variant.x})
    prefix = request_prefix(entries, [])
    servers = {}
    for index, config in enumerate(CONFIGS):
        address = Address("unix", str(folder / f"alone-{index}.sock"))
        servers[config] = (WorkerServer(runner, address, batching=policy(config)), address)

    async def interleaved() -> dict[str, list[float]]:
        clients = WorkerClients()
        timings: dict[str, list[float]] = {config: [] for config in CONFIGS}
        for call in range(calls):
            # Each configuration first, second and third in turn (ABC, BCA, CAB).
            names = list(CONFIGS)
            shift = call % len(names)
            for config in names[shift:] + names[:shift]:
                future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                began = time.perf_counter()
                clients.submit(servers[config][1], prefix, buffers, future.set_result)
                await future
                timings[config].append(time.perf_counter() - began)
        clients.close()
        return timings

    try:
        got = asyncio.run(interleaved())
    finally:
        for server, _ in servers.values():
            server.close()
    return {
        config: statistics.median(values[calls // 10 :]) * 1000 for config, values in got.items()
    }


def wake_late(tight: bool, waits: int = 300) -> tuple[float, float]:
    """How late (p50, p90 in microseconds) a 2 ms wait of select() and sleep() ends here, in
    a thread of its own; `tight`: its timer slack tightened, as the serving thread's is."""
    import selectors
    import socket

    late: list[float] = []

    def measure() -> None:
        if tight:
            tighten_timer_slack()
        a, b = socket.socketpair()
        with selectors.DefaultSelector() as selector:
            selector.register(a, selectors.EVENT_READ)
            for _ in range(waits):
                began = time.perf_counter()
                while (left := 0.002 - (time.perf_counter() - began)) > 0:
                    if left < 0.001:
                        time.sleep(left)
                    else:
                        selector.select(int(left * 1000) / 1000)
                late.append((time.perf_counter() - began - 0.002) * 1e6)
        a.close()
        b.close()

    thread = threading.Thread(target=measure)
    thread.start()
    thread.join()
    late.sort()
    return statistics.median(late), late[int(len(late) * 0.9)]


def name(model: str, config: str) -> str:
    return f"{model}-{list(CONFIGS).index(config)}"


def manifest(model: str, file: str, batching: dict[str, int] | None) -> str:
    spec: dict[str, Any] = {"source": {"uri": f"file://{file}"}, "accelerator": "cpu"}
    spec["threads"] = THREADS
    if batching is not None:
        spec["batching"] = batching
    return json.dumps(
        {
            "apiVersion": "modelloader.dev/v1alpha1",
            "kind": "LoadedModel",
            "metadata": {"name": model},
            "spec": spec,
        }
    )


def report(
    results: dict[str, dict[str, Any]], alone: dict[str, Any], command: str, window: float
) -> str:
    lines = [
        TITLE,
        "",
        f"Machine: {machine()}. Versions: {versions()}.",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Command: `{command}`.",
        f"`modelloader local`, `threads: {THREADS}`, batching `maxBatchSize: {MAX_BATCH}`; "
        f"perf_analyzer 2.60 (`-i http`, binary tensors) with windows of {window:g} s, stable "
        "to 25% over three (60% where the host would not settle). Raw: the interpreter's "
        "batch-1 loop in the bench's process (one caller), its median over the runs before "
        "and between the concurrencies. At 1 client each configuration ran "
        f"{ROUNDS_AT_ONE} times, the order alternating, and shows its run of median p50; at 4 "
        "and 16, once each.",
        "",
        "| model | clients | configuration | req/s | vs off | vs raw b1 | p50 ms | p99 ms | "
        "mean batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, found in results.items():
        raw = statistics.median(x.per_second for x in found["raw"])
        lines.append(f"| {model} | raw b1 | | {raw:.1f} | | 1.00 | | | |")
        for concurrency in CONCURRENCY:
            off = found[concurrency]["off"].per_second
            for config, load in found[concurrency].items():
                lines.append(
                    f"| {model} | {concurrency} | {config} | {load.per_second:.1f} | "
                    f"{load.per_second / off:.2f} | {load.per_second / raw:.2f} | "
                    f"{load.p50_ms:.2f} | {load.p99_ms:.2f} | {load.mean_batch:.2f} |"
                )
    lines += [
        "",
        "## 16 clients: where the two cores go (CPU ms per request)",
        "",
        "Read from /proc over each perf_analyzer run: `modelloader local` (the gateway, with the "
        "control loop and Ray's driver beside it), the model processes, perf_analyzer, and the "
        "rest of the machine's busy time (Ray's processes, the kernel, this bench). Two cores "
        "give 2000 ms a second, so `all` bounds the rate: 2000 / all requests a second.",
        "",
        "| model | configuration | req/s | gateway | model processes | perf_analyzer | rest | "
        "all |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, found in results.items():
        for config, load in found[16].items():
            cpu = load.cpu_ms or {}
            cells = [cpu.get(k, 0.0) for k in ("gateway", "model processes", "perf_analyzer")]
            lines.append(
                f"| {model} | {config} | {load.per_second:.1f} | "
                + " | ".join(f"{v:.3f}" for v in cells)
                + f" | {cpu.get('rest', 0.0):.3f} | {cpu.get('machine', 0.0):.3f} |"
            )
    if "floor" in results.get("digits", {}):
        fixed = results["digits"]["floor"]
        twice = 2 * results["digits"][16]["off"].per_second
        lines += [
            "",
            "The floor: perf_analyzer against a server that answers at once "
            "(`bench/fixed_answer.py`, HTTP, the digits request; no model, no worker, no "
            "checks), on the same cores: "
            + " / ".join(f"{fixed[c]:.0f}" for c in CONCURRENCY)
            + f" requests a second at {' / '.join(str(c) for c in CONCURRENCY)} clients. "
            f"Twice digits' unbatched rate at 16 clients is {twice:.0f} requests a second: "
            f"{2000 / twice:.3f} ms of the two cores per request, everything included.",
        ]
    alone = dict(alone)
    if alone:
        late = alone.pop("_late")
        loose = alone.pop("_late_default")
        lines += [
            "",
            "## A lone request, the worker alone (p50 ms, one request at a time)",
            "",
            "The gateway's links to a `WorkerServer` per configuration in the bench's "
            "process, all on one interpreter, the configurations interleaved call by call: "
            "no Ray, no HTTP, so what batching adds to a request that waits for no one shows "
            "without the rest of the path's noise. A 2 ms timed wait as the serving thread "
            f"makes it, its timer slack tightened, wakes {late[0]:.0f} us late at the median "
            f"here ({late[1]:.0f} us at p90; with Linux's default slack {loose[0]:.0f} and "
            f"{loose[1]:.0f} us), and batches are cut short by "
            f"{worker_server.WAKE_LATE * 1e6:.0f} us (`WAKE_LATE`).",
            "",
            "| model | " + " | ".join(CONFIGS) + " |",
            "| --- |" + " --- |" * len(CONFIGS),
        ]
        for model, found in alone.items():
            off = found["off"]
            cells = [f"{off:.3f}"] + [
                f"{found[c]:.3f} ({found[c] - off:+.3f})" for c in list(CONFIGS)[1:]
            ]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "## Against the targets", "", "| target | measured |", "| --- | --- |"]
    if "uint8" in results:
        found = results["uint8"]
        raw = statistics.median(x.per_second for x in found["raw"])
        best = max(found[16][c].per_second for c in CONFIGS if c != "off")
        lines.append(
            f"| MobileNetV2 uint8, 16 clients, batching >= 1.0x raw b1 | {best / raw:.2f}x "
            f"(off: {found[16]['off'].per_second / raw:.2f}x) |"
        )
    if "digits" in results:
        found = results["digits"]
        best = max(found[16][c].per_second for c in CONFIGS if c != "off")
        lines.append(
            f"| digits, 16 clients, batching >= 2x off | "
            f"{best / found[16]['off'].per_second:.2f}x |"
        )
    for model, found in alone.items():
        for config in list(CONFIGS)[1:]:
            delay = CONFIGS[config].get("maxQueueDelayMicroseconds", 0) / 1000  # type: ignore[union-attr]
            lines.append(
                f"| {model}, a lone request, the worker alone: p50 within delay + 0.1 ms of off "
                f"({config}) | {found[config] - found['off']:+.3f} ms against "
                f"{delay + 0.1:.2f} ms |"
            )
    for model, found in results.items():
        off = found[1]["off"].p50_ms
        for config in list(CONFIGS)[1:]:
            delay = CONFIGS[config].get("maxQueueDelayMicroseconds", 0) / 1000  # type: ignore[union-attr]
            got = found[1][config].p50_ms
            lines.append(
                f"| {model}, 1 client, p50 within delay + 0.1 ms of off ({config}) | "
                f"{got - off:+.2f} ms against a bound of {delay + 0.1:.2f} ms |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    window = 1.0 if args.quick else 2.0
    command = perf_analyzer()
    mobile = variants(mobilenet.build(MODEL_CACHE))
    chosen = [digits_variant(), *(v for v in mobile if v.name in ("uint8", "float32"))]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mlbatch-") as scratch:
        work = Path(scratch)
        for variant in chosen:
            shutil.copy(variant.path, work / f"{variant.name}.tflite")
            for config, batching in CONFIGS.items():
                (work / f"{name(variant.name, config)}.yaml").write_text(
                    manifest(name(variant.name, config), f"{variant.name}.tflite", batching)
                )
        names = {name(v.name, c): f"{v.name}.tflite" for v in chosen for c in CONFIGS}
        print("the worker alone", flush=True)
        alone: dict[str, Any] = {
            v.name: worker_alone(v, work, 300 if args.quick else 1500)
            for v in chosen
            if v.name in ("digits", "uint8")
        }
        alone["_late"] = wake_late(tight=True)
        alone["_late_default"] = wake_late(tight=False)
        with modelloader_local(work, {}) as (port, state_dir, _, gateway):
            for model in names:
                wait_phase(state_dir, model, "Ready")
            for variant in chosen:
                print(f"measuring {variant.name}", flush=True)
                results[variant.name] = measure(command, port, gateway, variant, window, work)
        print("the floor: digits against a fixed answer", flush=True)
        results["digits"]["floor"] = floor(command, chosen[0], work, window)
    shown = "bench/batching.py" + (" --quick" if args.quick else "")
    section = report(results, alone, f".venv/bin/python {shown}", window)
    print(section)
    if not args.no_write:
        write_results(section, TITLE)


if __name__ == "__main__":
    main()
