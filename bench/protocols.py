"""gRPC and REST, binary and JSON tensors, driven by Triton's perf_analyzer, side by side with
the raw interpreter in one run.

    .venv/bin/python bench/protocols.py [--quick] [--no-write]

MobileNetV2 224 (uint8 and float32, `threads: 2`) on `modelloader local`. For each model, at
concurrency 1 then 4, perf_analyzer (`-i grpc`; `-i http` with binary tensors; `-i http` with
JSON tensors) runs one path at a time, and the raw interpreter (`LiteRTRunner.run` in this
process) is measured before the first and after each, so every path is compared with the raw
runs on either side of it. perf_analyzer builds and parses JSON bodies itself, a cost a client
pays, so JSON is also measured with the bench's own socket client and a body made once
(`dataplane.Poster`), interleaved call by call with raw calls: that row is the server's share.
The gateway's CPU time per request comes from its process's counters and the model's
statistics (`/v2/models/NAME/stats`).

perf_analyzer 2.60's wheel is built for glibc 2.38; on an older system (Debian 12 has 2.36) it
is run through the loader of Debian 13's libc, with its libstdc++ and libgcc, unpacked from
the Debian packages into ~/.cache/modelloader/perf-analyzer (`apt-get download` from a source
list of its own: the system's apt configuration is not touched). Downloads happen on the first
run only; this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloader_workers.litert_runner import LiteRTRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mobilenet
from dataplane import (
    MODEL_CACHE,
    Poster,
    RawRunner,
    Variant,
    binary_request,
    free_port,
    json_request,
    latencies,
    machine,
    modelloader_local,
    throughput,
    variants,
    versions,
    write_results,
)

TITLE = "# Protocols: gRPC and REST, binary and JSON, by perf_analyzer"
PERF_ANALYZER = "2.60.0"
TOOL_DIR = Path.home() / ".cache" / "modelloader" / f"perf-analyzer-{PERF_ANALYZER}"
TRIXIE = "deb http://deb.debian.org/debian trixie main\n"
PATHS = ("gRPC", "REST binary", "REST JSON")


@dataclass(frozen=True)
class Settings:
    window_ms: int  # perf_analyzer's measurement window
    raw_calls: int  # raw latency samples per raw run
    raw_window: float  # seconds per raw throughput window
    poster_calls: int  # socket-client samples per path (JSON bodies are big: slow)


FULL = Settings(window_ms=3000, raw_calls=300, raw_window=3.0, poster_calls=200)
QUICK = Settings(window_ms=1500, raw_calls=100, raw_window=1.5, poster_calls=60)


# perf_analyzer, fetched and made runnable


def _glibc() -> tuple[int, int]:
    name, version = platform.libc_ver()
    if name != "glibc":
        return (0, 0)
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def perf_analyzer() -> list[str]:
    """The command that runs perf_analyzer here, fetched into TOOL_DIR the first time."""
    binary = TOOL_DIR / "wheel" / "perf_analyzer" / "bin" / "perf_analyzer"
    if not binary.exists():
        wheels = TOOL_DIR / "download"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"perf-analyzer=={PERF_ANALYZER}",
                "--no-deps",
                "--only-binary=:all:",
                "--platform",
                "manylinux_2_38_x86_64",
                "--dest",
                str(wheels),
            ],
            check=True,
        )
        (wheel,) = wheels.glob("perf_analyzer-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(TOOL_DIR / "wheel")
        binary.chmod(0o755)
    if _glibc() >= (2, 38):
        return [str(binary)]
    libs = TOOL_DIR / "trixie" / "root" / "usr" / "lib" / "x86_64-linux-gnu"
    if not (libs / "ld-linux-x86-64.so.2").exists():
        _unpack_trixie_libc(TOOL_DIR / "trixie")
    return [str(libs / "ld-linux-x86-64.so.2"), "--library-path", str(libs), str(binary)]


def _unpack_trixie_libc(root: Path) -> None:
    """Debian 13's libc6, libstdc++6 and libgcc-s1, unpacked (not installed) under `root`."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SystemExit("perf_analyzer needs glibc 2.38: install it, or run this on Debian")
    for folder in ("lists/partial", "cache/archives/partial", "debs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "sources.list").write_text(TRIXIE)
    private = [
        f"-oDir::Etc::sourcelist={root / 'sources.list'}",
        "-oDir::Etc::sourceparts=/nonexistent",
        f"-oDir::State::Lists={root / 'lists'}",
        f"-oDir::Cache={root / 'cache'}",
        "-oAPT::Sandbox::User=root" if os.geteuid() == 0 else "-oDebug::NoLocking=1",
    ]
    subprocess.run(["apt-get", *private, "update"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", *private, "download", "libc6", "libstdc++6", "libgcc-s1"],
        check=True,
        cwd=root / "debs",
        stdout=subprocess.DEVNULL,
    )
    for deb in (root / "debs").glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root / "root")], check=True)


# Runs


@dataclass(frozen=True)
class Measured:
    p50_ms: float
    p99_ms: float
    per_second: float
    gateway_cpu_ms: float  # the gateway process's CPU time per request


def inference_count(port: int, model: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/stats") as answer:
        return int(json.load(answer)["model_stats"][0]["inference_count"])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def input_data(variant: Variant, folder: Path) -> Path:
    """The image every path sends, as perf_analyzer's input-data file: the same values as
    the raw runs' (its own random FP32 bytes would be mostly huge, tiny or NaN)."""
    found = folder / f"{variant.name}-input.json"
    content = {"content": variant.x.ravel().tolist(), "shape": list(variant.x.shape)}
    found.write_text(json.dumps({"data": [{variant.input_name: content}]}))
    return found


def run_perf_analyzer(
    command: list[str],
    model: str,
    path: str,
    ports: dict[str, int],
    concurrency: int,
    settings: Settings,
    pid: int | None,
    data: Path,
) -> Measured:
    """perf_analyzer on one path; with `pid`, the gateway's CPU time per request too."""
    protocol = "grpc" if path == "gRPC" else "http"

    def counters() -> tuple[int, float]:
        if pid is None:
            return 0, 0.0
        return inference_count(ports["http"], model), cpu_seconds(pid)

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "pa.csv"
        args = [
            *command,
            "-m",
            model,
            "-u",
            f"127.0.0.1:{ports[protocol]}",
            "-i",
            protocol,
            "--concurrency-range",
            str(concurrency),
            "--measurement-interval",
            str(settings.window_ms),
            "-f",
            str(out),
            "--input-data",
            str(data),
        ]
        if path == "REST JSON":
            args += ["--input-tensor-format", "json", "--output-tensor-format", "json"]
        # Stable to within 25% over three windows; a busy host may need more slack.
        for stability in ("25", "60"):
            count, cpu = counters()
            done = subprocess.run(
                [*args, "--stability-percentage", stability, "--max-trials", "8"],
                capture_output=True,
                text=True,
            )
            count_after, cpu_after = counters()
            requests, used = count_after - count, cpu_after - cpu
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(
                f"perf_analyzer {path} failed:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"
            )
        row = next(csv.DictReader(out.read_text().splitlines()))
    return Measured(
        p50_ms=float(row["p50 latency"]) / 1000,
        p99_ms=float(row["p99 latency"]) / 1000,
        per_second=float(row["Inferences/Second"]),
        gateway_cpu_ms=used * 1000 / max(1, requests),
    )


@contextlib.contextmanager
def fixed_answers(variant: Variant) -> Iterator[dict[str, int]]:
    """`fixed_answer.py` for gRPC and for HTTP, answering as this model would; yields their
    ports by protocol."""
    output = LiteRTRunner(str(variant.path), threads=1).signature.outputs[0]
    spec = {
        "input": [variant.input_name, variant.datatype, list(variant.x.shape)],
        "output": [output.name, output.datatype, [max(1, d) for d in output.shape]],
    }
    ports = {"grpc": free_port(), "http": free_port()}
    servers = [
        subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("fixed_answer.py")),
                protocol,
                str(port),
                variant.name,
                json.dumps(spec),
            ]
        )
        for protocol, port in ports.items()
    ]
    try:
        for port in ports.values():
            _wait_for_port(port)
        yield ports
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)


def _wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def raw_latency(raw: RawRunner, calls: int) -> tuple[float, float]:
    timings = latencies({"raw": raw}, calls, warmup=10)["raw"]
    return statistics.median(timings), statistics.quantiles(timings, n=100)[98]


def side_by_side(
    command: list[str],
    variant: Variant,
    ports: dict[str, int],
    settings: Settings,
    pid: int,
    data: Path,
) -> dict[Any, Any]:
    """Each path at concurrency 1 and 4, the raw interpreter measured between them; at
    concurrency 1, gRPC and REST binary each followed by its floor (`fixed_answers`)."""
    raw = RawRunner(variant.path, variant.input_name, variant.x)
    out: dict[Any, Any] = {"floor": {}}
    with fixed_answers(variant) as fixed:
        before = raw_latency(raw, settings.raw_calls)
        for path in PATHS:
            served = run_perf_analyzer(command, variant.name, path, ports, 1, settings, pid, data)
            if path != "REST JSON":
                out["floor"][path] = run_perf_analyzer(
                    command, variant.name, path, fixed, 1, settings, None, data
                ).p50_ms
            after = raw_latency(raw, settings.raw_calls)
            out[(path, 1)] = (served, [before, after])
            before = after
    raw_before = throughput(lambda: raw, 4, settings.raw_window)
    for path in PATHS:
        served = run_perf_analyzer(command, variant.name, path, ports, 4, settings, pid, data)
        raw_after = throughput(lambda: raw, 4, settings.raw_window)
        out[(path, 4)] = (served, [raw_before, raw_after])
        raw_before = raw_after

    # The server's share of JSON: bodies made once, sent by a plain socket, call by call
    # against raw calls.
    url = f"/v2/models/{variant.name}/infer"
    body, header_length = binary_request(variant.input_name, variant.datatype, variant.x)
    binary = Poster(ports["http"], url, body, {"Inference-Header-Content-Length": header_length})
    text = json_request(variant.input_name, variant.datatype, variant.x)
    as_json = Poster(ports["http"], url, text, {"Content-Type": "application/json"})
    timed = latencies(
        {"raw": raw, "binary": binary, "json": as_json}, settings.poster_calls, warmup=10
    )
    binary.close()
    as_json.close()
    out["poster"] = {name: statistics.median(values) for name, values in timed.items()}
    out["json_bytes"] = len(text)
    return out


# Report


def report(results: dict[str, dict[Any, Any]], command: str, settings: Settings) -> str:
    lines = [
        TITLE,
        "",
        f"Machine: {machine()}. Versions: {versions()}, perf_analyzer {PERF_ANALYZER}.",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Command: `{command}`.",
        "MobileNetV2 224 on `modelloader local`, `threads: 2`; perf_analyzer's windows of "
        f"{settings.window_ms} ms, stable to 25% over three (60% where the host would not "
        "settle); raw: the interpreter in the bench's process, measured before and after "
        "each served path (the overhead is against the mean of the two).",
        "",
        "## Concurrency 1: p50 and p99 latency (ms), overhead over raw",
        "",
        "| model | path | p50 | raw p50 | p50 over raw | p99 | p99 over raw | "
        "gateway CPU / request (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, found in results.items():
        for path in PATHS:
            served, raws = found[(path, 1)]
            raw50 = statistics.mean(r[0] for r in raws)
            raw99 = statistics.mean(r[1] for r in raws)
            lines.append(
                f"| {model} | {path} | {served.p50_ms:.2f} | {raw50:.2f} | "
                f"**{served.p50_ms - raw50:+.2f}** | {served.p99_ms:.2f} | "
                f"{served.p99_ms - raw99:+.2f} | {served.gateway_cpu_ms:.2f} |"
            )
    lines += [
        "",
        "## Concurrency 4: throughput (inferences/s) against raw's",
        "",
        "| model | path | served | raw | ratio | gateway CPU / request (ms) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for model, found in results.items():
        for path in PATHS:
            served, raws = found[(path, 4)]
            raw = statistics.mean(raws)
            lines.append(
                f"| {model} | {path} | {served.per_second:.1f} | {raw:.1f} | "
                f"**{served.per_second / raw:.2f}** | {served.gateway_cpu_ms:.2f} |"
            )
    lines += [
        "",
        "## JSON, the server's share: bodies made once, a plain socket client (p50, ms)",
        "",
        "| model | JSON body | raw | REST binary | REST JSON | JSON over raw | JSON over binary |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, found in results.items():
        p = found["poster"]
        lines.append(
            f"| {model} | {found['json_bytes'] / 1e6:.2f} MB | {p['raw']:.2f} | "
            f"{p['binary']:.2f} | {p['json']:.2f} | **{p['json'] - p['raw']:+.2f}** | "
            f"{p['json'] - p['binary']:+.2f} |"
        )
    lines += [
        "",
        "## Each protocol's floor: the same client against a server that answers at once",
        "",
        "`bench/fixed_answer.py` (grpc.aio for gRPC, a few lines of asyncio for HTTP), the same "
        "image sent, concurrency 1, each run right after the served path's, p50 (ms). What is "
        "left of a path's overhead over raw once its floor is taken away is what the gateway "
        "and the worker add.",
        "",
        "| model | gRPC floor | REST binary floor | gRPC over raw, less its floor | "
        "REST binary over raw, less its floor |",
        "| --- | --- | --- | --- | --- |",
    ]
    for model, found in results.items():
        floor = found["floor"]
        less = {}
        for path in ("gRPC", "REST binary"):
            served, raws = found[(path, 1)]
            less[path] = served.p50_ms - statistics.mean(r[0] for r in raws) - floor[path]
        lines.append(
            f"| {model} | {floor['gRPC']:.2f} | {floor['REST binary']:.2f} | "
            f"{less['gRPC']:+.2f} | {less['REST binary']:+.2f} |"
        )
    uint8 = results.get("uint8", {})
    lines += ["", "## Against the targets", ""]
    if uint8:
        grpc, grpc_raw = uint8[("gRPC", 1)]
        rest, rest_raw = uint8[("REST binary", 1)]
        grpc_over = grpc.p50_ms - statistics.mean(r[0] for r in grpc_raw)
        rest_over = rest.p50_ms - statistics.mean(r[0] for r in rest_raw)
        ratios = {
            m: f[("gRPC", 4)][0].per_second / statistics.mean(f[("gRPC", 4)][1])
            for m, f in results.items()
        }
        lines += [
            "| target | measured |",
            "| --- | --- |",
            f"| gRPC p50 overhead <= REST binary's (uint8) | {grpc_over:+.2f} vs "
            f"{rest_over:+.2f} ms |",
            "| gRPC throughput at concurrency 4 >= 0.85 of raw | "
            + ", ".join(f"{m} {r:.2f}" for m, r in ratios.items())
            + " |",
            f"| JSON p50 overhead for the uint8 image <= 3 ms | "
            f"{uint8['poster']['json'] - uint8['poster']['raw']:+.2f} ms (server's share, "
            f"socket client); perf_analyzer's JSON row includes its own JSON work |",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    command = perf_analyzer()
    paths = mobilenet.build(MODEL_CACHE)
    chosen = [v for v in variants(paths) if v.name in ("uint8", "float32")]
    results: dict[str, dict[Any, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mlproto-") as scratch:
        work = Path(scratch)
        names = {}
        for variant in chosen:
            shutil.copy(variant.path, work / variant.path.name)
            names[variant.name] = variant.path.name
        grpc_port = free_port()
        with modelloader_local(work, names, grpc_port=grpc_port) as (port, _, _, pid):
            ports = {"http": port, "grpc": grpc_port}
            for variant in chosen:
                print(f"measuring {variant.name}", flush=True)
                data = input_data(variant, work)
                results[variant.name] = side_by_side(command, variant, ports, settings, pid, data)
    shown = "bench/protocols.py" + (" --quick" if args.quick else "")
    section = report(results, f".venv/bin/python {shown}", settings)
    print(section)
    if not args.no_write:
        write_results(section, TITLE)


if __name__ == "__main__":
    main()
