"""Dynamic batching through `modelloader local`, over real HTTP with real LiteRT: concurrent
requests share invokes and each answer equals an unbatched run of its input; requests of other
shapes get batches of their own; a malformed request fails alone; Triton's configuration and
statistics and the batch size histogram say what happened; a model that cannot take a batch
dimension fails its own LoadedModel, saying why."""

from __future__ import annotations

import http.client
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import EXAMPLE, MODELS
from tests.e2e.conftest import LocalServer, manifest, running_local

pytestmark = pytest.mark.e2e

SAMPLES = json.loads((EXAMPLE / "samples.json").read_text())["samples"]
DELAY_US = 20_000


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    folder = tmp_path_factory.mktemp("batching")
    shutil.copy(EXAMPLE / "digits.tflite", folder)
    shutil.copy(MODELS / "scale.tflite", folder)
    shutil.copy(MODELS / "memory_hog.tflite", folder)
    batching = {"maxBatchSize": 8, "maxQueueDelayMicroseconds": DELAY_US}
    (folder / "models.yaml").write_text(
        "---\n".join(
            [
                manifest("digits", "file://digits.tflite", batching=batching),
                manifest("plain", "file://digits.tflite"),
                manifest("scale", "file://scale.tflite", batching=batching),
                manifest("hog", "file://memory_hog.tflite", batching={"maxBatchSize": 4}),
            ]
        )
    )
    with running_local(folder) as server:
        server.wait_for({"digits": "Ready", "plain": "Ready", "scale": "Ready", "hog": "Failed"})
        yield server


def call(port: int, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read() or b"{}")
    finally:
        conn.close()


def infer(port: int, model: str, name: str, x: np.ndarray[Any, Any]) -> tuple[int, Any]:
    tensor = {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return call(port, "POST", f"/v2/models/{model}/infer", {"inputs": [tensor]})


def at_once(port: int, model: str, name: str, inputs: list[Any]) -> list[tuple[int, Any]]:
    with ThreadPoolExecutor(len(inputs)) as pool:
        return list(pool.map(lambda x: infer(port, model, name, x), inputs))


def output(answer: dict[str, Any]) -> np.ndarray[Any, Any]:
    (out,) = answer["outputs"]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def batch_sizes(local: LocalServer, model: str) -> tuple[float, float]:
    """(invokes, items) from the batch size histogram, every protocol summed."""
    conn = http.client.HTTPConnection("127.0.0.1", local.metrics_port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "modelloader_batch_size":
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
    return count, total


def stats(local: LocalServer, model: str) -> dict[str, Any]:
    status, found = call(local.port, "GET", f"/v2/models/{model}/stats")
    assert status == 200, found
    return dict(found["model_stats"][0])


def test_concurrent_requests_share_invokes_and_answer_as_unbatched_runs(
    local: LocalServer,
) -> None:
    invokes_before, items_before = batch_sizes(local, "digits")
    before = stats(local, "digits")
    pixels = [np.array([s["pixels"]], np.float32) for s in SAMPLES[:8]]
    batched = at_once(local.port, "digits", "pixels", pixels)
    for (status, answer), x, sample in zip(batched, pixels, SAMPLES, strict=False):
        assert status == 200, answer
        alone_status, alone = infer(local.port, "plain", "pixels", x)
        assert alone_status == 200
        np.testing.assert_allclose(output(answer), output(alone), rtol=1e-5, atol=1e-7)
        assert int(np.argmax(output(answer))) == sample["label"]
    invokes, items = batch_sizes(local, "digits")
    assert items - items_before == 8  # every item counted once
    assert 1 <= invokes - invokes_before < 8  # in fewer invokes than requests
    after = stats(local, "digits")
    assert after["inference_count"] - before["inference_count"] == 8
    assert after["execution_count"] - before["execution_count"] == invokes - invokes_before


def test_a_request_of_several_items_and_other_widths(local: LocalServer) -> None:
    rng = np.random.default_rng(4)
    inputs = [rng.uniform(-1, 1, s).astype(np.float32) for s in [(1, 3), (3, 3), (1, 5), (2, 5)]]
    for (status, answer), x in zip(at_once(local.port, "scale", "x", inputs), inputs, strict=True):
        assert status == 200, answer
        np.testing.assert_allclose(output(answer), 2 * x, rtol=1e-6)


def test_a_malformed_request_fails_alone(local: LocalServer) -> None:
    good = [np.full((1, 4), i, np.float32) for i in range(4)]
    bad = np.ones((9, 4), np.float32)  # over maxBatchSize
    got = at_once(local.port, "scale", "x", [good[0], good[1], bad, good[2], good[3]])
    status, answer = got[2]
    assert status == 400 and "1 to 8 per request" in answer["error"]
    for (status, answer), x in zip(got[:2] + got[3:], good, strict=True):
        assert status == 200, answer
        np.testing.assert_array_equal(output(answer), 2 * x)


def test_configuration_and_metadata_show_the_batch_dimension(local: LocalServer) -> None:
    status, config = call(local.port, "GET", "/v2/models/digits/config")
    assert status == 200 and config["max_batch_size"] == 8
    assert config["input"] == [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [64]}]
    status, plain = call(local.port, "GET", "/v2/models/plain/config")
    assert plain["max_batch_size"] == 0 and plain["input"][0]["dims"] == [-1, 64]
    status, metadata = call(local.port, "GET", "/v2/models/digits")
    assert metadata["inputs"][0]["shape"] == [-1, 64]


def test_a_model_without_a_batch_dimension_fails_saying_why(local: LocalServer) -> None:
    failed = local.item("hog")["status"]
    assert failed["phase"] == "Failed"
    assert "spec.batching needs a batch dimension" in failed["message"]
    assert "output 'total' has shape []" in failed["message"]
    assert local.phases()["digits"] == "Ready"  # and nobody else is harmed
