"""What the seccomp sandbox costs on the data path: one request's work in a worker (the
tensor received on a Unix socket, the digits model invoked, the reply sent) in a thread under the
filter against the same in an unfiltered thread, interleaved in one process.

    .venv/bin/python bench/sandbox_cost.py [--iterations 5000]

Appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import threading
import time
from pathlib import Path

import numpy as np
from modelloader_workers import sandbox
from modelloader_workers.litert_runner import LiteRTRunner

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "examples" / "01-digits" / "digits.tflite"
REQUEST_BYTES = 64 * 4  # one 8x8 image, float32
REPLY_BYTES = 10 * 4  # ten probabilities


def serve(conn: socket.socket, confined: bool, ready: threading.Event) -> None:
    if confined:
        assert sandbox.confine_thread(), sandbox.supported()
    runner = LiteRTRunner(str(MODEL), threads=1)
    ready.set()
    request = bytearray(REQUEST_BYTES)
    while True:
        view, got = memoryview(request), 0
        while got < REQUEST_BYTES:
            n = conn.recv_into(view[got:])
            if not n:
                return
            got += n
        pixels = np.frombuffer(request, np.float32).reshape(1, 64)
        outputs = runner.run({"pixels": pixels})
        conn.sendall(outputs["probabilities"].tobytes())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=5000)
    args = parser.parse_args()
    clients = {}
    for confined in (False, True):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ready = threading.Event()
        threading.Thread(target=serve, args=(theirs, confined, ready), daemon=True).start()
        ready.wait()
        clients[confined] = ours
    timings: dict[bool, list[float]] = {False: [], True: []}
    request = np.zeros((1, 64), np.float32).tobytes()
    for i in range(args.iterations + 200):
        for confined in (False, True) if i % 2 else (True, False):
            started = time.perf_counter()
            clients[confined].sendall(request)
            got = 0
            while got < REPLY_BYTES:
                got += len(clients[confined].recv(REPLY_BYTES - got))
            if i >= 200:
                timings[confined].append(time.perf_counter() - started)

    def q(values: list[float], p: float) -> float:
        return sorted(values)[int(p * (len(values) - 1))] * 1e6

    plain, filtered = timings[False], timings[True]
    lines = [
        "",
        "# The seccomp sandbox's cost on the data path",
        "",
        f"Command: `.venv/bin/python bench/sandbox_cost.py --iterations {args.iterations}`; "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores ({platform.machine()}). One "
        "request's work in a worker (tensor in over a Unix socket, digits invoked, reply out), "
        "in a thread under the filter and in one without, interleaved.",
        "",
        "| thread | p50 us | p99 us | mean us |",
        "| --- | --- | --- | --- |",
        f"| unfiltered | {q(plain, 0.5):.1f} | {q(plain, 0.99):.1f} | "
        f"{statistics.mean(plain) * 1e6:.1f} |",
        f"| seccomp filter | {q(filtered, 0.5):.1f} | {q(filtered, 0.99):.1f} | "
        f"{statistics.mean(filtered) * 1e6:.1f} |",
        "",
        f"Filtered / unfiltered p50: {q(filtered, 0.5) / q(plain, 0.5):.3f}x.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(REPO / "bench" / "RESULTS.md", "a") as results:
        results.write(text)


if __name__ == "__main__":
    main()
