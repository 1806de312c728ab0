"""The model process (issue 19): what its sandbox costs a request, and what a model costs in
memory, measured side by side in one run:

    .venv/bin/python bench/model_process.py [--calls 2000] [--models 10] [--no-write]

1. Per-request cost. The same model served by the same data-path code (`WorkerServer`) two
   ways, called alternately through the gateway's own worker links: as before this change (a
   child process whose model-loading and serving threads run under the per-thread filter, as
   they did inside the Ray worker) and now (a model process sandboxed whole: process-wide
   seccomp with TSYNC, Landlock, the limits). The digits model and MobileNetV2 uint8.
2. Memory. `modelloader local` with N perModel digits models of one origin: the proportional
   set size (PSS: shared pages counted once) of each model's process, of the worker that
   supervises them (the Ray actor: one per origin and node) and of its spawner (which forks
   them), and what one more model adds to every process of `modelloader local`.
3. Scale (`--scale-models`, over `--scale-origins`): perModel digits models applied at once to
   one `modelloader local`; the seconds until every one is Ready, how long `modelloader status`
   (its control channel) takes to answer, asked every half second meanwhile, the PSS of the
   whole tree once they are Ready, and then one inference to each model through the gateway,
   with its origin's bearer token (the target: every one answers 200).

Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mobilenet
from dataplane import (
    MODEL_CACHE,
    json_request,
    machine,
    manifest,
    modelloader_local,
    versions,
    wait_phase,
    write_results,
)
from modelloader_gateway.worker_client import WorkerClients, request_prefix
from modelloader_workers.listeners import listen
from modelloader_workers.model_process import ModelProcess, ProcessLoad
from modelloader_workers.wire import ipc
from modelloader_workers.wire.address import Address
from replicas import pss_kib

TITLE = "# The model process: a request's cost and a model's memory"
REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "examples" / "01-digits" / "digits.tflite"

# Before: the per-thread filter on the loading and serving threads of one process.
THREAD_FILTERED = textwrap.dedent(
    """
    import sys, threading, time
    from modelloader_workers import sandbox
    from modelloader_workers.litert_runner import LiteRTRunner
    from modelloader_workers.wire.address import Address
    from modelloader_workers.worker_server import WorkerServer
    made = []
    def load():
        assert sandbox.confine_thread()
        made.append(WorkerServer(LiteRTRunner(sys.argv[1], 1), Address("unix", sys.argv[2])))
    thread = threading.Thread(target=load)
    thread.start(); thread.join()
    print("ready", flush=True)
    time.sleep(3600)
    """
)


def inputs_for(model: Path) -> dict[str, np.ndarray[Any, Any]]:
    from modelloader_workers.litert_runner import LiteRTRunner

    spec = LiteRTRunner(str(model)).signature.inputs[0]
    shape = [1 if d < 0 else d for d in spec.shape]
    dtype = np.uint8 if spec.datatype == "UINT8" else np.float32
    return {spec.name: np.random.default_rng(0).integers(0, 255, shape).astype(dtype)}


async def timed_calls(
    addresses: dict[str, Address], inputs: dict[str, np.ndarray[Any, Any]], calls: int
) -> dict[str, list[float]]:
    clients = WorkerClients()
    entries, buffers = ipc.describe(inputs)
    prefix = request_prefix(entries, ())
    times: dict[str, list[float]] = {k: [] for k in addresses}
    loop = asyncio.get_running_loop()
    try:
        order = list(addresses.items())
        for index in range(calls + 50):
            order.reverse()  # neither always goes first
            for name, address in order:
                done: asyncio.Future[Any] = loop.create_future()
                started = time.perf_counter()
                clients.submit(address, prefix, buffers, done.set_result)
                await done
                if index >= 50:  # warm-up
                    times[name].append((time.perf_counter() - started) * 1000)
    finally:
        clients.close()
    return times


def request_cost(model: Path, calls: int, work: Path) -> dict[str, list[float]]:
    before_socket = work / f"before-{model.stem}.sock"
    before = subprocess.Popen(
        [sys.executable, "-c", THREAD_FILTERED, str(model), str(before_socket)],
        stdout=subprocess.PIPE,
        text=True,
    )
    process = ModelProcess.start()
    try:
        assert before.stdout is not None and before.stdout.readline().strip() == "ready"
        listener, now_address = listen(Address("unix", str(work / f"now-{model.stem}.sock")))
        process.load(ProcessLoad(model=str(model)), listener)
        listener.close()
        addresses = {"before": Address("unix", str(before_socket)), "now": now_address}
        return asyncio.run(timed_calls(addresses, inputs_for(model), calls))
    finally:
        process.stop()
        before.kill()
        before.wait()


def memory(models: int, work: Path) -> dict[str, Any]:
    """The PSS (KiB) of each model's process and of their worker, with `models` perModel
    models of one origin, and what one more model adds to the whole tree."""
    from modelloader import control_channel
    from replicas import children_named, node_pss, parent_of

    shutil.copy(DIGITS, work / "digits.tflite")
    names = {f"m{i:02d}": "digits.tflite" for i in range(models)}
    with modelloader_local(work, names) as (_port, state_dir, _seconds, pid):
        time.sleep(3.0)  # settled: the loads' transient memory returned
        items = control_channel.fetch(state_dir)["items"]
        pids = [int(i["status"]["placement"]["pid"]) for i in items]
        workers = sorted({parent_of(p) for p in pids})
        spawners = [c for w in workers for c in children_named(w, "ml-spawner")]
        before = node_pss(pid)
        (work / "extra.yaml").write_text(manifest("extra", "file://digits.tflite"))
        wait_phase(state_dir, "extra", "Ready")
        time.sleep(3.0)
        return {
            "processes": [pss_kib(p) for p in pids],
            "workers": [pss_kib(w) for w in workers],
            "spawners": [pss_kib(c) for c in spawners],
            "added": node_pss(pid) - before,
        }


def origin_secret(origin: str) -> tuple[str, str]:
    """A bearer token for `origin` and the Secret that grants it (the origin's namespace)."""
    token = f"{origin}-token-0123456789abcdef"
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": f"{origin}-token",
            "namespace": origin,
            "labels": {"modelloader.dev/origin": origin},
        },
        "stringData": {"token": token},
    }
    return token, json.dumps(secret)


def answer_each(port: int, tokens: dict[str, str], budget: float = 300.0) -> tuple[int, list[str]]:
    """One inference per model (name -> its origin's token) over a keep-alive connection: how
    many answered 200, and the first few that did not, with why. A connection that fails is
    dropped (the next request opens another); models not asked within `budget` seconds count
    as not answering."""
    body = json_request("pixels", "FP32", np.zeros((1, 64), np.float32))
    answered, failures = 0, []
    deadline = time.monotonic() + budget
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for index, (name, token) in enumerate(tokens.items()):
            if time.monotonic() > deadline:
                failures.append(f"{len(tokens) - index} not asked within {budget:.0f} s")
                break
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
            try:
                connection.request("POST", f"/v2/models/{name}/infer", body, headers)
                response = connection.getresponse()
                status, data = response.status, response.read()
            except (http.client.HTTPException, OSError) as error:
                connection.close()  # http.client connects again for the next request
                status, data = 0, repr(error).encode()
            if status == 200 and b'"outputs"' in data:
                answered += 1
            elif len(failures) < 3:
                failures.append(f"{name}: {status} {data[:120]!r}")
    finally:
        connection.close()
    return answered, failures


def scale(models: int, origins: int, work: Path) -> dict[str, Any]:
    """Every model applied at once; Ready times, the control channel's answers meanwhile, then
    one inference to each model, with its origin's token."""
    from modelloader import control_channel
    from replicas import node_pss

    folder = work / "scale"
    folder.mkdir()
    shutil.copy(DIGITS, folder / "digits.tflite")
    owners = {f"m{i:03d}": f"o{i % origins:02d}" for i in range(models)}
    secrets = {o: origin_secret(o) for o in sorted(set(owners.values()))}
    # The Secrets are there before `modelloader local` starts, as an admin's would be.
    (folder / "secrets.yaml").write_text("\n---\n".join(s for _, s in secrets.values()))
    documents = [
        json.dumps(
            {
                "apiVersion": "modelloader.dev/v1alpha1",
                "kind": "LoadedModel",
                "metadata": {"name": name, "namespace": origin},
                "spec": {"source": {"uri": "file://digits.tflite"}, "accelerator": "cpu"},
            }
        )
        for name, origin in owners.items()
    ]
    with modelloader_local(folder, {}) as (port, state_dir, _seconds, pid):
        applied = time.monotonic()
        (folder / "all.yaml").write_text("\n---\n".join(documents))
        answers: list[float] = []
        ready = 0
        deadline = applied + 900
        while time.monotonic() < deadline:
            asked = time.monotonic()
            try:
                items = control_channel.fetch(state_dir, timeout=60)["items"]
            except control_channel.ControlUnavailable:
                items = []
            answers.append(time.monotonic() - asked)
            ready = sum(1 for i in items if i["status"].get("phase") == "Ready")
            if ready == models:
                break
            time.sleep(0.5)
        seconds = time.monotonic() - applied
        time.sleep(3.0)
        tree_mib = node_pss(pid) / 1024  # once Ready, before any request (as before the step)
        asked = time.monotonic()
        answered, failures = answer_each(
            port, {name: secrets[origin][0] for name, origin in owners.items()}
        )
        answering = time.monotonic() - asked
        return {
            "ready": ready,
            "seconds": seconds,
            "status_p50": statistics.median(answers),
            "status_max": max(answers),
            "status_asked": len(answers),
            "answered": answered,
            "answer_seconds": answering,
            "failures": failures,
            "tree_mib": tree_mib,
        }


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--scale-models", type=int, default=100)
    parser.add_argument("--scale-origins", type=int, default=10)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlmp-", dir="/tmp"))
    mobilenet_uint8 = mobilenet.build(MODEL_CACHE)["uint8"]
    rows = []
    for label, model in (("digits", DIGITS), ("MobileNetV2 uint8", mobilenet_uint8)):
        print("request cost", label, flush=True)
        times = request_cost(model, args.calls, work)
        b, n = times["before"], times["now"]
        rows.append(
            f"| {label} | {p(b, 50):.3f} / {p(b, 99):.3f} | {p(n, 50):.3f} / {p(n, 99):.3f} "
            f"| {p(n, 50) - p(b, 50):+.3f} |"
        )
    print("memory", flush=True)
    sizes = memory(args.models, work)
    print("scale", flush=True)
    grown = scale(args.scale_models, args.scale_origins, work)
    mib = 1024.0
    section = "\n".join(
        [
            TITLE,
            "",
            f"Machine: {machine()}. Versions: {versions()}.",
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
            f"Command: `.venv/bin/python bench/model_process.py --calls {args.calls} "
            f"--models {args.models} --scale-models {args.scale_models} "
            f"--scale-origins {args.scale_origins}`.",
            "",
            f"## A request's round trip, worker alone (ms, p50 / p99, {args.calls} calls each, "
            "alternating)",
            "",
            "| model | before: thread-filtered | now: model process | p50 difference |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
            f"## Memory of {args.models} perModel digits models of one origin (PSS, MiB)",
            "",
            "| part | PSS |",
            "| --- | --- |",
            f"| each model's process (median of {len(sizes['processes'])}) | "
            f"{statistics.median(sizes['processes']) / mib:.1f} |",
            "| their worker(s), the origin's supervisor on the node | "
            + ", ".join(f"{w / mib:.1f}" for w in sizes["workers"])
            + " |",
            "| their worker's spawner (forks each model process) | "
            + ", ".join(f"{w / mib:.1f}" for w in sizes["spawners"])
            + " |",
            f"| what one more model adds (every process of `modelloader local`) | "
            f"{sizes['added'] / mib:.1f} |",
            "",
            f"## {args.scale_models} perModel models over {args.scale_origins} origins, "
            "applied at once",
            "",
            "| what | measured |",
            "| --- | --- |",
            f"| Ready | {grown['ready']} of {args.scale_models} after {grown['seconds']:.1f} s |",
            f"| then one inference to each, with its origin's token | {grown['answered']} of "
            f"{args.scale_models} answered 200, in {grown['answer_seconds']:.1f} s"
            + "".join(f"; {f}" for f in grown["failures"])
            + " |",
            f"| `modelloader status` meanwhile ({grown['status_asked']} asks) | p50 "
            f"{grown['status_p50']:.3f} s, slowest {grown['status_max']:.3f} s |",
            f"| every process of `modelloader local` (PSS) | {grown['tree_mib']:.0f} MiB, "
            f"{grown['tree_mib'] / max(1, grown['ready']):.1f} MiB per model |",
            "",
        ]
    )
    print(section)
    if not args.no_write:
        write_results(section, TITLE)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"sizes_kib": sizes}))


if __name__ == "__main__":
    main()
