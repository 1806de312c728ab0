"""JSON tensors: what reading the MobileNetV2 uint8 image's JSON body costs, by parser.

    .venv/bin/python bench/json_floor.py [--calls N] [--no-write]

The body is the one `bench/protocols.py` sends (the same image, `json.dumps` of the v2
request: 150,528 numbers, 0.69 MB). Timed in this process, interleaved call by call, medians:

- the gateway's own decode (`codec.decode_request`: simdjson, the buffer, the checks);
- simdjson's parse alone (a reused parser, as the gateway keeps one);
- `orjson.loads` (a Python int per value, before any array is made);
- a hand-written scalar C loop that reads only the `data` array's digits into a uint8
  buffer, no checks beyond the digits (compiled here with the system's `cc -O3`; skipped
  without one): about what a parser of our own in C, reading character by character, would
  spend on this body on this machine.

Issue 16's target is a JSON request at most 3 ms over raw. The REST binary path's own
overhead over raw (`bench/protocols.py`) plus a row here is what a JSON request would cost
over raw with that way of parsing, before the larger body's transfer and the checks.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import simdjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mobilenet
from dataplane import MODEL_CACHE, json_request, machine, variants, versions, write_results
from modelloader_gateway.codec import decode_request

TITLE = "# JSON tensors: what reading the uint8 image's JSON body costs, by parser"

# Digits only: 1 to 3 of them per value, separated by commas and spaces, up to the `]`.
C_LOOP = r"""
#include <stddef.h>
#include <stdint.h>
long read_u8(const char *s, size_t n, uint8_t *out, size_t cap) {
    size_t i = 0;
    long count = 0;
    for (;;) {
        while (i < n && (s[i] == ' ' || s[i] == ',')) i++;
        if (i >= n) return -1;
        if (s[i] == ']') return count;
        unsigned v = 0;
        size_t first = i;
        while (i < n && (unsigned)(s[i] - '0') < 10) {
            v = v * 10 + (unsigned)(s[i] - '0');
            i++;
        }
        if (i == first || i - first > 3 || v > 255 || (size_t)count >= cap) return -2;
        out[count++] = (uint8_t)v;
    }
}
"""


def c_loop(folder: Path) -> Any | None:
    compiler = shutil.which("cc")
    if compiler is None:
        return None
    source, library = folder / "read_u8.c", folder / "read_u8.so"
    source.write_text(C_LOOP)
    subprocess.run([compiler, "-O3", "-shared", "-fPIC", "-o", library, source], check=True)
    found = ctypes.CDLL(str(library)).read_u8
    found.restype = ctypes.c_long
    found.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    return found


def timed(calls: dict[str, Callable[[], object]], count: int) -> dict[str, float]:
    """Median milliseconds per call, the calls interleaved, 10 rounds of warm-up."""
    got: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(10 + count):
        for name, call in calls.items():
            began = time.perf_counter()
            call()
            if round_ >= 10:
                got[name].append((time.perf_counter() - began) * 1000)
    return {name: statistics.median(values) for name, values in got.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    image = next(v for v in variants(mobilenet.build(MODEL_CACHE)) if v.name == "uint8")
    body = json_request(image.input_name, image.datatype, image.x)
    start = body.index(b"[", body.index(b'"data"')) + 1
    reused = simdjson.Parser()
    out = np.empty(image.x.size, np.uint8)

    def simdjson_parse() -> None:
        document = reused.parse(body)
        del document  # the parser's buffers are reused only once its document is gone

    calls: dict[str, Callable[[], object]] = {
        "the gateway's decode (simdjson, buffer, checks)": lambda: decode_request(body, None),
        "simdjson's parse alone": simdjson_parse,
        "orjson.loads (Python ints)": lambda: orjson.loads(body),
    }
    with tempfile.TemporaryDirectory() as scratch:
        loop = c_loop(Path(scratch))
        if loop is not None:
            tail = body[start:]
            pointer = out.ctypes.data

            def read_digits() -> None:
                if loop(tail, len(tail), pointer, out.size) != out.size:
                    raise RuntimeError("the C loop misread the body")

            read_digits()
            if not np.array_equal(out, image.x.ravel()):
                raise RuntimeError("the C loop's values differ from the image")
            calls["a scalar C loop over the digits alone (cc -O3)"] = read_digits
        medians = timed(calls, args.calls)

    lines = [
        TITLE,
        "",
        f"Machine: {machine()}. Versions: {versions()}, pysimdjson {version('pysimdjson')}, "
        f"orjson {orjson.__version__}.",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Command: "
        f"`.venv/bin/python bench/json_floor.py --calls {args.calls}`.",
        f"The uint8 image's v2 JSON body ({len(body) / 1e6:.2f} MB, {image.x.size:,} values), "
        f"each way called {args.calls} times, interleaved; medians.",
        "",
        "| way | ms per body |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in medians.items()]
    if loop is None:
        lines.append("| a scalar C loop over the digits alone | (no `cc` on this machine) |")
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        write_results(section, TITLE)


if __name__ == "__main__":
    main()
