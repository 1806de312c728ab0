"""The data path alone: a worker and the gateway, without Ray or the control plane, and the
same gateway core behind uvicorn.

    .venv/bin/python bench/data_path.py [--variant uint8] [--stand-in] [--calls 1000] [--write]

Processes made of the product's own parts: a worker (`WorkerServer` over `LiteRTRunner`, on a
Unix socket) and two gateways routing to it: ours (`modelloader_gateway.server.Gateway`: the
hand-written HTTP/1.1 server on llhttp) and uvicorn (`--http httptools`, the maintained standard
on the same parser) serving a bare ASGI callable over the same transport-free core
(`DataPlane`), so the two differ in their HTTP layer only. Driven by the benchmark's thin HTTP
client: latency at concurrency 1 against raw calls interleaved, throughput at concurrency 4
against raw in alternating windows, and CPU per request of the client, each gateway and the
worker. `--stand-in` replaces the interpreter by one that answers at once (same input
buffers, same outputs), so what is left is the path's own cost. `--write` puts the table in
`bench/RESULTS.md`: the standing check that the hand-written server still earns its lines.
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from modelloader_gateway.access import open_table
from modelloader_workers.litert_runner import LiteRTRunner
from modelloader_workers.wire.address import Address

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
    machine,
    paired_throughput,
    variants,
    write_results,
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
    WorkerServer(runner, Address("unix", str(socket_path)))
    print(json.dumps(runner.signature.to_dict()), flush=True)
    threading.Event().wait()  # until SIGTERM


def gateway(socket_path: str, signature: str, port: int, http: str) -> None:
    from modelloader_gateway.routes import Endpoint, Route, RouteTable
    from modelloader_gateway.server import Gateway, GatewayConfig
    from modelloader_workers.wire.signature import Signature

    route = Route(
        "default",
        "m",
        endpoints=(Endpoint(Address("unix", socket_path), "w"),),
        signature=Signature.from_dict(json.loads(signature)),
    )
    table = RouteTable((route,), open_table())
    served = Gateway(GatewayConfig(port=port))
    served.publish(table)
    if http == "uvicorn":
        return uvicorn_gateway(served, port)

    async def serve() -> None:
        await served.start()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await served.close()

    asyncio.run(serve())


def uvicorn_gateway(served: Any, port: int) -> None:
    """The same `DataPlane` behind uvicorn: a bare ASGI callable for v2 inference with binary
    tensors (no framework), as lean as an ASGI app can be."""
    import uvicorn
    from modelloader_gateway import codec
    from modelloader_gateway.errors import DataPlaneError
    from modelloader_gateway.http_v2 import http_error

    dataplane = served.dataplane

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = bytearray()
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        header_length = dict(scope["headers"]).get(b"inference-header-content-length")
        try:
            decoded = codec.decode_request(body, header_length.decode() if header_length else None)
            future = asyncio.get_running_loop().create_future()
            dataplane.submit(
                "default", "m", None, decoded.inputs, decoded.outputs, future.set_result
            )
            result = await future
            if isinstance(result, DataPlaneError):
                raise result
            payload, length = codec.encode_response("m", "1", decoded, result.outputs)
            headers = [(b"content-type", b"application/octet-stream")]
            if length is not None:
                headers.append((b"inference-header-content-length", str(length).encode()))
            status = 200
        except DataPlaneError as error:
            failed = http_error(error)
            status, payload = failed.status, json.dumps({"error": failed.message}).encode()
            headers = [(b"content-type", b"application/json")]
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": bytes(payload)})

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        http="httptools",
        loop="asyncio",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


TITLE = "# Data path alone: our HTTP layer against uvicorn's, same core and worker"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", default="bench", choices=["bench", "worker", "gateway"])
    parser.add_argument("--variant", default="uint8", choices=mobilenet.VARIANTS)
    parser.add_argument(
        "--stand-in", action="store_true", help="an interpreter that answers at once"
    )
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--write", action="store_true", help="put the table in RESULTS.md")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    parser.add_argument("--signature", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--http", default="ours", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "worker":
        return worker(args.model, args.socket, args.stand_in)
    if args.role == "gateway":
        return gateway(args.socket, args.signature, args.port, args.http)

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
    ports = {"ours": free_port(), "uvicorn": free_port()}
    gateways = {}
    for http, port in ports.items():
        command = [*me, "gateway", "--socket", socket_path, "--signature", signature]
        gateways[http] = subprocess.Popen([*command, "--port", str(port), "--http", http])
    try:
        body, header_length = binary_request(variant.input_name, variant.datatype, variant.x)
        headers = {"Inference-Header-Content-Length": header_length}

        def poster(http: str) -> Callable[[], Poster]:
            return lambda: Poster(ports[http], "/v2/models/m/infer", body, headers)

        for http in ports:
            for _ in range(100):
                with contextlib.suppress(OSError):
                    poster(http)().close()
                    break
                time.sleep(0.1)
        raw = RawRunner(variant.path, variant.input_name, variant.x)
        calls: dict[str, Any] = {http: poster(http)() for http in ports}
        if not args.stand_in:
            calls = {"raw": raw, **calls}
        timings = latencies(calls, args.calls, warmup=100)
        kind = " (stand-in interpreter)" if args.stand_in else ""
        rows = [
            "| path | p50 ms | p99 ms | p50 over raw | CPU ms per request: gateway / worker /"
            " client | c=4 req/s (raw) / raw |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, values in timings.items():
            p50, p99 = np.percentile(values, 50), np.percentile(values, 99)
            if name == "raw":
                rows.append(f"| raw | {p50:.3f} | {p99:.3f} | | | |")
                continue
            over = f"{p50 - np.percentile(timings['raw'], 50):+.3f}" if "raw" in timings else ""
            pids = {"gateway": gateways[name].pid, "worker": worker_process.pid}
            before = {k: cpu_seconds(pid) for k, pid in pids.items()}
            client_before = time.process_time()
            fresh = poster(name)()  # the interleaved run's connection may have idled out
            latencies({name: fresh}, args.calls, warmup=0)
            fresh.close()
            per_call = 1000 / args.calls
            cpu = {k: (cpu_seconds(pid) - before[k]) * per_call for k, pid in pids.items()}
            cpu["client"] = (time.process_time() - client_before) * per_call
            rate = ""
            if not args.stand_in:
                got = paired_throughput({"raw": lambda: raw, name: poster(name)}, 4, args.window, 4)
                rate = f"{got[name]:.1f} ({got['raw']:.1f}) / {got[name] / got['raw']:.2f}"
            rows.append(
                f"| {name} | {p50:.3f} | {p99:.3f} | {over} | {cpu['gateway']:.3f} / "
                f"{cpu['worker']:.3f} / {cpu['client']:.3f} | {rate} |"
            )
        command = f".venv/bin/python bench/data_path.py --variant {variant.name}"
        command += f" --calls {args.calls}" + (" --stand-in" if args.stand_in else "") + " --write"
        section = f"""{TITLE}

Machine: {machine()}. Date: {time.strftime("%Y-%m-%d %H:%M %Z")}. Command: `{command}`.
uvicorn {_version("uvicorn")} (`--http httptools`, a bare ASGI callable), httptools
{_version("httptools")}. MobileNetV2 {variant.name}{kind}, batch 1, {THREADS} interpreter threads;
one worker process and two gateway processes routing to it (ours, uvicorn), over the same
`DataPlane`; the client interleaves raw, ours and uvicorn at concurrency 1, then measures
throughput at concurrency 4 in alternating windows of {args.window:g} s against raw.

{chr(10).join(rows)}
"""
        print(section)
        if args.write:
            write_results(section, TITLE)
        for call in calls.values():
            if isinstance(call, Poster):
                call.close()
    finally:
        for process in (*gateways.values(), worker_process):
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
            os.rmdir(folder)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
