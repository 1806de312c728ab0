"""The gRPC Open Inference Protocol of `modelloader local`, through `tritonclient.grpc`
unchanged and through stubs generated from the gateway's own .proto: answers equal to the
interpreter's, every error code, tokens, the health service, Triton's configuration and
statistics extensions, and a burst over one channel."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from modelloader_gateway.protos import health_pb2, health_pb2_grpc, inference_pb2
from modelloader_gateway.protos import inference_pb2_grpc as services
from modelloader_workers.litert_runner import LiteRTRunner
from tritonclient.utils import InferenceServerException

from tests.conftest import EXAMPLE, MODELS
from tests.e2e.conftest import MAX_REQUEST_BYTES, LocalServer, manifest, running_local
from tests.e2e.test_inference import DTYPES_INPUTS, PIXELS

pytestmark = pytest.mark.e2e

SHOP_TOKEN = "token-of-the-shop-0123456789"
SLOW_TOKEN = "token-of-the-slow-0123456789"


def document(kind: str, name: str, spec: dict[str, Any], **meta: Any) -> str:
    api = "v1" if kind == "Secret" else "modelloader.dev/v1alpha1"
    body: dict[str, Any] = {"apiVersion": api, "kind": kind, "metadata": {"name": name, **meta}}
    body.update(spec)
    return json.dumps(body) + "\n---\n"


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    folder = tmp_path_factory.mktemp("grpc")
    shutil.copy(EXAMPLE / "digits.tflite", folder)
    shutil.copy(MODELS / "dtypes.tflite", folder)
    (folder / "models.yaml").write_text(
        manifest("digits", "file://digits.tflite")
        + "---\n"
        + manifest("dtypes", "file://dtypes.tflite")
        + "---\n"
        + manifest("on-gpu", "file://digits.tflite", accelerator="gpu", delegation="whole")
    )
    origins = (
        document("OriginPolicy", "shop", {"spec": {"namespaces": ["shop"]}})
        + document(
            "OriginPolicy",
            "slow",
            {"spec": {"namespaces": ["slow"], "quota": {"requestsPerSecond": 1}}},
        )
        + document(
            "Secret",
            "shop-token",
            {"stringData": {"token": SHOP_TOKEN}},
            namespace="shop",
            labels={"modelloader.dev/origin": "shop"},
        )
        + document(
            "Secret",
            "slow-token",
            {"stringData": {"token": SLOW_TOKEN}},
            namespace="slow",
            labels={"modelloader.dev/origin": "slow"},
        )
    )
    (folder / "origins.yaml").write_text(origins)
    shop = json.loads(manifest("secret", "file://digits.tflite"))
    shop["metadata"]["namespace"] = "shop"
    slow = json.loads(manifest("limited", "file://digits.tflite"))
    slow["metadata"]["namespace"] = "slow"
    (folder / "tenants.yaml").write_text(json.dumps(shop) + "\n---\n" + json.dumps(slow))
    with running_local(folder) as server:
        server.wait_for(
            {"digits": "Ready", "dtypes": "Ready", "secret": "Ready", "limited": "Ready"}
        )
        yield server


def client(local: LocalServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{local.grpc_port}")


def tensors(inputs: dict[str, np.ndarray[Any, Any]]) -> list[triton.InferInput]:
    from modelloader_workers.wire.tensor_types import v2_datatype

    out = []
    for name, array in inputs.items():
        tensor = triton.InferInput(name, list(array.shape), v2_datatype(array.dtype))
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def test_tritonclient_grpc_answers_equal_the_interpreter(local: LocalServer) -> None:
    c = client(local)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("digits")
    result = c.infer("digits", tensors({"pixels": PIXELS}))
    expected = LiteRTRunner(str(EXAMPLE / "digits.tflite")).run({"pixels": PIXELS})
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected["probabilities"])
    got = c.infer("dtypes", tensors(DTYPES_INPUTS))
    for name, value in LiteRTRunner(str(MODELS / "dtypes.tflite")).run(DTYPES_INPUTS).items():
        np.testing.assert_array_equal(got.as_numpy(name), value)
        assert got.as_numpy(name).dtype == value.dtype
    metadata = c.get_model_metadata("digits", as_json=True)
    assert metadata["inputs"][0]["name"] == "pixels" and metadata["platform"] == "tensorflow_lite"
    assert set(c.get_server_metadata(as_json=True)["extensions"]) >= {
        "model_configuration",
        "statistics",
    }
    c.close()


def test_typed_contents_through_stubs_generated_from_the_proto(local: LocalServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{local.grpc_port}") as channel:
        stub = services.GRPCInferenceServiceStub(channel)
        request = inference_pb2.ModelInferRequest(model_name="digits", id="typed")
        tensor = request.inputs.add(name="pixels", datatype="FP32", shape=list(PIXELS.shape))
        tensor.contents.fp32_contents.extend(PIXELS.ravel().tolist())
        response = stub.ModelInfer(request)
    assert response.id == "typed" and response.outputs[0].name == "probabilities"
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(
        tuple(response.outputs[0].shape)
    )
    expected = LiteRTRunner(str(EXAMPLE / "digits.tflite")).run({"pixels": PIXELS})
    np.testing.assert_array_equal(got, expected["probabilities"])


def status_of(call: Any) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    try:
        call()
    except grpc.RpcError as error:
        trailing = {k: v for k, v in (error.trailing_metadata() or ())}
        return error.code(), error.details(), trailing
    raise AssertionError("the call succeeded")


def test_every_error_has_its_code_and_a_reason(local: LocalServer) -> None:
    with grpc.insecure_channel(
        f"127.0.0.1:{local.grpc_port}",
        options=[("grpc.max_send_message_length", 64 << 20)],
    ) as channel:
        stub = services.GRPCInferenceServiceStub(channel)

        def infer(model: str, data: bytes, shape: list[int], token: str | None = None, **kw: Any):
            request = inference_pb2.ModelInferRequest(model_name=model)
            request.inputs.add(name="pixels", datatype="FP32", shape=shape)
            request.raw_input_contents.append(data)
            metadata = [("authorization", f"Bearer {token}")] if token else None
            return lambda: stub.ModelInfer(request, metadata=metadata, **kw)

        good = PIXELS[:1].tobytes()
        code, reason, _ = status_of(infer("digits", good[:-4], [1, 64]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "do not fit shape" in reason
        code, reason, _ = status_of(infer("digits", good * 2, [2, 65]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        code, reason, _ = status_of(infer("nope", good, [1, 64]))
        assert code == grpc.StatusCode.NOT_FOUND and "not found" in reason
        # Another origin's model is not found, exactly like a missing one.
        code, other, _ = status_of(infer("secret", good, [1, 64]))
        assert code == grpc.StatusCode.NOT_FOUND and other == reason.replace("nope", "secret")
        assert stub.ModelInfer(
            inference_pb2.ModelInferRequest(
                model_name="secret",
                inputs=[{"name": "pixels", "datatype": "FP32", "shape": [1, 64]}],
                raw_input_contents=[good],
            ),
            metadata=[("authorization", f"Bearer {SHOP_TOKEN}")],
        ).outputs
        code, reason, _ = status_of(infer("digits", good, [1, 64], token="not-a-real-token-at-all"))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not valid" in reason
        # Over the origin's rate (1 a second): RESOURCE_EXHAUSTED, with when to retry.
        refused: list[tuple[grpc.StatusCode, str, dict[str, str]]] = []
        for _ in range(5):
            try:
                infer("limited", good, [1, 64], token=SLOW_TOKEN)()
            except grpc.RpcError as error:
                trailing = dict(error.trailing_metadata() or ())
                refused.append((error.code(), error.details(), trailing))
        assert refused and all(c == grpc.StatusCode.RESOURCE_EXHAUSTED for c, _, _ in refused)
        code, reason, trailing = refused[0]
        assert "requestsPerSecond" in reason
        assert int(trailing["retry-after"]) >= 1 and "grpc-retry-pushback-ms" in trailing
        # Not ready: a model that cannot load here.
        code, reason, _ = status_of(infer("on-gpu", good, [1, 64]))
        assert code == grpc.StatusCode.UNAVAILABLE and "not ready" in reason
        # Over --max-request-bytes: refused by size.
        too_big = b"\0" * (MAX_REQUEST_BYTES + 1024)
        code, _, _ = status_of(infer("digits", too_big, [1, (MAX_REQUEST_BYTES + 1024) // 4]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deadlines_are_honoured(local: LocalServer) -> None:
    """100 requests at once with a 3 ms deadline each: the ones still queued when it passes
    end DEADLINE_EXCEEDED, the rest are answered, and the gateway serves on."""

    async def burst() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{local.grpc_port}") as channel:
            stub = services.GRPCInferenceServiceStub(channel)
            request = inference_pb2.ModelInferRequest(model_name="digits")
            request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
            request.raw_input_contents.append(PIXELS[:1].tobytes())

            async def one() -> grpc.StatusCode:
                try:
                    await stub.ModelInfer(request, timeout=0.003)
                except grpc.aio.AioRpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

            return list(await asyncio.gather(*(one() for _ in range(100))))

    codes = asyncio.run(burst())
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}, set(codes)
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
    assert (
        client(local).infer("digits", tensors({"pixels": PIXELS})).as_numpy("probabilities")
        is not None
    )


def test_the_health_service_says_serving(local: LocalServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{local.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest()).status == serving
        named = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        assert health.Check(named).status == serving
        code, _, _ = status_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="x")))
        assert code == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == serving
        watch.cancel()


def test_model_configuration_and_statistics_extensions(local: LocalServer) -> None:
    c = client(local)
    config = c.get_model_config("digits", as_json=True)["config"]
    assert config["platform"] == "tensorflow_lite" and int(config.get("max_batch_size", 0)) == 0
    assert config["input"][0]["data_type"] == "TYPE_FP32" and config["input"][0]["dims"] == [
        "-1",
        "64",
    ]
    assert config["instance_group"][0]["count"] == 1
    before = c.get_inference_statistics("digits", as_json=True)["model_stats"][0]
    c.infer("digits", tensors({"pixels": PIXELS}))
    after = c.get_inference_statistics("digits", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 1
    assert int(after["inference_stats"]["success"]["ns"]) > 0
    assert int(after["inference_stats"]["compute_infer"]["count"]) >= 1
    # Another origin's model's statistics are not found.
    with pytest.raises(InferenceServerException, match="not found"):
        c.get_inference_statistics("secret")
    c.close()


def test_a_burst_of_100_requests_over_one_channel(local: LocalServer) -> None:
    async def burst() -> list[Any]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{local.grpc_port}") as channel:
            stub = services.GRPCInferenceServiceStub(channel)
            request = inference_pb2.ModelInferRequest(model_name="digits")
            request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
            request.raw_input_contents.append(PIXELS[:1].tobytes())
            return list(await asyncio.gather(*(stub.ModelInfer(request) for _ in range(100))))

    answers = asyncio.run(burst())
    assert len(answers) == 100 and all(a.outputs[0].name == "probabilities" for a in answers)


def test_metrics_carry_the_protocol(local: LocalServer) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{local.metrics_port}/metrics") as response:
        text = response.read().decode()
    assert (
        'modelloader_requests_total{code="200",model="digits",origin="default",protocol="grpc"}'
        in text
    )
