"""First numbers for the embedded default: apply -> Ready, and one request's latency through the
gateway against calling the interpreter in-process, on the digits example. Side by side in one
run, interleaved so that drift hits both alike; results go to bench/RESULTS.md.

    make bench        (or .venv/bin/python bench/first_numbers.py)

The full data-plane benchmark (MobileNetV2, Ray Serve, throughput) is a later issue's.
"""

from __future__ import annotations

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
import time
from pathlib import Path

import numpy as np
from modelloader import control_channel
from modelloader_workers.litert_runner import LiteRTRunner

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "01-digits"
BIN = Path(sys.executable).parent / "modelloader"
ITERATIONS = 2000
WARMUP = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def manifest(name: str) -> str:
    return json.dumps(
        {
            "apiVersion": "modelloader.dev/v1alpha1",
            "kind": "LoadedModel",
            "metadata": {"name": name},
            "spec": {"source": {"uri": "file://digits.tflite"}, "accelerator": "cpu"},
        }
    )


def phase(state_dir: Path, name: str) -> str | None:
    items = control_channel.fetch(state_dir)["items"]
    return next((i["status"]["phase"] for i in items if i["name"] == name), None)


def wait_ready(state_dir: Path, name: str, timeout: float = 120) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            if phase(state_dir, name) == "Ready":
                return time.perf_counter() - started
        except control_channel.ControlUnavailable:
            pass
        time.sleep(0.01)
    raise TimeoutError(name)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="mlbench-"))
    state_dir = Path(tempfile.mkdtemp(prefix="mlbs-", dir="/tmp"))
    shutil.copy(EXAMPLE / "digits.tflite", work)
    (work / "digits.yaml").write_text(manifest("digits"))
    port = free_port()
    command = [
        str(BIN),
        "local",
        str(work),
        "--port",
        str(port),
        "--metrics-port",
        str(free_port()),
        "--state-dir",
        str(state_dir),
        "--cache-dir",
        str(work / "cache"),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = wait_ready(state_dir, "digits")
        applies = []
        for n in range(5):
            name = f"extra-{n}"
            started = time.perf_counter()
            (work / f"{name}.yaml").write_text(manifest(name))
            wait_ready(state_dir, name)
            applies.append(time.perf_counter() - started)

        samples = json.loads((EXAMPLE / "samples.json").read_text())["samples"]
        x = np.array([samples[3]["pixels"]], dtype=np.float32)
        runner = LiteRTRunner(str(EXAMPLE / "digits.tflite"), threads=1)
        binary_header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "FP32",
                        "shape": [1, 64],
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        binary_body = binary_header + x.tobytes()
        json_body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "FP32",
                        "shape": [1, 64],
                        "data": x.ravel().tolist(),
                    }
                ]
            }
        ).encode()
        connection = http.client.HTTPConnection("127.0.0.1", port)

        def post(body: bytes, headers: dict[str, str]) -> None:
            connection.request("POST", "/v2/models/digits/infer", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            assert response.status == 200

        timings: dict[str, list[float]] = {"raw": [], "binary": [], "json": []}
        calls = {
            "raw": lambda: runner.run({"pixels": x}),
            "binary": lambda: post(
                binary_body, {"Inference-Header-Content-Length": str(len(binary_header))}
            ),
            "json": lambda: post(json_body, {"Content-Type": "application/json"}),
        }
        for i in range(WARMUP + ITERATIONS):
            for name, call in calls.items():  # interleaved
                started = time.perf_counter()
                call()
                if i >= WARMUP:
                    timings[name].append((time.perf_counter() - started) * 1000)
        connection.close()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)

    raw50 = percentile(timings["raw"], 50)
    raw99 = percentile(timings["raw"], 99)
    rows = []
    for name in ("raw", "binary", "json"):
        p50, p99 = percentile(timings[name], 50), percentile(timings[name], 99)
        rows.append(f"| {name} | {p50:.3f} | {p99:.3f} | {p50 - raw50:+.3f} | {p99 - raw99:+.3f} |")
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    report = f"""# First numbers: `modelloader local`, digits example

Machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()},
Python {platform.python_version()}. Command: `make bench` (`bench/first_numbers.py`),
{time.strftime("%Y-%m-%d")}.

## apply -> Ready (digits, 10.8 KB, CPU)
- first model, including starting the local Ray: {first:.2f} s
- a manifest added to a running `modelloader local` (file written -> status Ready), 5 runs:
  median {statistics.median(applies):.3f} s, min {min(applies):.3f} s, max {max(applies):.3f} s
  (the file watcher polls every 0.5 s; the rest is a new Ray worker process and the load)

## One request, batch 1, thin client (`http.client`, persistent connection)
{ITERATIONS} calls each, interleaved; milliseconds. `raw` is `LiteRTRunner.run` in-process with
the same thread count; `binary` and `json` are POSTs to the gateway (Triton binary tensors and
JSON tensors), which forwards over the worker's Unix socket.

| path | p50 | p99 | p50 over raw | p99 over raw |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}
"""
    (REPO / "bench" / "RESULTS.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
