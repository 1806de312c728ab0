"""The data path alone: the gateway and a worker, without Ray or the control plane.

    .venv/bin/python bench/data_path.py [--variant uint8] [--stand-in] [--calls 1000]

Two processes made of the product's own parts: a worker (`WorkerServer` over `LiteRTRunner`,
on a Unix socket) and a gateway (`V2Api` + `HttpServer`, with a directory entry pointing at the
worker), driven by the benchmark's thin HTTP client. `--stand-in` replaces the interpreter by
one that answers at once (same input buffers, same outputs), so what is left is the path's own
cost. Printed, not written to RESULTS.md: latency at concurrency 1 against raw calls
interleaved, throughput at concurrency 4 against raw in alternating windows, and CPU per
request of the client, the gateway and the worker. `bench/dataplane.py` is the benchmark of
record; this one takes Ray's and the control loop's noise away, to see what the path costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from modelloader_workers.litert_runner import LiteRTRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mobilenet
from dataplane import (
    MODEL_CACHE,
    THREADS,
    Poster,
    RawRunner,
    binary_request,
    free_port,
    latencies,
    paired_throughput,
    variants,
)


class StandIn:
    """An interpreter that answers at once: the worker fills its input buffers as it would
    LiteRT's, and gets zeros of the model's output shapes back."""

    def __init__(self, path: str) -> None:
        real = LiteRTRunner(path, threads=1)
        self.signature, self.load_seconds = real.signature, 0.0
        dtypes = {"UINT8": np.uint8, "FP32": np.float32}
        self._inputs = {
            t.name: np.zeros([max(1, d) for d in t.shape], dtypes[t.datatype])
            for t in real.signature.inputs
        }
        self._outputs = {
            t.name: np.zeros([max(1, d) for d in t.shape], dtypes[t.datatype])
            for t in real.signature.outputs
        }

    def run(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        return dict(self._outputs)

    def resize(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        pass

    def input_buffers(self, names: Sequence[str]) -> list[memoryview]:
        return [self._inputs[name].reshape(-1).view(np.uint8).data for name in names]

    def invoke(self) -> dict[str, np.ndarray[Any, Any]]:
        return dict(self._outputs)


def worker(model: str, socket_path: str, stand_in: bool) -> None:
    from modelloader_workers.worker_server import WorkerServer

    runner = StandIn(model) if stand_in else LiteRTRunner(model, threads=THREADS)
    WorkerServer(runner, f"unix:{socket_path}")
    print(json.dumps(runner.signature.to_dict()), flush=True)
    threading.Event().wait()  # until SIGTERM


def gateway(socket_path: str, signature: str, port: int) -> None:
    from modelloader_workers.gateway.dataplane import DataPlane
    from modelloader_workers.gateway.directory import ModelDirectory, ModelEntry
    from modelloader_workers.gateway.http_v2 import V2Api, serve_gateway
    from modelloader_workers.gateway.metrics import GatewayMetrics
    from modelloader_workers.gateway.worker_client import WorkerClients
    from modelloader_workers.signature import Signature
    from prometheus_client import CollectorRegistry

    directory = ModelDirectory()
    entry = ModelEntry(
        "default", "m", True, "", Signature.from_dict(json.loads(signature)), f"unix:{socket_path}"
    )
    directory.publish([entry])
    api = V2Api(DataPlane(directory, WorkerClients()), GatewayMetrics(CollectorRegistry()))

    async def serve() -> None:
        server = serve_gateway(api)
        await server.start("127.0.0.1", port)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.close()

    asyncio.run(serve())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", default="bench", choices=["bench", "worker", "gateway"])
    parser.add_argument("--variant", default="uint8", choices=mobilenet.VARIANTS)
    parser.add_argument(
        "--stand-in", action="store_true", help="an interpreter that answers at once"
    )
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    parser.add_argument("--signature", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "worker":
        return worker(args.model, args.socket, args.stand_in)
    if args.role == "gateway":
        return gateway(args.socket, args.signature, args.port)

    paths = mobilenet.build(MODEL_CACHE)
    variant = variants({args.variant: paths[args.variant]})[0]
    folder = tempfile.mkdtemp(prefix="mldp-")
    socket_path = os.path.join(folder, "w.sock")
    me = [sys.executable, __file__]
    worker_command = [*me, "worker", "--model", str(variant.path), "--socket", socket_path]
    worker_process = subprocess.Popen(
        worker_command + (["--stand-in"] if args.stand_in else []),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker_process.stdout is not None
    signature = worker_process.stdout.readline().strip()
    port = free_port()
    gateway_process = subprocess.Popen(
        [*me, "gateway", "--socket", socket_path, "--signature", signature, "--port", str(port)]
    )
    try:
        body, header_length = binary_request(variant.input_name, variant.datatype, variant.x)
        headers = {"Inference-Header-Content-Length": header_length}

        def served() -> Poster:
            return Poster(port, "/v2/models/m/infer", body, headers)

        for _ in range(100):
            with contextlib.suppress(OSError):
                served().close()
                break
            time.sleep(0.1)
        raw = RawRunner(variant.path, variant.input_name, variant.x)
        calls: dict[str, Any] = {"served": served()}
        if not args.stand_in:
            calls = {"raw": raw, **calls}
        timings = latencies(calls, args.calls, warmup=100)
        print(f"MobileNetV2 {variant.name}{' (stand-in interpreter)' if args.stand_in else ''}")
        for name, values in timings.items():
            p50, p99 = np.percentile(values, 50), np.percentile(values, 99)
            print(f"  {name:7s} p50 {p50:7.3f} ms  p99 {p99:7.3f} ms")
        if not args.stand_in:
            over = {
                q: np.percentile(timings["served"], q) - np.percentile(timings["raw"], q)
                for q in (50, 99)
            }
            print(f"  served over raw: p50 {over[50]:+.3f} ms, p99 {over[99]:+.3f} ms")
        pids = {"gateway": gateway_process.pid, "worker": worker_process.pid}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        client_before = time.process_time()
        latencies({"served": calls["served"]}, args.calls, warmup=0)
        per_call = 1000 / args.calls
        cpu = {name: (cpu_seconds(pid) - before[name]) * per_call for name, pid in pids.items()}
        cpu["client"] = (time.process_time() - client_before) * per_call
        print("  CPU ms per request: " + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items()))
        if not args.stand_in:
            got = paired_throughput({"raw": lambda: raw, "served": served}, 4, args.window, 4)
            ratio = got["served"] / got["raw"]
            print(
                f"  concurrency 4: raw {got['raw']:.1f}/s, served {got['served']:.1f}/s, "
                f"ratio {ratio:.3f}"
            )
        for call in calls.values():
            if isinstance(call, Poster):
                call.close()
    finally:
        for process in (gateway_process, worker_process):
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
            os.rmdir(folder)


if __name__ == "__main__":
    main()
