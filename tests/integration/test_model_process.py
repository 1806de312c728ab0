"""The model process, for real: a fresh interpreter started as the worker starts it, sandboxed
before it parses a model. A probe (`tests/support/sandbox_probe.py`, started the same way and
sandboxed by the same code) tries what a hostile model would."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest
from modelloader_gateway.worker_client import WorkerClients, WorkerReply
from modelloader_workers import landlock, model_process, sandbox
from modelloader_workers.listeners import listen
from modelloader_workers.litert_runner import LiteRTRunner, ModelLoadError
from modelloader_workers.model_process import ModelProcess, ProcessLoad
from modelloader_workers.wire.address import Address

from tests.conftest import EXAMPLE
from tests.support.calls import infer_worker

REPO = Path(__file__).resolve().parents[2]
PROBE = "tests.support.sandbox_probe"

pytestmark = pytest.mark.skipif(
    sandbox.supported() is not None or landlock.abi() < 4,
    reason=f"no seccomp or Landlock ABI 4 here: {sandbox.supported()}, ABI {landlock.abi()}",
)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    cache = tmp_path / "cache" / "ours"
    cache.mkdir(parents=True)
    return Path(shutil.copy(EXAMPLE / "digits.tflite", cache))


@pytest.fixture
def tcp_listener() -> Iterator[tuple[socket.socket, Address]]:
    listener, address = listen(Address("tcp", "127.0.0.1"))
    yield listener, address
    listener.close()


def start_probe(
    attempt: str, model: Path, listener: socket.socket, **extra: object
) -> ModelProcess:
    process = ModelProcess.start(PROBE, [attempt, json.dumps(extra)], [str(REPO)])
    load = json.dumps({"load": ProcessLoad(model=str(model)).to_json()}).encode()
    socket.send_fds(process.control, [load], [listener.fileno()])
    return process


def test_every_thread_of_a_serving_model_process_is_filtered(model: Path, tmp_path: Path) -> None:
    listener, address = listen(Address("unix", str(tmp_path / "digits.sock")))
    process = ModelProcess.start()
    try:
        loaded = process.load(ProcessLoad(model=str(model), threads=2), listener)
        listener.close()
        assert "seccomp on every thread" in loaded.sandbox and "landlock" in loaded.sandbox
        tasks = list(Path(f"/proc/{process.pid}/task").iterdir())
        assert len(tasks) >= 2  # the interpreter's pool and the serving thread at least
        for task in tasks:
            fields = dict(
                line.split(":\t", 1)
                for line in (task / "status").read_text().splitlines()
                if ":\t" in line
            )
            assert fields["Seccomp"].strip() == "2", (task, fields["Seccomp"])
            assert fields["NoNewPrivs"].strip() == "1"
        # It answers, as the interpreter does, on the listener it was handed.
        pixels = json.loads((EXAMPLE / "samples.json").read_text())["samples"][0]["pixels"]
        inputs = {"pixels": np.asarray([pixels], dtype=np.float32)}
        expected = LiteRTRunner(str(model)).run(inputs)["probabilities"]

        async def ask() -> WorkerReply:
            clients = WorkerClients()
            try:
                return await infer_worker(clients, address, inputs)
            finally:
                clients.close()

        reply = asyncio.run(ask())
        np.testing.assert_array_equal(reply.outputs["probabilities"], expected)
    finally:
        process.stop()


def test_sandboxed_code_reaches_nothing_but_its_model_and_listener(
    model: Path,
    tmp_path: Path,
    tcp_listener: tuple[socket.socket, Address],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = tmp_path / "cache" / "theirs"
    other.mkdir()
    shutil.copy(EXAMPLE / "digits.tflite", other / "their.tflite")
    token = tmp_path / "ray" / "session_latest" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text("secret")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    listener, address = tcp_listener
    with socket.create_server(("127.0.0.1", 0)) as outside:
        files = {
            "another model": str(other / "their.tflite"),
            "ray token": str(token),
            "/etc/passwd": "/etc/passwd",
            "home": str(Path.home() / ".bashrc"),
        }
        process = start_probe("report", model, listener, port=outside.getsockname()[1], files=files)
        try:
            with socket.create_connection(("127.0.0.1", address.port), timeout=30) as conn:
                assert conn.recv(16) == b"answered"
            outcomes = json.loads(process.control.recv(1 << 20))
        finally:
            process.stop()
    assert outcomes["own model"] == "allowed"
    for name in ("tcp socket", "unix socket", "socketpair", "connect"):
        assert outcomes[name] == "PermissionError", (name, outcomes)
    for name in files:
        if os.path.exists(files[name]):
            assert outcomes[name] == "PermissionError", (name, outcomes)
    assert not {"RAY_AUTH_TOKEN", "KUBERNETES_SERVICE_HOST"} & set(outcomes["environment"])
    assert not [k for k in outcomes["environment"] if k.startswith("RAY_")]


@pytest.mark.parametrize("attempt", ["exec", "fork"])
def test_exec_and_fork_kill_the_model_process(
    attempt: str, model: Path, tcp_listener: tuple[socket.socket, Address]
) -> None:
    process = start_probe(attempt, model, tcp_listener[0])
    assert json.loads(process.control.recv(1024)) == {"about": attempt}
    assert process.wait(30) == -signal.SIGSYS


def test_a_load_that_never_ends_is_stopped_with_a_message(
    model: Path, tcp_listener: tuple[socket.socket, Address], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_process, "LOAD_SECONDS", 1.0)
    process = ModelProcess.start(PROBE, ["hang"], [str(REPO)])
    with pytest.raises(ModelLoadError, match="did not load within 1 s"):
        process.load(ProcessLoad(model=str(model)), tcp_listener[0])
    assert process.wait(5) == -signal.SIGKILL  # it ignored the close: killed


@pytest.mark.parametrize(
    ("attempt", "message"),
    [("nonsense", "answered nonsense: RecursionError"), ("big", "x" * 2000 + "$")],
)
def test_what_a_hostile_process_answers_fails_only_its_load(
    attempt: str, message: str, model: Path, tcp_listener: tuple[socket.socket, Address]
) -> None:
    process = ModelProcess.start(PROBE, [attempt], [str(REPO)])
    with pytest.raises(ModelLoadError, match=message):
        process.load(ProcessLoad(model=str(model)), tcp_listener[0])
    assert process.wait(5) is not None  # stopped, and reaped


def line_within(stream: IO[str], seconds: float) -> str:
    """The next line, or a failure after `seconds` (not the suite's timeout)."""
    ready, _, _ = select.select([stream], [], [], seconds)
    assert ready, f"no line within {seconds:g} s"
    return stream.readline()


def test_model_processes_forked_by_a_spawner_are_adopted_sandboxed_and_alone(
    model: Path, tmp_path: Path
) -> None:
    """What a supervisor does: a spawner (a clean interpreter) forks each model process; the
    supervisor adopts it (its parent), it holds no descriptor of the spawner's, sandboxes
    itself like a fresh one, answers, and its death is the supervisor's to see and explain."""
    checker = subprocess.Popen(
        [sys.executable, "-m", "tests.support.spawner_check", str(model), str(tmp_path)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"RAY_AUTH_TOKEN": "secret"},
    )
    try:
        assert checker.stdin is not None and checker.stdout is not None
        report = json.loads(line_within(checker.stdout, 120))
        pids = [m["pid"] for m in report["models"]]
        assert len(set(pids)) == 2
        pixels = json.loads((EXAMPLE / "samples.json").read_text())["samples"][0]["pixels"]
        inputs = {"pixels": np.asarray([pixels], dtype=np.float32)}
        expected = LiteRTRunner(str(model)).run(inputs)["probabilities"]
        for seen in report["models"]:
            assert seen["ppid"] == report["supervisor"]  # adopted: not the spawner's child
            assert set(seen["seccomp"]) == {"2"}, seen["seccomp"]
            assert "landlock" in seen["sandbox"]
            assert not any(k.startswith("RAY_") for k in seen["environment"])
            # Before its load: the standard streams and its control socket, nothing of the
            # spawner's (the listener comes with the load).
            assert set(seen["fds"]) == {"0", "1", "2", "3"}, seen["fds"]
            assert seen["fds"]["3"].startswith("socket:")

            async def ask(where: str) -> WorkerReply:
                clients = WorkerClients()
                try:
                    return await infer_worker(clients, Address("unix", where), inputs)
                finally:
                    clients.close()

            reply = asyncio.run(ask(seen["address"]))
            np.testing.assert_array_equal(reply.outputs["probabilities"], expected)
        checker.stdin.write("kill\n")
        checker.stdin.flush()
        death = json.loads(line_within(checker.stdout, 60))
        assert death["code"] == -signal.SIGKILL
        assert "killed by SIGKILL" in death["death"] and death["other"] is True
        assert checker.wait(30) == 0
    finally:
        checker.kill()
        checker.wait()


def test_without_pidfds_a_worker_starts_each_model_process_afresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kernel without pidfds (before 5.3) cannot have adopted processes waited for
    safely: no spawner, and (without becoming a subreaper) a fresh interpreter per model."""
    from modelloader_workers import spawner
    from modelloader_workers.worker import ModelWorker

    def missing(pid: int) -> int:
        raise OSError(errno.ENOSYS, "pidfd_open")

    monkeypatch.setattr(os, "pidfd_open", missing)
    assert spawner.Spawner.start() is None
    worker = ModelWorker()
    spare = worker._spare
    assert worker._spawner is None and spare is not None
    try:
        # Started by the worker itself (Popen), not adopted; its argv may not be set yet.
        assert isinstance(spare._process, subprocess.Popen)
        assert Path(f"/proc/{spare.pid}/status").read_text().count(f"PPid:\t{os.getpid()}") == 1
    finally:
        spare.stop()
