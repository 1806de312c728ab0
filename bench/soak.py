"""Soak: `modelloader local` serving 10 origins at moderate load for a long time; resident
memory of every process it runs (itself, Ray's, each worker) must stay flat and no request
may fail.

    .venv/bin/python bench/soak.py [--minutes 30] [--rate 10]

Each origin has its own model (the digits example), token and worker process; one client
thread per origin sends --rate requests a second. RSS is sampled every 30 s; the first
samples (the first 2 minutes) are warm-up. Appends a summary to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import threading
import time
from collections import Counter
from pathlib import Path

from tenants import serving, token

REPO = Path(__file__).resolve().parent.parent
ORIGINS = [f"tenant{i}" for i in range(10)]
BODY = json.dumps(
    {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
).encode()


def descendants(root: int) -> dict[int, str]:
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                names[int(entry.name)] = stat.split("(", 1)[1].rsplit(")", 1)[0]
            except (OSError, ValueError, IndexError):
                continue
    found = {root: names.get(root, "?")}
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in found and pid not in found:
                found[pid] = names.get(pid, "?")
                changed = True
    return found


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def client(port: int, origin: str, rate: float, stop: threading.Event, codes: Counter[int]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token(origin)}"}
    next_at = time.monotonic()
    while not stop.is_set():
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at += 1.0 / rate
        try:
            conn.request("POST", "/v2/models/digits/infer", BODY, headers)
            response = conn.getresponse()
            response.read()
            codes[response.status] += 1
        except (OSError, http.client.HTTPException):
            codes[0] += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=10.0, help="requests/s per origin")
    parser.add_argument("--sample-seconds", type=float, default=30.0)
    args = parser.parse_args()
    codes: Counter[int] = Counter()
    samples: list[dict[int, int]] = []
    names: dict[int, str] = {}
    stop = threading.Event()
    with serving(ORIGINS) as server:
        port, process = server.port, server.process
        threads = [
            threading.Thread(target=client, args=(port, o, args.rate, stop, codes), daemon=True)
            for o in ORIGINS
        ]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        while time.monotonic() - started < args.minutes * 60:
            found = descendants(process.pid)
            names.update(found)
            samples.append({pid: rss(pid) for pid in found})
            print(
                f"{(time.monotonic() - started) / 60:5.1f} min: {sum(samples[-1].values()) >> 20} "
                f"MiB in {len(found)} processes; replies {dict(codes)}",
                flush=True,
            )
            time.sleep(args.sample_seconds)
        stop.set()
        for thread in threads:
            thread.join(30)
        alive_at_end = process.poll() is None

    warmup = max(1, int(120 / args.sample_seconds))
    steady = samples[warmup:] or samples
    first, last = steady[0], steady[-1]
    rows = []
    worst = 0.0
    for pid in sorted(first, key=lambda p: -first[p]):
        if pid not in last or first[pid] < (8 << 20):
            continue  # gone, or a tiny helper process
        peak = max(s.get(pid, 0) for s in steady)
        growth = (last[pid] - first[pid]) / first[pid]
        worst = max(worst, (peak - first[pid]) / first[pid])
        rows.append(
            f"| {names.get(pid, '?')} | {first[pid] >> 20} | {last[pid] >> 20} | "
            f"{peak >> 20} | {growth * 100:+.1f}% |"
        )
    total = sum(codes.values())
    errors = total - codes.get(200, 0)
    lines = [
        "",
        "# Soak: 10 origins at moderate load",
        "",
        f"Command: `.venv/bin/python bench/soak.py --minutes {args.minutes:g} --rate "
        f"{args.rate:g}`; {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores "
        f"({platform.machine()}). {len(ORIGINS)} origins, one digits model and worker each, "
        f"{args.rate:g} requests/s per origin ({args.rate * len(ORIGINS):g}/s in all), RSS "
        f"sampled every {args.sample_seconds:g} s; the first 2 minutes are warm-up.",
        "",
        f"Requests: {total}, errors: {errors} ({dict(codes)}); modelloader local alive at the "
        f"end: {alive_at_end}. Largest rise of any process's RSS above its first steady "
        f"sample: {worst * 100:.1f}% (promise: within 10%).",
        "",
        "| process | first MiB | last MiB | peak MiB | last vs first |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(REPO / "bench" / "RESULTS.md", "a") as results:
        results.write(text)


if __name__ == "__main__":
    main()
