"""`modelloader local` with several origins (tenants), for the benchmarks that need them
(`fair_share.py`, `soak.py`): each origin gets the digits example in its own namespace and a
token Secret; the server runs on free ports in temporary folders."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloader import control_channel

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "01-digits"
BIN = Path(sys.executable).parent / "modelloader"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(origin: str) -> str:
    return f"{origin}-bench-token-0123456789"


def tenant_documents(origins: list[str]) -> list[dict[str, Any]]:
    """Per origin: the digits model in the namespace of its name, and its token Secret."""
    docs: list[dict[str, Any]] = []
    for origin in origins:
        docs.append(
            {
                "apiVersion": "modelloader.dev/v1alpha1",
                "kind": "LoadedModel",
                "metadata": {"name": "digits", "namespace": origin},
                "spec": {"source": {"uri": "file://digits.tflite"}, "accelerator": "cpu"},
            }
        )
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": "token",
                    "namespace": origin,
                    "labels": {"modelloader.dev/origin": origin},
                },
                "stringData": {"token": token(origin)},
            }
        )
    return docs


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    folder: Path


@contextlib.contextmanager
def serving(
    origins: list[str], extra: list[Mapping[str, Any]] | None = None, timeout: float = 180
) -> Iterator[Server]:
    """`modelloader local` serving `origins` (and `extra` documents), once all are Ready;
    stopped with Ctrl-C at the end."""
    folder = Path(tempfile.mkdtemp(prefix="mlbench-"))
    state_dir = Path(tempfile.mkdtemp(prefix="mlbs-", dir="/tmp"))
    shutil.copy(EXAMPLE / "digits.tflite", folder)
    docs = [*tenant_documents(origins), *(extra or [])]
    (folder / "tenants.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs) + "\n")
    port = free_port()
    log = open(folder / "local.log", "w")  # noqa: SIM115 (the server's whole life)
    process = subprocess.Popen(
        [str(BIN), "local", str(folder), "--port", str(port), "--metrics-port", "0",
         "--state-dir", str(state_dir), "--cache-dir", str(folder / "cache")],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, (folder / "local.log").read_text()
            assert time.monotonic() < deadline, "models did not become Ready"
            try:
                items = control_channel.fetch(state_dir)["items"]
                if len(items) == len(origins) and all(
                    i["status"]["phase"] == "Ready" for i in items
                ):
                    break
            except (OSError, control_channel.ControlUnavailable):
                pass
            time.sleep(0.3)
        yield Server(process, port, folder)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
        log.close()
        shutil.rmtree(state_dir, ignore_errors=True)
