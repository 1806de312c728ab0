"""A server that answers every inference with the same bytes at once: the floor of a protocol
on this machine (the client, the transport, the server's framing, no model and no worker).

    .venv/bin/python bench/fixed_answer.py {grpc,http} PORT MODEL SPEC

SPEC is JSON: {"input": [name, datatype, shape], "output": [name, datatype, shape]}. gRPC is
served by grpc.aio, as the gateway serves it; HTTP/1.1 by a few lines of asyncio that read a
request's head and Content-Length body and write a fixed answer (no checks at all, so the
gateway's own HTTP layer is measured against the least an HTTP server can do).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import grpc
import numpy as np
from modelloader_gateway.protos import inference_pb2 as pb
from modelloader_workers.wire.tensor_types import numpy_dtype


def _answers(model: str, spec: dict[str, Any]) -> dict[str, Any]:
    (in_name, in_type, in_shape), (out_name, out_type, out_shape) = spec["input"], spec["output"]
    out_bytes = int(np.prod(out_shape)) * numpy_dtype(out_type).itemsize
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return {
        "meta": pb.ModelMetadataResponse(
            name=model,
            versions=["1"],
            platform="tensorflow_lite",
            inputs=[tensor(name=in_name, datatype=in_type, shape=in_shape)],
            outputs=[tensor(name=out_name, datatype=out_type, shape=out_shape)],
        ),
        "config": pb.ModelConfigResponse(
            config=pb.ModelConfig(
                name=model,
                max_batch_size=0,
                input=[pb.ModelInput(name=in_name, data_type=f"TYPE_{in_type}", dims=in_shape)],
                output=[
                    pb.ModelOutput(name=out_name, data_type=f"TYPE_{out_type}", dims=out_shape)
                ],
            )
        ),
        "infer": pb.ModelInferResponse(
            model_name=model,
            model_version="1",
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name=out_name, datatype=out_type, shape=out_shape
                )
            ],
            raw_output_contents=[bytes(out_bytes)],
        ),
        "json": {
            "meta": {
                "name": model,
                "versions": ["1"],
                "platform": "tensorflow_lite",
                "inputs": [{"name": in_name, "datatype": in_type, "shape": in_shape}],
                "outputs": [{"name": out_name, "datatype": out_type, "shape": out_shape}],
            },
            "config": {
                "name": model,
                "max_batch_size": 0,
                "input": [{"name": in_name, "data_type": f"TYPE_{in_type}", "dims": in_shape}],
                "output": [{"name": out_name, "data_type": f"TYPE_{out_type}", "dims": out_shape}],
            },
            "head": {
                "model_name": model,
                "outputs": [
                    {
                        "name": out_name,
                        "datatype": out_type,
                        "shape": out_shape,
                        "parameters": {"binary_data_size": out_bytes},
                    }
                ],
            },
            "out_bytes": out_bytes,
        },
    }


async def serve_grpc(port: int, answers: dict[str, Any]) -> None:
    def fixed(response: Any) -> Any:
        async def method(request: Any, context: Any) -> Any:
            return response

        return method

    methods = {
        "ServerLive": pb.ServerLiveResponse(live=True),
        "ServerReady": pb.ServerReadyResponse(ready=True),
        "ModelReady": pb.ModelReadyResponse(ready=True),
        "ServerMetadata": pb.ServerMetadataResponse(name="fixed", version="1"),
        "ModelMetadata": answers["meta"],
        "ModelConfig": answers["config"],
        "ModelInfer": answers["infer"],
        "ModelStatistics": pb.ModelStatisticsResponse(),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fixed(response),
            request_deserializer=getattr(pb, f"{name}Request").FromString,
            response_serializer=type(response).SerializeToString,
        )
        for name, response in methods.items()
    }
    server = grpc.aio.server(options=(("grpc.max_receive_message_length", 1 << 26),))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _http_answer(body: bytes, header_length: int | None = None) -> bytes:
    extra = f"Inference-Header-Content-Length: {header_length}\r\n" if header_length else ""
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _FixedHttp(asyncio.Protocol):
    def __init__(self, answers: dict[str, bytes]) -> None:
        self._answers = answers
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
            length = 0
            for line in lines[1:]:
                key, _, value = line.partition(":")
                if key.lower() == "content-length":
                    length = int(value)
            if len(buffer) < end + 4 + length:
                return
            del buffer[: end + 4 + length]
            path = lines[0].split()[1]
            kind = next((k for k in ("infer", "config") if path.endswith(k)), "meta")
            if not path.startswith("/v2/models/"):
                kind = "server"
            assert self._transport is not None
            self._transport.write(self._answers[kind])


async def serve_http(port: int, answers: dict[str, Any]) -> None:
    found = answers["json"]
    head = json.dumps(found["head"]).encode()
    fixed = {
        "infer": _http_answer(head + bytes(found["out_bytes"]), len(head)),
        "config": _http_answer(json.dumps(found["config"]).encode()),
        "meta": _http_answer(json.dumps(found["meta"]).encode()),
        "server": _http_answer(b'{"name":"fixed","version":"1","extensions":[]}'),
    }
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _FixedHttp(fixed), "127.0.0.1", port)
    await server.serve_forever()


def main() -> None:
    protocol, port, model, spec = sys.argv[1:5]
    answers = _answers(model, json.loads(spec))
    serve = serve_grpc if protocol == "grpc" else serve_http
    asyncio.run(serve(int(port), answers))


if __name__ == "__main__":
    main()
