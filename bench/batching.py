"""Dynamic batching: throughput and latency with it on and off, against the raw interpreter's
batch-1 loop, side by side in one run.

    .venv/bin/python bench/batching.py [--quick] [--no-write]

The digits model (examples/01-digits) and MobileNetV2 224 uint8 and float32 (`threads: 2`),
each loaded three times by one `modelloader local`: without batching, with `maxBatchSize: 16`
and no queue delay (a batch is what arrived while the interpreter ran the last one), and with
a delay of DELAY_US. At concurrency 1, 4 and 16, perf_analyzer (`-i http`, binary tensors,
the same image in every request; fetched as `protocols.py` fetches it) drives the three one
after another, and the raw interpreter's batch-1 loop (`LiteRTRunner.run` in this process,
back to back) runs before each model and after each concurrency. perf_analyzer rather than
Python client threads: on 2 cores the client's own CPU time is taken from the server's, and
perf_analyzer's is the smaller. The mean batch comes from Triton's statistics (inferences
per execution).

Then the worker alone (no Ray, no HTTP: the gateway's own links to a `WorkerServer` in this
process), one request at a time, for what batching adds to a lone request's latency without
the rest of the path's noise; and how late the serving thread's timed waits wake on this
machine (`worker_server.WAKE_LATE`).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
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
from modelloader_workers.batch_runner import check_batchable
from modelloader_workers.batching import BatchPolicy
from modelloader_workers.litert_runner import LiteRTRunner
from modelloader_workers.wire import ipc
from modelloader_workers.wire.address import Address
from modelloader_workers.worker_server import WorkerServer
from protocols import perf_analyzer

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


@dataclass(frozen=True)
class Load:
    per_second: float
    p50_ms: float
    p99_ms: float
    mean_batch: float = 1.0


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
    command: list[str], port: int, model: str, concurrency: int, data: Path, window: float
) -> Load:
    """perf_analyzer against one model: throughput and p50/p99 of its stable windows, and the
    mean batch over the run (Triton's statistics)."""
    before = counts(port, model)
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
    )


def measure(
    command: list[str], port: int, variant: Variant, window: float, folder: Path
) -> dict[str, Any]:
    raw_runner = RawRunner(variant.path, variant.input_name, variant.x)
    data = input_files(variant, folder)

    def raw() -> Load:
        return under_load(lambda: raw_runner, 1, window)

    out: dict[str, Any] = {"raw": [raw()]}
    for turn, concurrency in enumerate(CONCURRENCY):
        order = list(CONFIGS) if turn % 2 == 0 else list(CONFIGS)[::-1]
        out[concurrency] = {
            config: drive(
                command,
                port,
                name(variant.name, config),
                concurrency,
                data[CONFIGS[config] is not None],
                window,
            )
            for config in order
        }
        out["raw"].append(raw())
    return out


def policy(config: str) -> BatchPolicy | None:
    found = CONFIGS[config]
    if found is None:
        return None
    return BatchPolicy(found["maxBatchSize"], found.get("maxQueueDelayMicroseconds", 0) / 1e6)


def worker_alone(variant: Variant, folder: Path, calls: int, rounds: int) -> dict[str, float]:
    """p50 (ms) of one request at a time to a WorkerServer of each configuration, through
    the gateway's links; configurations alternate, `rounds` runs each, medians."""
    servers = {}
    for index, config in enumerate(CONFIGS):
        runner = LiteRTRunner(str(variant.path), threads=THREADS)
        chosen = policy(config)
        if chosen is not None:
            check_batchable(runner, chosen.max_batch_size)
        address = Address("unix", str(folder / f"alone-{index}.sock"))
        servers[config] = (WorkerServer(runner, address, batching=chosen), address)
    entries, buffers = ipc.describe({variant.input_name: variant.x})
    prefix = request_prefix(entries, [])

    async def sequential(address: Address) -> float:
        clients = WorkerClients()
        timings = []
        for _ in range(calls):
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            began = time.perf_counter()
            clients.submit(address, prefix, buffers, future.set_result)
            await future
            timings.append(time.perf_counter() - began)
        clients.close()
        return statistics.median(timings[calls // 10 :]) * 1000

    got: dict[str, list[float]] = {config: [] for config in CONFIGS}
    try:
        for round_ in range(rounds):
            order = list(CONFIGS) if round_ % 2 == 0 else list(CONFIGS)[::-1]
            for config in order:
                got[config].append(asyncio.run(sequential(servers[config][1])))
    finally:
        for server, _ in servers.values():
            server.close()
    return {config: statistics.median(values) for config, values in got.items()}


def wake_late(waits: int = 300) -> tuple[float, float]:
    """How late (p50, p90 in microseconds) a 2 ms wait of select() and sleep() ends here."""
    import selectors
    import socket

    a, b = socket.socketpair()
    with selectors.DefaultSelector() as selector:
        selector.register(a, selectors.EVENT_READ)
        late = []
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
        "and between the concurrencies. Rows in the order they ran.",
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
    alone = dict(alone)
    if alone:
        late = alone.pop("_late")
        lines += [
            "",
            "## A lone request, the worker alone (p50 ms, one request at a time)",
            "",
            "The gateway's links to a `WorkerServer` in the bench's process: no Ray, no HTTP, "
            "so what batching adds to a request that waits for no one shows without the "
            "rest of the path's noise. The serving thread's timed waits wake "
            f"{late[0]:.0f} us late at the median here ({late[1]:.0f} us at p90), and "
            "batches are cut short by that much (`WAKE_LATE`).",
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
            v.name: worker_alone(v, work, 200 if args.quick else 600, 1 if args.quick else 3)
            for v in chosen
            if v.name in ("digits", "uint8")
        }
        alone["_late"] = wake_late()
        with modelloader_local(work, {}) as (port, state_dir, _, _):
            for model in names:
                wait_phase(state_dir, model, "Ready")
            for variant in chosen:
                print(f"measuring {variant.name}", flush=True)
                results[variant.name] = measure(command, port, variant, window, work)
    shown = "bench/batching.py" + (" --quick" if args.quick else "")
    section = report(results, alone, f".venv/bin/python {shown}", window)
    print(section)
    if not args.no_write:
        write_results(section, TITLE)


if __name__ == "__main__":
    main()
