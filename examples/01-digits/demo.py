"""`make demo`: start `modelloader local` on this folder, classify the held-out digits with
tritonclient, show the status, and stop everything.

    .venv/bin/python examples/01-digits/demo.py
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.http as triton

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent / "modelloader"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    port, metrics_port = free_port(), free_port()
    state_dir = tempfile.mkdtemp(prefix="mldemo-", dir="/tmp")
    command = [
        str(BIN),
        "local",
        str(HERE),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--state-dir",
        state_dir,
    ]
    print("$", " ".join(command), flush=True)
    started = time.monotonic()
    server = subprocess.Popen(command)
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        while True:
            if server.poll() is not None:
                print("modelloader local exited early", file=sys.stderr)
                return 1
            try:
                if client.is_model_ready("digits"):
                    break
            except Exception:
                pass  # not listening yet
            if time.monotonic() - started > 120:
                print("digits did not become ready in 120 s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print(
            f"\ndigits is Ready {time.monotonic() - started:.1f} s after start "
            "(most of it is starting Ray)\n"
        )

        samples = json.loads((HERE / "samples.json").read_text())["samples"]
        pixels = np.array([s["pixels"] for s in samples], dtype=np.float32)
        tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=True)
        result = client.infer("digits", [tensor])
        probabilities = result.as_numpy("probabilities")
        assert probabilities is not None
        correct = 0
        for sample, row in zip(samples, probabilities, strict=True):
            guess = int(row.argmax())
            correct += guess == sample["label"]
            print(f"label {sample['label']}  predicted {guess}  (p={row[guess]:.3f})")
        print(
            f"\n{correct}/{len(samples)} held-out digits classified correctly "
            f"over http://127.0.0.1:{port}/v2/models/digits/infer\n"
        )
        subprocess.run([str(BIN), "status", "--state-dir", state_dir], check=False)
        return 0 if correct >= len(samples) - 1 else 1
    finally:
        client.close()
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
        print(f"\nstopped (exit code {server.returncode})")


if __name__ == "__main__":
    sys.exit(main())
