"""The data-plane benchmark: MobileNetV2 224 served three ways, side by side in one run.

    make bench        (or .venv/bin/python bench/dataplane.py [--quick])

Same models, same thread count, same machine, in one run:
  (a) raw:   `LiteRTRunner.run` in this process (the interpreter, nothing around it);
  (b) Model Loader: `modelloader local`'s gateway over HTTP, Triton binary tensors and JSON;
  (c) Ray Serve: a deployment hosting the same interpreter, raw tensor bytes over its HTTP proxy.
Latency is measured at concurrency 1 with raw and served calls interleaved, so drift hits both
alike; throughput at concurrency 1, 4 and 16 in alternating windows of raw and served. Served
paths run one after the other ((b), then (c)), each against raw calls of its own phase. Then
apply -> Ready for the digits example and MobileNetV2 (uint8). The client is a plain socket
speaking HTTP/1.1 (`Poster`), one persistent connection per client thread; `http.client` runs
one row beside it for comparison. Results replace this benchmark's section of
bench/RESULTS.md (the other sections are other benchmarks').

MobileNetV2 is generated here by `bench/mobilenet.py` (TensorFlow, a bench-only extra).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from modelloader import control_channel
from modelloader_workers.litert_runner import LiteRTRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mobilenet

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "01-digits"
BIN = Path(sys.executable).parent / "modelloader"
MODEL_CACHE = Path.home() / ".cache" / "modelloader" / "bench-models"
THREADS = 2
IDLE_SECONDS = 5.0
CONCURRENCY = (1, 4, 16)
TITLE = "# Data plane: MobileNetV2 raw, through Model Loader, through Ray Serve"

Call = Callable[[], None]


@dataclass(frozen=True)
class Settings:
    iterations: int  # latency samples per path (binary, raw, Serve)
    json_iterations: int  # latency samples for JSON tensors (slow: big text bodies)
    window: float  # seconds per throughput window
    rounds: int  # windows per path and concurrency
    cold_runs: int


FULL = Settings(iterations=600, json_iterations=50, window=2.0, rounds=4, cold_runs=5)
QUICK = Settings(iterations=200, json_iterations=20, window=1.0, rounds=2, cold_runs=2)


# Clients


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Poster:
    """One persistent HTTP/1.1 connection over a plain socket, the thinnest client there is:
    the request's bytes are made once, and each call is one `sendall` and the reads of the
    answer's head and its Content-Length body. On this machine `http.client` itself costs
    0.1-0.2 ms of Python per call (the `http.client` row of the latency table shows it), and
    the served paths (b) and (c) both pay whatever the client costs."""

    def __init__(self, port: int, path: str, body: bytes, headers: dict[str, str]) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fields = {"Host": f"127.0.0.1:{port}", **headers, "Content-Length": str(len(body))}
        head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        self._request = (head + "\r\n").encode() + body
        self._path = path
        self._buffer = bytearray(1 << 16)

    def __call__(self) -> None:
        self._sock.sendall(self._request)
        view = memoryview(self._buffer)
        got = 0
        while (end := self._buffer.find(b"\r\n\r\n", 0, got)) < 0:
            n = self._sock.recv_into(view[got:])
            if n == 0:
                raise RuntimeError(f"{self._path}: the server closed the connection")
            got += n
        status_line, *lines = bytes(self._buffer[:end]).split(b"\r\n")
        fields = dict(line.lower().split(b":", 1) for line in lines)
        if b"content-length" not in fields:
            raise RuntimeError(f"{self._path}: an answer without Content-Length: {status_line!r}")
        total = end + 4 + int(fields[b"content-length"])
        if total > len(self._buffer):
            bigger = bytearray(total)
            bigger[:got] = self._buffer[:got]
            self._buffer, view = bigger, memoryview(bigger)
        while got < total:
            n = self._sock.recv_into(view[got:total])
            if n == 0:
                raise RuntimeError(f"{self._path}: the server closed the connection")
            got += n
        if status_line[9:12] != b"200":
            answer = bytes(view[end + 4 : total])[:200]
            raise RuntimeError(f"{self._path}: {status_line!r} {answer!r}")

    def close(self) -> None:
        self._sock.close()


class HttpClientPoster:
    """The same calls through `http.client` (one persistent connection), for comparison."""

    def __init__(self, port: int, path: str, body: bytes, headers: dict[str, str]) -> None:
        self._connection = http.client.HTTPConnection("127.0.0.1", port)
        self._connection.connect()
        self._connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._path, self._body, self._headers = path, body, headers

    def __call__(self) -> None:
        self._connection.request("POST", self._path, body=self._body, headers=self._headers)
        response = self._connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{self._path}: {response.status} {data[:200]!r}")

    def close(self) -> None:
        self._connection.close()


def binary_request(name: str, datatype: str, x: np.ndarray[Any, Any]) -> tuple[bytes, str]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + x.tobytes(), str(len(header))


def json_request(name: str, datatype: str, x: np.ndarray[Any, Any]) -> bytes:
    inputs = [
        {"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.ravel().tolist()}
    ]
    return json.dumps({"inputs": inputs}).encode()


def latencies(calls: dict[str, Call], iterations: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per call, the calls interleaved round-robin."""
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + iterations):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            if i >= warmup:
                timings[name].append((time.perf_counter() - started) * 1000)
    return timings


def throughput(make: Callable[[], Call], concurrency: int, seconds: float) -> float:
    """Completed calls per second with `concurrency` threads calling back to back."""
    calls = [make() for _ in range(concurrency)]
    counts = [0] * concurrency
    start = threading.Barrier(concurrency + 1)
    stop = threading.Event()

    def loop(i: int) -> None:
        start.wait()
        while not stop.is_set():
            calls[i]()
            counts[i] += 1

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
        if isinstance(call, Poster | HttpClientPoster):
            call.close()
    return sum(counts) / elapsed


def paired_throughput(
    makers: dict[str, Callable[[], Call]], concurrency: int, window: float, rounds: int
) -> dict[str, float]:
    """`rounds` windows per path, alternating (a b b a a b ...), each path's median: a
    window that another tenant of the machine disturbed counts as one among several."""
    names = list(makers)
    got: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            got[name].append(throughput(makers[name], concurrency, window))
    return {name: statistics.median(values) for name, values in got.items()}


class RawRunner:
    """The interpreter in-process; a lock serialises client threads as the worker does."""

    def __init__(self, path: Path, name: str, x: np.ndarray[Any, Any]) -> None:
        self.runner = LiteRTRunner(str(path), threads=THREADS)
        self._inputs = {name: x}
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.runner.run(self._inputs)


# CPU time by process: where a served request's time goes


def _stat(pid: int) -> tuple[int, str, float]:
    """(parent pid, command, CPU seconds) of a process."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rsplit(")", 1)[1].split()
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    return int(fields[1]), command, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu(root: int) -> dict[str, float]:
    """CPU seconds of `root` and its descendants, grouped: the root process itself, Ray's
    worker processes (`ray::...`), and the rest (Ray's GCS, raylet, ...)."""
    table: dict[int, tuple[int, str, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                table[int(entry)] = _stat(int(entry))
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    out = {"self": table[root][2] if root in table else 0.0, "ray workers": 0.0, "ray": 0.0}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        _, command, seconds = table[pid]
        out["ray workers" if command.startswith("ray::") else "ray"] += seconds
        stack += children.get(pid, [])
    return out


# The subjects


@dataclass(frozen=True)
class Variant:
    name: str  # float32, float16, uint8
    path: Path
    input_name: str
    datatype: str
    x: np.ndarray[Any, Any]


def variants(paths: dict[str, Path]) -> list[Variant]:
    rng = np.random.default_rng(7)
    out = []
    for name, path in paths.items():
        signature = LiteRTRunner(str(path), threads=1).signature
        spec = signature.inputs[0]
        shape = tuple(max(1, d) for d in spec.shape)
        if spec.datatype == "UINT8":
            x = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            x = rng.uniform(-1, 1, shape).astype(np.float32)
        out.append(Variant(name, path, spec.name, spec.datatype, x))
    return out


def manifest(name: str, uri: str, threads: int = THREADS) -> str:
    return json.dumps(
        {
            "apiVersion": "modelloader.dev/v1alpha1",
            "kind": "LoadedModel",
            "metadata": {"name": name},
            "spec": {"source": {"uri": uri}, "accelerator": "cpu", "threads": threads},
        }
    )


def phase(state_dir: Path, name: str) -> str | None:
    items = control_channel.fetch(state_dir)["items"]
    return next((i["status"]["phase"] for i in items if i["name"] == name), None)


def wait_phase(state_dir: Path, name: str, wanted: str | None, timeout: float = 180) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        with contextlib.suppress(control_channel.ControlUnavailable):
            if phase(state_dir, name) == wanted:
                return time.perf_counter() - started
        time.sleep(0.005)
    raise TimeoutError(f"{name} did not reach {wanted}")


@contextlib.contextmanager
def modelloader_local(
    work: Path, names: dict[str, str], grpc_port: int = -1
) -> Iterator[tuple[int, Path, float, int]]:
    """`modelloader local` over `work` with a manifest per name -> file; yields the gateway's
    port, the state dir, the seconds until every model was Ready (Ray start included) and the
    process id. gRPC is served on `grpc_port` if given (-1: not at all)."""
    state_dir = Path(tempfile.mkdtemp(prefix="mlbs-", dir="/tmp"))
    for name, file in names.items():
        (work / f"{name}.yaml").write_text(manifest(name, f"file://{file}"))
    port = free_port()
    command = [
        str(BIN),
        "local",
        str(work),
        "--port",
        str(port),
        "--metrics-port",
        str(free_port()),
        "--grpc-port",
        str(grpc_port),
        "--state-dir",
        str(state_dir),
        "--cache-dir",
        str(work / "cache"),
    ]
    log = (work / "modelloader.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        started = time.perf_counter()
        for name in names:
            wait_phase(state_dir, name, "Ready")
        yield port, state_dir, time.perf_counter() - started, server.pid
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        shutil.rmtree(state_dir, ignore_errors=True)


def cold_starts(work: Path, state_dir: Path, file: str, runs: int) -> list[float]:
    """A manifest written into the running `modelloader local` -> status Ready, then removed."""
    seconds = []
    for n in range(runs):
        name = f"cold-{Path(file).stem.replace('_', '-')}-{n}"
        manifest_path = work / f"{name}.yaml"
        started = time.perf_counter()
        manifest_path.write_text(manifest(name, f"file://{file}", threads=1))
        wait_phase(state_dir, name, "Ready")
        seconds.append(time.perf_counter() - started)
        manifest_path.unlink()
        wait_phase(state_dir, name, None)
    return seconds


# Ray Serve


def serve_app(path: Path, input_name: str) -> Any:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    class Model:
        def __init__(self) -> None:
            self.runner = LiteRTRunner(str(path), threads=THREADS)
            spec = self.runner.signature.inputs[0]
            self.shape = tuple(max(1, d) for d in spec.shape)
            self.dtype = np.uint8 if spec.datatype == "UINT8" else np.float32

        async def __call__(self, request: Request) -> Response:
            body = await request.body()
            x = np.frombuffer(body, dtype=self.dtype).reshape(self.shape)
            out = next(iter(self.runner.run({input_name: x}).values()))
            return Response(out.tobytes(), media_type="application/octet-stream")

    return Model.bind()  # type: ignore[attr-defined]


@contextlib.contextmanager
def ray_serve(models: list[Variant]) -> Iterator[int]:
    import ray
    from ray import serve

    port = free_port()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for v in models:
            serve.run(serve_app(v.path, v.input_name), name=v.name, route_prefix=f"/{v.name}")
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


# Measurement


@dataclass
class Row:
    variant: str
    path: str
    p50: float
    p99: float
    raw_p50: float
    raw_p99: float
    rps: dict[int, float]  # by concurrency
    raw_rps: dict[int, float]
    cpu: dict[str, float] | None = None  # ms of CPU per served request, by process group


def measure(
    variant: Variant,
    raw: RawRunner,
    served: dict[str, Callable[[], Call]],
    settings: Settings,
    cpu_root: int,
    json_maker: Callable[[], Call] | None = None,
) -> list[Row]:
    """Latency of raw and each served path interleaved; throughput of raw and the first. CPU
    per served request: `cpu_root`'s process tree during a run of served calls alone."""
    calls: dict[str, Call] = {"raw": raw, **{name: make() for name, make in served.items()}}
    timings = latencies(calls, settings.iterations, warmup=max(20, settings.iterations // 10))
    first = next(iter(served))
    before, client_before = process_cpu(cpu_root), time.process_time()
    latencies({first: calls[first]}, settings.iterations, warmup=0)
    after, client_after = process_cpu(cpu_root), time.process_time()
    per_call = 1000 / settings.iterations
    cpu = {group: (after[group] - before[group]) * per_call for group in after}
    cpu["client"] = (client_after - client_before) * per_call
    rows = []
    for name in served:
        rows.append(
            Row(
                variant.name,
                name,
                float(np.percentile(timings[name], 50)),
                float(np.percentile(timings[name], 99)),
                float(np.percentile(timings["raw"], 50)),
                float(np.percentile(timings["raw"], 99)),
                {},
                {},
                cpu if name == first else None,
            )
        )
    if json_maker is not None:
        json_timings = latencies(
            {"raw": raw, "json": json_maker()}, settings.json_iterations, warmup=5
        )
        rows.append(
            Row(
                variant.name,
                "json",
                float(np.percentile(json_timings["json"], 50)),
                float(np.percentile(json_timings["json"], 99)),
                float(np.percentile(json_timings["raw"], 50)),
                float(np.percentile(json_timings["raw"], 99)),
                {},
                {},
            )
        )
    for concurrency in CONCURRENCY:
        got = paired_throughput(
            {"raw": lambda: raw, first: served[first]},
            concurrency,
            settings.window,
            settings.rounds,
        )
        rows[0].rps[concurrency] = got[first]
        rows[0].raw_rps[concurrency] = got["raw"]
    for name in ("raw", *served):
        call = calls[name]
        if isinstance(call, Poster | HttpClientPoster):
            call.close()
    return rows


def run_modelloader(
    models: list[Variant], work: Path, settings: Settings
) -> tuple[list[Row], dict[str, Any]]:
    for v in models:
        shutil.copy(v.path, work)
    shutil.copy(EXAMPLE / "digits.tflite", work)
    names = {f"mnv2-{v.name}": v.path.name for v in models}
    rows: list[Row] = []
    cold: dict[str, Any] = {}
    with modelloader_local(work, names) as (port, state_dir, first, pid):
        cold["first"] = first
        time.sleep(2)  # let the start settle
        before = process_cpu(pid)
        time.sleep(IDLE_SECONDS)
        after = process_cpu(pid)
        cold["idle"] = {group: (after[group] - before[group]) / IDLE_SECONDS for group in after}
        for v in models:
            print(f"(b) modelloader: {v.name}", flush=True)
            raw = RawRunner(v.path, v.input_name, v.x)
            body, header_length = binary_request(v.input_name, v.datatype, v.x)
            json_body = json_request(v.input_name, v.datatype, v.x)
            url = f"/v2/models/mnv2-{v.name}/infer"
            binary_headers = {
                "Inference-Header-Content-Length": header_length,
                "Content-Type": "application/octet-stream",
            }
            json_headers = {"Content-Type": "application/json"}
            rows += measure(
                v,
                raw,
                {
                    "binary": lambda url=url, b=body, h=binary_headers: Poster(port, url, b, h),
                    "binary, http.client": lambda url=url, b=body, h=binary_headers: (
                        HttpClientPoster(port, url, b, h)
                    ),
                },
                settings,
                pid,
                json_maker=lambda url=url, b=json_body, h=json_headers: Poster(port, url, b, h),
            )
        print("cold starts", flush=True)
        cold["digits"] = cold_starts(work, state_dir, "digits.tflite", settings.cold_runs)
        uint8 = next(v for v in models if v.name == "uint8")
        cold["mobilenet"] = cold_starts(work, state_dir, uint8.path.name, settings.cold_runs)
    return rows, cold


def run_serve(models: list[Variant], settings: Settings) -> list[Row]:
    rows: list[Row] = []
    with ray_serve(models) as port:
        for v in models:
            print(f"(c) Ray Serve: {v.name}", flush=True)
            raw = RawRunner(v.path, v.input_name, v.x)
            headers = {"Content-Type": "application/octet-stream"}
            body = v.x.tobytes()
            rows += measure(
                v,
                raw,
                {"serve": lambda v=v, b=body, h=headers: Poster(port, f"/{v.name}", b, h)},
                settings,
                os.getpid(),  # Ray and Serve run under this process
            )
    return rows


# Report


def machine() -> str:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def versions() -> str:
    from importlib.metadata import version

    names = ("ai-edge-litert", "ray", "httptools", "numpy", "tensorflow-cpu")
    found = []
    for name in names:
        with contextlib.suppress(Exception):
            found.append(f"{name} {version(name)}")
    return ", ".join(found)


def report(rows: list[Row], cold: dict[str, Any], command: str, settings: Settings) -> str:
    by = {(r.variant, r.path): r for r in rows}
    variant_names = list(dict.fromkeys(r.variant for r in rows))
    latency = [
        "| model | path | p50 ms | p99 ms | raw p50 ms | raw p99 ms | p50 over raw | "
        "p99 over raw | p50 / raw |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        latency.append(
            f"| {r.variant} | {r.path} | {r.p50:.3f} | {r.p99:.3f} | {r.raw_p50:.3f} | "
            f"{r.raw_p99:.3f} | {r.p50 - r.raw_p50:+.3f} | {r.p99 - r.raw_p99:+.3f} | "
            f"{r.p50 / r.raw_p50:.2f}x |"
        )
    rate = [
        "| model | path | " + " | ".join(f"c={c} req/s (raw) / raw" for c in CONCURRENCY) + " |",
        "| --- | --- | " + " | ".join("---" for _ in CONCURRENCY) + " |",
    ]
    for r in rows:
        if not r.rps:
            continue
        cells = [
            f"{r.rps[c]:.0f} ({r.raw_rps[c]:.0f}) / {r.rps[c] / r.raw_rps[c]:.2f}"
            for c in CONCURRENCY
        ]
        rate.append(f"| {r.variant} | {r.path} | " + " | ".join(cells) + " |")
    cpu_rows = [
        "| model | path | client | gateway process / bench process | Ray worker processes | "
        "Ray (GCS, raylet, ...) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.cpu is not None:
            cpu_rows.append(
                f"| {r.variant} | {r.path} | {r.cpu['client']:.2f} | {r.cpu['self']:.2f} | "
                f"{r.cpu['ray workers']:.2f} | {r.cpu['ray']:.2f} |"
            )
    targets = []
    for name in variant_names:
        b, s = by.get((name, "binary")), by.get((name, "serve"))
        if b is None:
            continue
        over50, over99 = b.p50 - b.raw_p50, b.p99 - b.raw_p99
        line = f"- {name}: (b) binary p50 over raw {over50:+.3f} ms, p99 over raw {over99:+.3f} ms"
        saturated = max(b.rps[c] / b.raw_rps[c] for c in CONCURRENCY) if b.rps else 0.0
        line += f"; best throughput ratio {saturated:.2f}"
        if s is not None:
            serve_over = s.p50 - s.raw_p50
            share = over50 / serve_over if serve_over > 0 else float("nan")
            line += f"; Ray Serve p50 over raw {serve_over:+.3f} ms, (b)/(c) overhead {share:.0%}"
        targets.append(line)

    window = f"{settings.window:.0f} s per path, raw and served alternating"

    def seconds(values: list[float]) -> str:
        return (
            f"median {statistics.median(values):.3f} s, min {min(values):.3f} s, "
            f"max {max(values):.3f} s ({len(values)} runs)"
        )

    return f"""{TITLE}

Machine: {machine()}. Versions: {versions()}.
Date: {time.strftime("%Y-%m-%d %H:%M %Z")}. Command: `{command}`.
The tables are ratios from one run on a machine that may have been running other work; run it
again to see the noise.

MobileNetV2 224 (`tf.keras.applications`, `weights=None`, fixed seed; float32, float16-quantised
weights, uint8 full-integer), batch 1, {THREADS} interpreter threads in every path. Client: a
plain socket speaking HTTP/1.1 (the request's bytes made once; the answer's head and
Content-Length body read), one persistent connection per client thread, in the benchmark's
own process on the same cores; the `http.client` row is the same calls through `http.client`.
`raw` is `LiteRTRunner.run` in-process, interleaved with the served calls of its row.
(b) `binary`: Triton binary tensors in and out; `json`: JSON tensors in, JSON out.
(c) `serve`: a Ray Serve deployment hosting the same interpreter, raw tensor bytes in and out
over Serve's HTTP proxy (the leanest body Serve can take). (b) and (c) run one after the other,
each with its own raw calls.

## Latency at concurrency 1 ({settings.iterations} calls per path; JSON {settings.json_iterations})

{chr(10).join(latency)}

## Throughput (requests per second; median of {settings.rounds} windows of {window})

Raw at concurrency c is c threads sharing the one interpreter (as the worker does).

{chr(10).join(rate)}

## CPU time per served request (ms), served calls alone at concurrency 1

With no request at all, over {IDLE_SECONDS:.0f} s: the `modelloader local` process used
{cold["idle"]["self"]:.1%} of a core, its Ray worker processes {cold["idle"]["ray workers"]:.1%},
the rest of Ray {cold["idle"]["ray"]:.1%}.

For (b) the second column is the `modelloader local` process: the gateway, with the control
loop and the Ray driver beside it; the worker processes include idle warm-pool processes. For
(c) it is the benchmark's own process (the client and Ray's driver), and Serve's proxy,
controller and replica are Ray worker processes. Raw inference itself costs about
{THREADS} x its latency (its threads share the cores).

{chr(10).join(cpu_rows)}

## Against the targets (p50 over raw <= 1.3 ms, p99 over raw <= 3 ms, throughput >= 0.90)

{chr(10).join(targets)}

## apply -> Ready

- everything at start (Ray started, {len(variant_names)} MobileNetV2 workers): {cold["first"]:.2f} s
- digits example (10.8 KB), manifest written into a running `modelloader local` -> Ready:
  {seconds(cold["digits"])}
- MobileNetV2 uint8 (3.9 MB), the same: {seconds(cold["mobilenet"])}
- The file watcher polls every 0.5 s (counted in these numbers).
{cold.get("pool", "")}
"""


def write_results(section: str, title: str = TITLE) -> None:
    """Replace a benchmark's section of RESULTS.md (by its title), keep the others."""
    path = REPO / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else ""
    kept: list[str] = []
    skipping = False
    for line in text.splitlines(keepends=True):
        if line.startswith("# "):
            skipping = line.startswith(title)
        if not skipping:
            kept.append(line)
    rest = "".join(kept).strip()
    path.write_text(section.rstrip() + "\n" + (f"\n{rest}\n" if rest else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows, for a smoke run")
    parser.add_argument("--variants", default=",".join(mobilenet.VARIANTS))
    parser.add_argument("--no-serve", action="store_true", help="skip Ray Serve (c)")
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    paths = mobilenet.build(MODEL_CACHE)
    models = variants({v: paths[v] for v in args.variants.split(",")})
    work = Path(tempfile.mkdtemp(prefix="mlbench-"))
    try:
        rows, cold = run_modelloader(models, work, settings)
        if not args.no_serve:
            rows += run_serve(models, settings)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "MAKELEVEL" in os.environ:
        command = "make bench"
    else:
        command = " ".join([os.path.relpath(sys.executable, REPO), *sys.argv])
    section = report(rows, cold, command, settings)
    print(section)
    if not args.no_write:
        write_results(section)


if __name__ == "__main__":
    main()
