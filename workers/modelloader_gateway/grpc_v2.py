"""Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`, with Triton's
configuration and statistics extensions) and the standard health service: a thin layer over
`DataPlane`, the same core the REST layer uses, so lookup, access, limits and errors are decided
in one place. Served by grpc.aio on the gateway's event loop, beside the HTTP server.

The same rules as REST: a bearer token in the `authorization` metadata; another origin's model
is NOT_FOUND exactly like a missing one; over the origin's rate or concurrency,
RESOURCE_EXHAUSTED with the retry delay in the trailing metadata (`retry-after`, seconds, and
`grpc-retry-pushback-ms`); bad tensors INVALID_ARGUMENT with the reason; not ready UNAVAILABLE;
the message size limit is `--max-request-bytes`; a deadline that passes ends the call with
DEADLINE_EXCEEDED. Outputs go back as `raw_output_contents`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
import numpy as np
from modelloader_workers.wire.tensor_types import (
    V2_TO_NUMPY,
    UnsupportedDatatype,
    numpy_dtype,
    v2_datatype,
)

from modelloader_gateway.dataplane import DataPlane, InferResult
from modelloader_gateway.errors import (
    BadRequest,
    DataPlaneError,
    InferenceFailed,
    ModelNotFound,
    ModelNotReady,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    WorkerUnavailable,
)
from modelloader_gateway.metrics import GRPC_AS_HTTP, GatewayMetrics
from modelloader_gateway.protos import health_pb2, health_pb2_grpc, inference_pb2
from modelloader_gateway.protos import inference_pb2_grpc as services

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
# The data plane's errors as gRPC status codes: one table (REST has its own).
GRPC_STATUS: dict[type[DataPlaneError], grpc.StatusCode] = {
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooManyRequests: grpc.StatusCode.RESOURCE_EXHAUSTED,
    InferenceFailed: grpc.StatusCode.INTERNAL,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    WorkerUnavailable: grpc.StatusCode.UNAVAILABLE,
}
# Typed contents field per v2 datatype (FP16 has none: raw bytes only, as in Triton).
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
DATA_TYPES = {name: inference_pb2.DataType.Value(f"TYPE_{name}") for name in V2_TO_NUMPY}


class _Abort(Exception):
    """A status to end the call with (raised inside a method, turned into `context.abort`)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after


def _status(error: DataPlaneError) -> _Abort:
    code = next(
        (c for kind, c in GRPC_STATUS.items() if isinstance(error, kind)), grpc.StatusCode.INTERNAL
    )
    return _Abort(code, error.message, error.retry_after)


async def _abort(context: grpc.aio.ServicerContext, failed: _Abort) -> NoReturn:
    if failed.retry_after is not None:
        seconds = max(1, math.ceil(failed.retry_after))
        context.set_trailing_metadata(
            (
                ("retry-after", str(seconds)),
                ("grpc-retry-pushback-ms", str(int(failed.retry_after * 1000))),
            )
        )
    await context.abort(failed.code, failed.message)
    raise AssertionError("context.abort returned")  # it raises, to end the call


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


def decode_inputs(request: Any) -> dict[str, np.ndarray[Any, Any]]:
    """The request's tensors as arrays: from `raw_input_contents` (little-endian bytes, views
    without a copy) or from typed `contents`. BadRequest says which tensor is wrong."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for position, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in inputs:
            raise BadRequest(f"input {name!r} is given twice")
        try:
            dtype = numpy_dtype(tensor.datatype)
        except UnsupportedDatatype as error:
            raise BadRequest(f"input {name!r}: {error}") from None
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in shape):
            raise BadRequest(f"input {name!r}: shape {list(shape)} has a negative size")
        count = math.prod(shape)
        if raw:
            data = raw[position]
            if len(data) != count * dtype.itemsize:
                raise BadRequest(
                    f"input {name!r}: {len(data)} bytes do not fit shape {list(shape)} of "
                    f"{tensor.datatype}"
                )
            inputs[name] = np.frombuffer(data, dtype=dtype).reshape(shape)
            continue
        field = CONTENTS.get(tensor.datatype)
        if field is None:
            raise BadRequest(f"input {name!r}: {tensor.datatype} needs raw_input_contents")
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise BadRequest(f"input {name!r}: {len(values)} values do not fit shape {list(shape)}")
        try:
            array = np.array(values, dtype=dtype if tensor.datatype != "BOOL" else np.bool_)
        except (OverflowError, ValueError) as error:
            raise BadRequest(f"input {name!r}: {error}") from None
        if field in ("int_contents", "uint_contents") and not np.array_equal(array, values):
            raise BadRequest(f"input {name!r}: a value does not fit {tensor.datatype}")
        inputs[name] = array.reshape(shape)
    return inputs


def encode_response(request: Any, result: InferResult) -> Any:
    response = inference_pb2.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version or "1", id=request.id
    )
    for name, array in result.outputs.items():
        contiguous = np.ascontiguousarray(array)
        response.outputs.add(
            name=name, datatype=v2_datatype(contiguous.dtype), shape=contiguous.shape
        )
        response.raw_output_contents.append(contiguous.tobytes())
    return response


class SizedRequest:
    """A ModelInferRequest and the bytes it came in."""

    __slots__ = ("message", "size")

    def __init__(self, data: bytes) -> None:
        self.message = inference_pb2.ModelInferRequest.FromString(data)
        self.size = len(data)


def _passed_through(data: bytes) -> bytes:
    return data


def _method_handlers(servicer: InferenceServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The service's handlers, as the generated registration makes them but for ModelInfer,
    which reads a SizedRequest and answers bytes it serialized itself."""
    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        method: unary(
            getattr(servicer, method),
            request_deserializer=getattr(inference_pb2, f"{method}Request").FromString,
            response_serializer=getattr(inference_pb2, f"{method}Response").SerializeToString,
        )
        for method in (
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelConfig",
            "ModelStatistics",
        )
    }
    handlers["ModelInfer"] = unary(
        servicer.ModelInfer, request_deserializer=SizedRequest, response_serializer=_passed_through
    )
    return handlers


class InferenceServicer(services.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, metrics: GatewayMetrics | None = None) -> None:
        self.dataplane = dataplane
        self.metrics = metrics

    async def _call(self, context: grpc.aio.ServicerContext, answer: Callable[[], Any]) -> Any:
        try:
            return answer()
        except DataPlaneError as error:
            await _abort(context, _status(error))

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return inference_pb2.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return inference_pb2.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def answer() -> Any:
            origin = self.dataplane.caller(_authorization(context))[0]
            ready = self.dataplane.model_ready(origin, request.name, request.version or None)
            return inference_pb2.ModelReadyResponse(ready=ready)

        return await self._call(context, answer)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        found = self.dataplane.server_metadata()
        return inference_pb2.ServerMetadataResponse(
            name=found["name"], version=found["version"], extensions=found["extensions"]
        )

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def answer() -> Any:
            origin, access = self.dataplane.caller(_authorization(context))
            found = self.dataplane.model_metadata(
                origin, request.name, request.version or None, access.expose_accelerator_details
            )
            return inference_pb2.ModelMetadataResponse(
                name=found["name"],
                versions=found["versions"],
                platform=found["platform"],
                inputs=[_tensor_metadata(t) for t in found["inputs"]],
                outputs=[_tensor_metadata(t) for t in found["outputs"]],
            )

        return await self._call(context, answer)

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def answer() -> Any:
            origin = self.dataplane.caller(_authorization(context))[0]
            found = self.dataplane.model_config(origin, request.name, request.version or None)
            config = inference_pb2.ModelConfig(
                name=found["name"],
                platform=found["platform"],
                backend=found["backend"],
                max_batch_size=found["max_batch_size"],
            )
            for each, into in ((found["input"], config.input), (found["output"], config.output)):
                for tensor in each:
                    into.add(
                        name=tensor["name"],
                        data_type=DATA_TYPES.get(tensor["data_type"][5:], 0),
                        dims=tensor["dims"],
                    )
            for group in found["instance_group"]:
                config.instance_group.add(
                    name=group["name"],
                    count=group["count"],
                    kind=inference_pb2.ModelInstanceGroup.Kind.Value(group["kind"]),
                )
            return inference_pb2.ModelConfigResponse(config=config)

        return await self._call(context, answer)

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def answer() -> Any:
            origin = self.dataplane.caller(_authorization(context))[0]
            found = self.dataplane.model_statistics(
                origin, request.name or None, request.version or None
            )
            return inference_pb2.ModelStatisticsResponse(
                model_stats=[_statistics(each) for each in found]
            )

        return await self._call(context, answer)

    async def ModelInfer(self, sized: SizedRequest, context: grpc.aio.ServicerContext) -> bytes:
        """Takes the request with its size on the wire and answers serialized bytes: the
        metrics' byte counts then cost nothing (upb's ByteSize serializes the message again,
        150 KB for an image)."""
        started = time.perf_counter()
        request = sized.message
        dataplane, metrics = self.dataplane, self.metrics
        name = request.model_name
        series = metrics.unknown_grpc if metrics is not None else None
        entered = False
        failed: _Abort | None = None
        code = 200
        try:
            origin, access = dataplane.caller(_authorization(context))
            if metrics is not None:
                known = dataplane.routes.lookup(origin, name) is not None
                series = metrics.series(origin, name if known else "", "grpc")
            dataplane.admit(origin, access, name)
            entered = True
            inputs = decode_inputs(request)
            outputs = [o.name for o in request.outputs]
            future: asyncio.Future[InferResult | DataPlaneError] = (
                asyncio.get_running_loop().create_future()
            )

            def settle(result: InferResult | DataPlaneError) -> None:
                if not future.done():  # cancelled meanwhile (the deadline passed)
                    future.set_result(result)

            dataplane.submit(origin, name, request.model_version or None, inputs, outputs, settle)
            result = await future
            if isinstance(result, DataPlaneError):
                raise result
            response: bytes = encode_response(request, result).SerializeToString()
            if series is not None:
                series.observe_inference(
                    sized.size,
                    len(response),
                    result.queue_seconds,
                    result.invoke_seconds,
                    result.accelerator,
                    result.batch,
                )
            return response
        except DataPlaneError as error:
            failed = _status(error)
        except Exception:
            log.exception("a gRPC inference request failed")
            failed = _Abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            if entered:
                dataplane.leave(origin, name)
            if failed is not None:
                code = GRPC_AS_HTTP.get(failed.code.name, 500)
            elif context.cancelled():
                code = GRPC_AS_HTTP["CANCELLED"]
            if series is not None:
                series.observe_request(code, time.perf_counter() - started)
        assert failed is not None
        await _abort(context, failed)


def _tensor_metadata(tensor: dict[str, Any]) -> Any:
    return inference_pb2.ModelMetadataResponse.TensorMetadata(
        name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"]
    )


def _statistics(found: dict[str, Any]) -> Any:
    stats = found["inference_stats"]
    return inference_pb2.ModelStatistics(
        name=found["name"],
        version=found["version"],
        last_inference=found["last_inference"],
        inference_count=found["inference_count"],
        execution_count=found["execution_count"],
        inference_stats=inference_pb2.InferStatistics(
            **{kind: inference_pb2.StatisticDuration(**value) for kind, value in stats.items()}
        ),
    )


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: SERVING while the gateway is ready, for the server ("") and the
    inference service; NOT_FOUND for any other service name."""

    SERVICES = ("", SERVICE)

    def __init__(self, ready: Callable[[], bool], poll_seconds: float = 1.0) -> None:
        self._ready = ready
        self._poll = poll_seconds

    def _status(self) -> Any:
        serving = health_pb2.HealthCheckResponse.ServingStatus
        return serving.SERVING if self._ready() else serving.NOT_SERVING

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.service not in self.SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self._status())

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if request.service not in self.SERVICES:
            unknown = health_pb2.HealthCheckResponse.ServingStatus.SERVICE_UNKNOWN
            yield health_pb2.HealthCheckResponse(status=unknown)
            return
        last = None
        while True:
            status = self._status()
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await asyncio.sleep(self._poll)


class GrpcServer:
    """The gRPC endpoint of a gateway: inference and health services on one port."""

    def __init__(
        self,
        dataplane: DataPlane,
        metrics: GatewayMetrics | None,
        max_request_bytes: int,
    ) -> None:
        self._dataplane = dataplane
        self._metrics = metrics
        self._max_request_bytes = max_request_bytes
        self._server: Any = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        # Made here, on the running loop: grpc.aio binds a server to the loop it is made on.
        server = self._server = grpc.aio.server(
            options=(
                ("grpc.max_receive_message_length", self._max_request_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            )
        )
        handlers = _method_handlers(InferenceServicer(self._dataplane, self._metrics))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(  # type: ignore[no-untyped-call]
            HealthServicer(self._dataplane.ready), server
        )
        self.port = server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen for gRPC on {host}:{port}")
        await server.start()

    async def close(self, drain_seconds: float) -> None:
        """Stop taking calls, give those under way `drain_seconds` to finish."""
        if self._server is not None:
            await self._server.stop(drain_seconds)
