"""Hostile model files loaded beside a good model under steady traffic.

`modelloader local` serves `digits`; a client keeps asking it while ~50 mutated copies of its
file (tests/hostile_models.py) are added. Each mutant must end Failed with a message, or Ready
and answering (200 or 4xx, never a hang); none may stay Loading; `digits` must answer every
request; the process must be alive at the end. Each model has its own worker process, so a
file that crashes LiteRT kills only its own worker.
"""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE
from tests.e2e.conftest import LocalServer, manifest, running_local
from tests.hostile_models import write_hostile_models

pytestmark = pytest.mark.e2e

SETTLE_SECONDS = 150.0  # every mutant out of Loading by then
PIXELS = json.loads((EXAMPLE / "samples.json").read_text())["samples"][0]["pixels"]
BODY = json.dumps(
    {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": PIXELS}]}
).encode()


@dataclass
class SteadyClient:
    """Sends one request to `digits` every 20 ms on a kept-alive connection; counts failures."""

    port: int
    sent: int = 0
    errors: list[str] = field(default_factory=list)
    slowest: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                connection.request("POST", "/v2/models/digits/infer", body=BODY)
                response = connection.getresponse()
                payload = response.read()
                if response.status != 200:
                    self.errors.append(f"{response.status}: {payload[:200]!r}")
            except (OSError, http.client.HTTPException) as error:
                self.errors.append(f"{type(error).__name__}: {error}")
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self.sent += 1
            self.slowest = max(self.slowest, time.perf_counter() - started)
            self._stop.wait(0.02)
        connection.close()

    def stop(self) -> None:
        self._stop.set()


def infer_status(port: int, name: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        connection.request("POST", f"/v2/models/{name}/infer", body=BODY)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def settle(local: LocalServer, names: list[str]) -> dict[str, dict[str, str]]:
    """Each mutant's phase and message once none is Loading (or the deadline passes)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        assert local.process.poll() is None, local.log()
        items = {i["name"]: i["status"] for i in local.status()["items"]}
        outcome = {
            n: {"phase": items[n]["phase"], "message": items[n].get("message", "")}
            for n in names
            if n in items
        }
        pending = [n for n in names if outcome.get(n, {}).get("phase") in (None, "Loading")]
        if not pending or time.monotonic() > deadline:
            return outcome
        time.sleep(0.5)


def test_hostile_model_files_fail_alone(tmp_path: Path) -> None:
    folder = tmp_path / "hostile"
    folder.mkdir()
    shutil.copy(EXAMPLE / "digits.tflite", folder)
    (folder / "digits.yaml").write_text(
        manifest("digits", "file://digits.tflite", accelerator="cpu")
    )
    with running_local(folder) as local:
        local.wait_for({"digits": "Ready"})
        client = SteadyClient(local.port)
        thread = threading.Thread(target=client.run, daemon=True)
        thread.start()
        try:
            mutants = sorted(write_hostile_models(EXAMPLE / "digits.tflite", folder))
            started = time.monotonic()
            (folder / "mutants.yaml").write_text(
                "---\n".join(manifest(n, f"file://{n}.tflite", accelerator="cpu") for n in mutants)
            )
            outcome = settle(local, mutants)
            settle_seconds = time.monotonic() - started
            answers = {
                n: infer_status(local.port, n) for n in mutants if outcome[n]["phase"] == "Ready"
            }
        finally:
            client.stop()
            thread.join(timeout=30)
        alive = local.process.poll() is None
        log = local.log()

    failed = {n for n, o in outcome.items() if o["phase"] == "Failed"}
    summary = (
        f"{len(mutants)} mutants: {len(failed)} Failed, {len(answers)} Ready "
        f"(answers {sorted(answers.values())}), settled in {settle_seconds:.1f}s; "
        f"digits: {client.sent} requests, {len(client.errors)} errors, "
        f"slowest {client.slowest * 1000:.0f} ms"
    )
    print(summary)
    assert len(mutants) >= 30
    assert set(outcome) == set(mutants), f"missing from status: {set(mutants) - set(outcome)}"
    stuck = {n: o for n, o in outcome.items() if o["phase"] not in ("Failed", "Ready")}
    assert not stuck, f"not settled after {SETTLE_SECONDS}s: {stuck}\n{summary}"
    silent = [n for n in failed if not outcome[n]["message"].strip()]
    assert not silent, f"Failed without a message: {silent}"
    bad_answers = {n: s for n, s in answers.items() if not (s == 200 or 400 <= s < 500)}
    assert not bad_answers, f"Ready mutants answering badly: {bad_answers}"
    assert client.sent > 50, summary
    assert client.errors == [], f"{summary}\n{client.errors[:10]}"
    assert alive, log
