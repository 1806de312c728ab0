"""Inference through `modelloader local` with the clients users already have."""

from __future__ import annotations

import http.client
import json
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from modelloader_workers.litert_runner import LiteRTRunner
from tritonclient.utils import InferenceServerException

from tests.conftest import EXAMPLE, MODELS
from tests.e2e.conftest import MAX_REQUEST_BYTES, LocalServer

pytestmark = pytest.mark.e2e

SAMPLES = json.loads((EXAMPLE / "samples.json").read_text())["samples"]
PIXELS = np.array([s["pixels"] for s in SAMPLES], dtype=np.float32)

DTYPES_INPUTS: dict[str, np.ndarray[Any, Any]] = {
    "f32": np.arange(6, dtype=np.float32).reshape(2, 3) / 3,
    "f16": np.array([[0.5, 1.5, -2], [3, 4, 65000]], dtype=np.float16),
    "i8": np.array([-128, -1, 0, 127], dtype=np.int8),
    "u8": np.array([0, 99, 101, 255], dtype=np.uint8),
    "i32": np.array([1, -2, 3, 40000], dtype=np.int32),
    "i64": np.array([1, 2, 2**40, -5], dtype=np.int64),
    "flag": np.array([True, False, True, False]),
    "dyn": np.linspace(0, 1, 21, dtype=np.float32).reshape(3, 7),
}
TRITON_TYPES = {
    "FP32": "FP32",
    "FP16": "FP16",
    "INT8": "INT8",
    "UINT8": "UINT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "BOOL": "BOOL",
}


def infer(
    server: LocalServer, model: str, inputs: dict[str, np.ndarray[Any, Any]], binary: bool
) -> dict[str, np.ndarray[Any, Any]]:
    client = triton.InferenceServerClient(server.url)
    try:
        tensors = []
        for name, array in inputs.items():
            tensor = triton.InferInput(name, list(array.shape), _datatype(array))
            tensor.set_data_from_numpy(array, binary_data=binary)
            tensors.append(tensor)
        result = client.infer(model, tensors, outputs=None)
        response = result.get_response()
        return {o["name"]: result.as_numpy(o["name"]) for o in response["outputs"]}
    finally:
        client.close()


def _datatype(array: np.ndarray[Any, Any]) -> str:
    from modelloader_workers.wire.tensor_types import v2_datatype

    return v2_datatype(array.dtype)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_digits_through_tritonclient_equal_the_interpreter(
    server: LocalServer, binary: bool
) -> None:
    expected = LiteRTRunner(str(EXAMPLE / "digits.tflite")).run({"pixels": PIXELS})["probabilities"]
    got = infer(server, "digits", {"pixels": PIXELS}, binary)["probabilities"]
    assert got.shape == (10, 10)
    np.testing.assert_array_equal(got, expected)  # same bytes: nothing lost on the way
    assert got.argmax(axis=1).tolist() == [s["label"] for s in SAMPLES]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_tensor_type_round_trips(server: LocalServer, binary: bool) -> None:
    expected = LiteRTRunner(str(MODELS / "dtypes.tflite")).run(DTYPES_INPUTS)
    got = infer(server, "dtypes", DTYPES_INPUTS, binary)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_dynamic_shapes_per_request(server: LocalServer) -> None:
    for shape in [(1, 1), (5, 2), (2, 9)]:
        x = np.full(shape, 1.25, dtype=np.float32)
        got = infer(server, "dtypes", {**DTYPES_INPUTS, "dyn": x}, binary=True)
        np.testing.assert_array_equal(got["dyn_doubled"], x * 2)
    for batch in (1, 3, 10):
        got = infer(server, "digits", {"pixels": PIXELS[:batch]}, binary=True)
        assert got["probabilities"].shape == (batch, 10)


def test_health_and_metadata_through_tritonclient(server: LocalServer) -> None:
    client = triton.InferenceServerClient(server.url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits")
        assert client.is_model_ready("digits", "1")
        assert not client.is_model_ready("on-gpu")  # Pending: no GPU here
        meta = client.get_model_metadata("digits")
        assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
        assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
        assert client.get_server_metadata()["extensions"] == [
            "binary_tensor_data",
            "model_configuration",
            "statistics",
        ]
        config = client.get_model_config("digits")
        assert config["platform"] == "tensorflow_lite" and config["input"][0]["dims"] == [-1, 64]
        stats = client.get_inference_statistics("digits")["model_stats"][0]
        assert stats["name"] == "digits" and stats["inference_stats"]["success"]["count"] >= 0
        with pytest.raises(InferenceServerException, match="not found"):
            client.get_model_metadata("nope")
    finally:
        client.close()


def post(
    server: LocalServer, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def pixels_input(**changes: Any) -> dict[str, Any]:
    return {
        "name": "pixels",
        "datatype": "FP32",
        "shape": [1, 64],
        "data": PIXELS[0].tolist(),
        **changes,
    }


@pytest.mark.parametrize(
    ("path", "request_body", "status", "needle"),
    [
        (
            "/v2/models/digits/infer",
            {"inputs": [pixels_input(datatype="INT32", data=[1] * 64)]},
            400,
            "datatype",
        ),
        ("/v2/models/digits/infer", {"inputs": [pixels_input(shape=[2, 32])]}, 400, "shape"),
        ("/v2/models/digits/infer", {"inputs": [pixels_input(shape=[1, 65])]}, 400, "needs 65"),
        (
            "/v2/models/dtypes/infer",
            {"inputs": [{"name": "f32", "datatype": "FP32", "shape": [2, 3], "data": [0] * 6}]},
            400,
            "missing input",
        ),
        (
            "/v2/models/digits/infer",
            {"inputs": [pixels_input(), pixels_input(name="extra")]},
            400,
            "unexpected input 'extra'",
        ),
        (
            "/v2/models/digits/infer",
            {"inputs": [pixels_input()], "outputs": [{"name": "logits"}]},
            400,
            "unknown output",
        ),
        ("/v2/models/digits/infer", {"nothing": True}, 400, "'inputs'"),
        ("/v2/models/nope/infer", {"inputs": [pixels_input()]}, 404, "not found"),
        ("/v2/models/digits/versions/2/infer", {"inputs": [pixels_input()]}, 404, "no version"),
        ("/v2/models/on-gpu/infer", {"inputs": [pixels_input()]}, 503, "not ready"),
        ("/v2/models/corrupt/infer", {"inputs": [pixels_input()]}, 503, "not ready"),
    ],
)
def test_errors_have_a_status_and_a_reason(
    server: LocalServer, path: str, request_body: dict[str, Any], status: int, needle: str
) -> None:
    got, body = post(server, path, json.dumps(request_body).encode())
    assert got == status, body
    assert needle in body["error"]


def test_malformed_json_and_oversized_bodies(server: LocalServer) -> None:
    got, body = post(server, "/v2/models/digits/infer", b"{nope")
    assert got == 400 and "not valid JSON" in body["error"]
    big = b"[" + b"0," * (MAX_REQUEST_BYTES // 2) + b"0]"
    got, body = post(server, "/v2/models/digits/infer", big)
    assert got == 413 and "over the limit" in body["error"]


def test_unknown_route_is_a_json_404(server: LocalServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/v2/elsewhere")
    response = connection.getresponse()
    assert response.status == 404 and "error" in json.loads(response.read())


def test_broken_models_fail_alone_with_a_message(server: LocalServer) -> None:
    phases = server.wait_for({"corrupt": "Failed", "truncated": "Failed", "not-a-model": "Failed"})
    assert phases["digits"] == "Ready" and phases["dtypes"] == "Ready"
    assert "TFL3" in server.item("not-a-model")["status"]["message"]
    for name in ("corrupt", "truncated"):
        message = server.item(name)["status"]["message"]
        assert "LiteRT could not load the model" in message or "died while loading" in message
    assert infer(server, "digits", {"pixels": PIXELS[:1]}, binary=True)["probabilities"].shape == (
        1,
        10,
    )


def test_status_tells_pending_invalid_and_ready_apart(server: LocalServer) -> None:
    gpu = server.item("on-gpu")["status"]
    assert gpu["phase"] == "Pending"
    scheduled = next(c for c in gpu["conditions"] if c["type"] == "Scheduled")
    assert scheduled["status"] == "False" and "GPU" in scheduled["message"]
    invalid = server.item("invalid")["status"]
    assert invalid["phase"] == "Failed" and "spec.accelerator" in invalid["message"]
    digits = server.item("digits")
    assert digits["origin"] == "default" and digits["namespace"] == "default"
    status = digits["status"]
    assert status["observedGeneration"] == 1
    assert status["placement"]["accelerator"] == "cpu"
    assert status["inputs"][0]["name"] == "pixels" and status["loadSeconds"] > 0
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Scheduled": "True",
        "Loaded": "True",
        "Ready": "True",
        "Degraded": "False",
        "QuotaExceeded": "False",
    }


def test_metrics_count_requests(server: LocalServer) -> None:
    infer(server, "digits", {"pixels": PIXELS[:1]}, binary=True)
    connection = http.client.HTTPConnection("127.0.0.1", server.metrics_port, timeout=10)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    assert (
        'modelloader_requests_total{code="200",model="digits",origin="default",protocol="rest"}'
        in text
    )
    assert "modelloader_inference_duration_seconds_bucket" in text
    assert 'modelloader_models{phase="Ready"} 2.0' in text
