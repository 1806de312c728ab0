"""Fair sharing between origins: origin B's latency while origin A floods the gateway at ten
times its rate limit, against B alone, in one run of `modelloader local`.

    .venv/bin/python bench/fair_share.py [--seconds 10] [--rate 40] [--a-limit 50]

B sends steady traffic (--rate requests a second, one connection); A, limited to --a-limit
requests a second by its OriginPolicy, tries 10x that from its own threads. Each origin has its
own worker process (perModel). Results (B's p50/p99 alone and under the flood, and how A was
answered) are appended to bench/RESULTS.md. Target: B's p99 under the flood within 1.5x of
B alone.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

from tenants import serving, token

REPO = Path(__file__).resolve().parent.parent
BODY = json.dumps(
    {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
).encode()


ORIGINS = ["alpha", "beta"]
ALPHA_POLICY = {
    "apiVersion": "modelloader.dev/v1alpha1",
    "kind": "OriginPolicy",
    "metadata": {"name": "alpha"},
}


class Client:
    def __init__(self, port: int, origin: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token(origin)}",
        }

    def infer(self) -> tuple[int, float]:
        started = time.perf_counter()
        self.conn.request("POST", "/v2/models/digits/infer", BODY, self.headers)
        response = self.conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - started


def steady(port: int, rate: float, seconds: float) -> tuple[list[float], Counter[int]]:
    client = Client(port, "beta")
    latencies: list[float] = []
    codes: Counter[int] = Counter()
    interval = 1.0 / rate
    deadline = time.perf_counter() + seconds
    next_at = time.perf_counter()
    while next_at < deadline:
        time.sleep(max(0.0, next_at - time.perf_counter()))
        code, took = client.infer()
        codes[code] += 1
        if code == 200:
            latencies.append(took)
        next_at += interval
    return latencies, codes


def flood(
    port: int, rate: float, seconds: float, stop: threading.Event, codes: Counter[int]
) -> None:
    client = Client(port, "alpha")
    interval = 1.0 / rate
    next_at = time.perf_counter()
    deadline = time.perf_counter() + seconds
    while not stop.is_set() and next_at < deadline:
        time.sleep(max(0.0, next_at - time.perf_counter()))
        code, _ = client.infer()
        codes[code] += 1
        next_at += interval


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=40.0, help="B's steady requests/second")
    parser.add_argument("--a-limit", type=float, default=50.0, help="A's requestsPerSecond")
    parser.add_argument("--flood-threads", type=int, default=4)
    args = parser.parse_args()

    policy = {**ALPHA_POLICY, "spec": {"quota": {"requestsPerSecond": args.a_limit,
                                                  "maxConcurrentRequests": 8}}}  # fmt: skip
    with serving(ORIGINS, [policy]) as server:
        port = server.port
        steady(port, args.rate, 2.0)  # warm both paths
        alone, alone_codes = steady(port, args.rate, args.seconds)
        a_codes: Counter[int] = Counter()
        stop = threading.Event()
        per_thread = args.a_limit * 10 / args.flood_threads
        flooders = [
            threading.Thread(target=flood, args=(port, per_thread, args.seconds + 1, stop, a_codes))
            for _ in range(args.flood_threads)
        ]
        for thread in flooders:
            thread.start()
        time.sleep(0.5)
        flooded, flooded_codes = steady(port, args.rate, args.seconds)
        stop.set()
        for thread in flooders:
            thread.join()

    sent_by_a = sum(a_codes.values())
    rows = [
        ("B alone", alone, alone_codes),
        ("B while A floods", flooded, flooded_codes),
    ]
    cpu = platform.processor() or platform.machine()
    lines = [
        "",
        "# Fair sharing: one origin floods, another keeps its latency",
        "",
        f"Command: `.venv/bin/python bench/fair_share.py --seconds {args.seconds:g} --rate "
        f"{args.rate:g} --a-limit {args.a_limit:g}`; {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores ({cpu}), `modelloader local`, digits example, one worker "
        "process per origin. Client threads run on the same 2 cores as the gateway and workers.",
        "",
        f"A (limit {args.a_limit:g}/s, concurrency 8) tried {args.a_limit * 10:g}/s from "
        f"{args.flood_threads} connections: {sent_by_a} requests, answered "
        + ", ".join(f"{n}x {c}" for c, n in sorted(a_codes.items()))
        + ".",
        "",
        "| B's traffic | requests | errors | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, latencies, codes in rows:
        errors = sum(n for c, n in codes.items() if c != 200)
        lines.append(
            f"| {label} | {len(latencies)} | {errors} | {percentile(latencies, 0.5):.3f} | "
            f"{percentile(latencies, 0.99):.3f} |"
        )
    ratio = percentile(flooded, 0.99) / percentile(alone, 0.99)
    p50_ratio = statistics.median(flooded) / statistics.median(alone)
    lines += [
        "",
        f"B's p99 under the flood / alone: **{ratio:.2f}x** (target <= 1.5x); "
        f"p50: {p50_ratio:.2f}x.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(REPO / "bench" / "RESULTS.md", "a") as results:
        results.write(text)


if __name__ == "__main__":
    main()
