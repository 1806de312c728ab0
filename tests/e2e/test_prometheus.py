"""A real Prometheus scrapes `modelloader local` serving the example while tritonclient sends
known traffic; PromQL then checks each series, and every dashboard panel's query returns data.

Prometheus is Debian's package (`.ci/run` installs it): the test skips without it, and fails
under CI=true.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from modelloader_gateway.nvml_metrics import NvmlCollector
from tritonclient.utils import InferenceServerException

from tests.conftest import EXAMPLE, REPO
from tests.e2e.conftest import BIN, LocalServer, free_port
from tests.support.prometheus_tools import prometheus_tool

pytestmark = pytest.mark.e2e

SAMPLES = json.loads((EXAMPLE / "samples.json").read_text())["samples"]
PIXELS = np.array([s["pixels"] for s in SAMPLES], dtype=np.float32)
GOOD, BAD = 30, 2  # requests answered 200, and 400 (a wrong shape)
MODEL = {"origin": "default", "model": "digits"}
DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))
# Values for the dashboards' template variables, and Grafana's interval macros.
TEMPLATE = {
    "origin": "default",
    "model": "digits",
    "datasource": "prometheus",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
}
# NVML's series exist only where it finds a GPU: panels over them may be empty here; every
# other panel must show data.
MAY_BE_ABSENT = re.compile(r"modelloader_gpu_")
# The `default` origin with limits, so that limit series exist (an unlimited one has none).
POLICY = {
    "apiVersion": "modelloader.dev/v1alpha1",
    "kind": "OriginPolicy",
    "metadata": {"name": "default"},
    "spec": {
        "allowAnonymous": True,
        "quota": {"maxModels": 4, "memory": "1Gi", "cpu": "2", "requestsPerSecond": 1000},
    },
}
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


@dataclass
class Prometheus:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with DIRECT.open(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", (promql, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, promql: str) -> float:
        """The one sample a query returns."""
        result = self.query(promql)
        assert len(result) == 1, (promql, result)
        return float(result[0]["value"][1])

    def wait_for(self, promql: str, want: float, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        got: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                got = self.query(promql)
            except urllib.error.URLError:  # not listening yet
                got = []
            if got and float(got[0]["value"][1]) == want:
                return
            time.sleep(0.25)
        raise AssertionError(f"{promql}: wanted {want}, have {got}\n{self.log_path.read_text()}")


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """`modelloader local examples/01-digits policy.yaml` on free ports."""
    folder = tmp_path_factory.mktemp("local")
    policy = folder / "policy.yaml"
    policy.write_text(json.dumps(POLICY))
    state_dir = Path(tempfile.mkdtemp(prefix="mlpr-", dir="/tmp"))
    port, metrics_port = free_port(), free_port()
    log_path = folder / "modelloader.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                str(BIN),
                "local",
                str(EXAMPLE),
                str(policy),
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
                "--state-dir",
                str(state_dir),
                "--cache-dir",
                str(folder / "cache"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = LocalServer(process, EXAMPLE, state_dir, port, metrics_port, log_path)
    try:
        deadline = time.monotonic() + 90
        while not (state_dir / "control.sock").exists():
            assert process.poll() is None, server.log()
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        server.wait_for({"digits": "Ready"})
        yield server
    finally:
        server.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def prometheus(
    local: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    binary = prometheus_tool("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "modelloader-local",
                        "static_configs": [{"targets": [f"127.0.0.1:{local.metrics_port}"]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    log_path = folder / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                str(binary),
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(port, process, log_path)
    try:
        server.wait_for('up{job="modelloader-local"}', 1)  # ready, and scraped once
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def traffic(local: LocalServer, prometheus: Prometheus) -> Prometheus:
    """GOOD requests spread over a few scrapes (so that rates are not flat), BAD rejected ones;
    returns once Prometheus has scraped them all."""
    client = triton.InferenceServerClient(local.url)
    try:
        for i in range(GOOD):
            pixels = PIXELS[i % len(PIXELS) : i % len(PIXELS) + 1]
            tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
            tensor.set_data_from_numpy(pixels, binary_data=True)
            client.infer("digits", [tensor])
            time.sleep(0.1)
        for _ in range(BAD):
            wrong = triton.InferInput("pixels", [1, 3], "FP32")
            wrong.set_data_from_numpy(np.zeros((1, 3), np.float32), binary_data=True)
            with pytest.raises(InferenceServerException):
                client.infer("digits", [wrong])
    finally:
        client.close()
    prometheus.wait_for('sum(modelloader_requests_total{model="digits"})', GOOD + BAD)
    return prometheus


def labels(**extra: str) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in {**MODEL, **extra}.items()) + "}"


def test_requests_are_counted_by_status_code(traffic: Prometheus) -> None:
    assert traffic.value(f"modelloader_requests_total{labels(code='200')}") == GOOD
    assert traffic.value(f"modelloader_requests_total{labels(code='400')}") == BAD
    assert traffic.value(f"modelloader_request_duration_seconds_count{labels()}") == GOOD + BAD


def test_request_time_holds_queue_and_inference_time(traffic: Prometheus) -> None:
    request = traffic.value(f"modelloader_request_duration_seconds_sum{labels()}")
    queue = traffic.value(f"modelloader_queue_duration_seconds_sum{labels()}")
    inference = traffic.value(f"modelloader_inference_duration_seconds_sum{labels()}")
    assert traffic.value(f"modelloader_queue_duration_seconds_count{labels()}") == GOOD
    assert traffic.value(f"modelloader_inference_duration_seconds_count{labels()}") == GOOD
    assert 0 < inference <= request
    assert 0 <= queue <= request
    assert queue + inference <= request
    # Buckets resolve sub-millisecond times: a digit takes microseconds to classify.
    assert traffic.query(f"modelloader_inference_duration_seconds_bucket{labels(le='0.0001')}")
    assert traffic.value(f"modelloader_inference_duration_seconds_bucket{labels(le='0.01')}") > 0
    for kind in ("request", "response"):
        assert traffic.value(f"modelloader_{kind}_bytes_count{labels()}") == GOOD
        assert traffic.value(f"modelloader_{kind}_bytes_sum{labels()}") > GOOD * 64 * 4 / 2


def test_busy_seconds_are_the_invoke_time_on_the_models_accelerator(traffic: Prometheus) -> None:
    busy = traffic.value(f"modelloader_accelerator_busy_seconds_total{labels(accelerator='cpu')}")
    inference = traffic.value(f"modelloader_inference_duration_seconds_sum{labels()}")
    assert busy > 0
    assert math.isclose(busy, inference, rel_tol=1e-6)


def test_control_plane_series(traffic: Prometheus) -> None:
    assert traffic.value('modelloader_models{phase="Ready"}') == 1
    for phase in ("Pending", "Loading", "Failed"):
        assert traffic.value(f'modelloader_models{{phase="{phase}"}}') == 0
    load = f"modelloader_model_load_duration_seconds_count{labels(accelerator='cpu')}"
    assert traffic.value(load) >= 1
    assert traffic.value(f"modelloader_worker_restarts_total{labels()}") == 0
    assert traffic.value("modelloader_reconcile_duration_seconds_count") > 0
    assert traffic.value("modelloader_reconcile_errors_total") == 0
    assert traffic.value('modelloader_drift_repairs_total{action="start"}') >= 1
    assert traffic.value("modelloader_reconcile_queue_depth") == 0


def test_quota_usage_and_limits_of_the_default_origin(traffic: Prometheus) -> None:
    used = 'modelloader_origin_quota_used{origin="default", resource="%s"}'
    limit = 'modelloader_origin_quota_limit{origin="default", resource="%s"}'
    assert traffic.value(used % "models") == 1
    assert traffic.value(used % "workers") == 1
    assert traffic.value(used % "memory") > 0
    assert traffic.value(limit % "models") == 4
    assert traffic.value(limit % "memory") == 1 << 30
    assert traffic.value(limit % "requests_per_second") == 1000
    assert traffic.query(limit % "workers") == []  # unlimited: no series, not zero


def test_gpu_series_only_where_nvml_finds_a_gpu(traffic: Prometheus) -> None:
    found = traffic.query("modelloader_gpu_utilization_ratio")
    if NvmlCollector().available:
        assert found and all(0 <= float(s["value"][1]) <= 1 for s in found)
    else:
        assert found == []  # absent, not zero-filled
        assert traffic.query("modelloader_gpu_memory_used_bytes") == []


def substitute(expr: str) -> str:
    for name, value in sorted(TEMPLATE.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in expr, expr
    return expr


def panel_queries() -> list[tuple[str, str, str]]:
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((path.stem, panel["title"], target["expr"]))
        for variable in board["templating"]["list"]:
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", str(variable.get("query")))
            if match:  # what Grafana asks for the variable's values
                query = f"group by ({match[2]}) ({match[1]})"
                found.append((path.stem, f"${variable['name']}", query))
    return found


def test_every_dashboard_query_returns_data(traffic: Prometheus) -> None:
    assert DASHBOARDS, "no dashboards"
    empty = []
    for board, title, expr in panel_queries():
        result = traffic.query(substitute(expr))
        values = [float(sample["value"][1]) for sample in result]
        if not any(math.isfinite(v) for v in values) and not MAY_BE_ABSENT.search(expr):
            empty.append(f"{board} / {title}: {expr} -> {result}")
    assert not empty, "\n".join(empty)
