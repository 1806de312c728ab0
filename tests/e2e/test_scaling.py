"""Autoscaling on `modelloader local`, real Ray, LiteRT and HTTP: a load ramp scales a model
up, idleness scales it back to minReplicas, a model with minReplicas 0 goes to zero and its next
request is held until a replica answers it."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE
from tests.e2e.conftest import LocalServer, manifest, running_local
from tests.support.cluster import wait_until

BODY = json.dumps(
    {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
)


def post(port: int, model: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", BODY)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def replicas(local: LocalServer, model: str) -> tuple[int, int, int]:
    status = local.item(model)["status"]
    return (
        int(status.get("desiredReplicas", 0)),
        int(status.get("replicas", 0)),
        int(status.get("readyReplicas", 0)),
    )


@pytest.fixture(scope="module")
def scaling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    folder = tmp_path_factory.mktemp("scaling")
    shutil.copy(EXAMPLE / "digits.tflite", folder)
    (folder / "auto.yaml").write_text(
        manifest(
            "auto",
            "file://digits.tflite",
            autoscaling={
                "minReplicas": 1,
                "maxReplicas": 3,
                "targetInFlight": 1,
                "scaleDownDelaySeconds": 3,
            },
        )
    )
    (folder / "sleepy.yaml").write_text(
        manifest(
            "sleepy",
            "file://digits.tflite",
            autoscaling={
                "minReplicas": 0,
                "maxReplicas": 2,
                "scaleDownDelaySeconds": 1,
                "scaleToZeroAfterSeconds": 3,
            },
        )
    )
    with running_local(folder) as local:
        local.wait_for({"auto": "Ready", "sleepy": "Ready"})
        yield local


def test_a_load_ramp_scales_up_and_idleness_back_to_min(scaling: LocalServer) -> None:
    assert replicas(scaling, "auto")[0] == 1
    stop = threading.Event()
    codes: list[int] = []

    def client() -> None:
        while not stop.is_set():
            codes.append(post(scaling.port, "auto"))

    clients = [threading.Thread(target=client) for _ in range(6)]
    for each in clients:
        each.start()
    try:
        wait_until(
            lambda: replicas(scaling, "auto")[2] >= 2, timeout=60, what="scaled up under load"
        )
        peak = replicas(scaling, "auto")
    finally:
        stop.set()
        for each in clients:
            each.join(30)
    assert set(codes) == {200}, sorted(set(codes))
    assert peak[0] >= 2
    wait_until(
        lambda: replicas(scaling, "auto") == (1, 1, 1), timeout=60, what="back to minReplicas"
    )
    print(f"FIGURES autoscale peak={peak} requests={len(codes)}")


def test_a_model_scaled_to_zero_answers_its_next_request(scaling: LocalServer) -> None:
    zero = wait_until(
        lambda: replicas(scaling, "sleepy") == (0, 0, 0) and scaling.item("sleepy")["status"],
        timeout=60,
        what="scaled to zero",
    )
    assert zero["phase"] == "Ready"
    ready = next(c for c in zero["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["reason"] == "ScaledToZero"
    assert zero["inputs"][0]["name"] == "pixels"  # metadata survives the zero
    started = time.monotonic()
    assert post(scaling.port, "sleepy") == 200  # held while a replica starts, then answered
    first = time.monotonic() - started
    assert replicas(scaling, "sleepy")[2] == 1
    print(f"FIGURES scale-from-zero first-request={first:.2f}s")
    # And back to zero when left alone again.
    wait_until(lambda: replicas(scaling, "sleepy")[0] == 0, timeout=60, what="zero again")


def test_replica_series_in_the_metrics(scaling: LocalServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", scaling.metrics_port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    assert 'modelloader_replicas{model="auto",origin="default",state="desired"}' in text
    assert "modelloader_autoscaler_decisions_total" in text


def test_a_manifest_names_both_a_count_and_autoscaling_is_rejected(
    scaling: LocalServer, tmp_path: Path
) -> None:
    path = scaling.folder / "both.yaml"
    path.write_text(
        manifest("both", "file://digits.tflite", replicas=2, autoscaling={"maxReplicas": 3})
    )
    try:
        failed = wait_until(
            lambda: (i := scaling.item_or_none("both")) and i["status"]["phase"] == "Failed" and i,
            timeout=30,
            what="rejected",
        )
        assert "spec.replicas" in failed["status"]["message"]
    finally:
        path.unlink()
