"""Open Inference Protocol v2 over HTTP: a thin routing layer over `DataPlane`, served by
`http_server`.

An inference request is admitted from its head alone (who calls, which model, within its
origin's limits) before a byte of its body is read: a caller without a token, a model that is
not there, and an origin over its rate get their answer at the door.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from modelloader_gateway import codec, openapi
from modelloader_gateway.dataplane import MODEL_VERSION, DataPlane, InferResult
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
from modelloader_gateway.http_server import (
    Call,
    HttpError,
    RequestHead,
    Response,
    error_response,
    json_response,
)
from modelloader_gateway.metrics import GatewayMetrics, ModelSeries

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
_HEADER_LENGTH_KEY = HEADER_LENGTH.lower()
# Bounds on what one client may hold. A connection idle, or still sending its request line and
# headers, this long is closed; an infer body must have arrived this long after its headers.
IDLE_TIMEOUT_SECONDS = 15.0
BODY_TIMEOUT_SECONDS = 30.0
# A GET may carry a body (HTTP allows it); it is read and ignored up to this size.
IGNORED_BODY_BYTES = 64 << 10


# The data plane's errors as HTTP answers: one table (gRPC has its own).
HTTP_STATUS: dict[type[DataPlaneError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    ModelNotFound: 404,
    PayloadTooLarge: 413,
    TooManyRequests: 429,
    InferenceFailed: 500,
    ModelNotReady: 503,
    WorkerUnavailable: 503,
}


def http_error(error: DataPlaneError) -> HttpError:
    status = next((s for kind, s in HTTP_STATUS.items() if isinstance(error, kind)), 500)
    headers: dict[str, str] = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="modelloader"'
    return HttpError(status, error.message, headers or None)


def method_not_allowed(method: str, allowed: str) -> HttpError:
    return HttpError(405, f"method {method} is not allowed here; use {allowed}", {"Allow": allowed})


def route_not_found() -> HttpError:
    return HttpError(404, "Not Found")


class _Answered:
    """A call whose answer is known from its head (metadata, health)."""

    __slots__ = ("_make",)
    max_body = IGNORED_BODY_BYTES

    def __init__(self, make: Callable[[], Response]) -> None:
        self._make = make

    def start(self, body: memoryview, respond: Callable[[Response], None]) -> None:
        try:
            response = self._make()
        except DataPlaneError as error:
            response = error_response(http_error(error))
        respond(response)

    def fail(self, error: HttpError) -> None:
        pass


class _Infer:
    """One admitted inference request: its origin holds a slot until the answer."""

    __slots__ = (
        "_api",
        "_entered",
        "_header_length",
        "_name",
        "_origin",
        "_series",
        "_started",
        "_version",
    )

    def __init__(
        self,
        api: V2Api,
        origin: str,
        name: str,
        version: str | None,
        header_length: str | None,
        series: ModelSeries | None,
        started: float,
    ) -> None:
        self._api, self._origin, self._name, self._version = api, origin, name, version
        self._header_length = header_length
        self._series, self._started = series, started
        self._entered = True

    @property
    def max_body(self) -> int:
        return self._api.max_request_bytes

    def start(self, body: memoryview, respond: Callable[[Response], None]) -> None:
        def finish(result: InferResult | DataPlaneError) -> None:
            try:
                response = (
                    error_response(http_error(result))
                    if isinstance(result, DataPlaneError)
                    else self._ok(decoded, result)
                )
            except DataPlaneError as error:
                response = error_response(http_error(error))
            except Exception:
                log.exception("answering an inference request failed")
                response = error_response(HttpError(500, "internal error"))
            try:
                respond(response)
            finally:
                # Accounted after the answer is on its way: the client need not wait for it.
                if self._series is not None and isinstance(result, InferResult):
                    self._series.observe_inference(
                        len(body),
                        len(response.body),
                        result.queue_seconds,
                        result.invoke_seconds,
                        result.accelerator,
                        result.batch,
                    )
                self._done(response.status)

        try:
            decoded = codec.decode_request(body, self._header_length)
            self._api.dataplane.submit(
                self._origin, self._name, self._version, decoded.inputs, decoded.outputs, finish
            )
        except DataPlaneError as error:
            finish(error)
        except Exception:
            log.exception("an inference request failed")
            finish(DataPlaneError("internal error"))

    def _ok(self, decoded: codec.DecodedRequest, result: InferResult) -> Response:
        payload, header_length = codec.encode_response(
            self._name, self._version or MODEL_VERSION, decoded, result.outputs
        )
        if header_length is None:
            return Response(200, payload)
        headers = {HEADER_LENGTH: str(header_length)}
        return Response(200, payload, "application/octet-stream", headers)

    def fail(self, error: HttpError) -> None:
        self._done(error.status)

    def _done(self, status: int) -> None:
        if self._entered:
            self._entered = False
            self._api.dataplane.leave(self._origin, self._name)
        if self._series is not None:
            self._series.observe_request(status, time.perf_counter() - self._started)


class V2Api:
    """The v2 routes, as a `Router` for `HttpServer`: each request is admitted from its head
    (who calls, which model, within the origin's limits) and answered by the data plane."""

    def __init__(
        self,
        dataplane: DataPlane,
        metrics: GatewayMetrics | None = None,
        *,
        max_request_bytes: int = 64 << 20,
    ) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self._server_routes: dict[tuple[str, ...], Callable[[], Response]] = {
            (): lambda: json_response(dataplane.server_metadata()),
            ("openapi.json",): lambda: json_response(openapi.OPENAPI),
            ("health", "live"): lambda: json_response({"live": dataplane.live()}),
            ("health", "ready"): self._server_ready,
        }

    def admit(self, head: RequestHead) -> Call:
        try:
            return self._admit(head)
        except DataPlaneError as error:
            raise http_error(error) from None

    def _admit(self, head: RequestHead) -> Call:
        segments = head.segments
        if not segments or segments[0] != "v2":
            raise route_not_found()
        rest = segments[1:]
        if rest == ["models", "stats"]:  # Triton's: every model the caller may see
            _only(head, "GET")
            origin = self.dataplane.caller(head.headers.get("authorization"))[0]
            return _Answered(
                lambda: json_response({"model_stats": self.dataplane.model_statistics(origin)})
            )
        if len(rest) >= 2 and rest[0] == "models" and rest[1]:
            return self._model_route(head, rest[1], rest[2:])
        make = self._server_routes.get(tuple(rest))
        if make is None:
            raise route_not_found()
        _only(head, "GET")
        return _Answered(make)

    def _server_ready(self) -> Response:
        ok = self.dataplane.ready()
        return json_response({"ready": ok}, 200 if ok else 503)

    def _model_route(self, head: RequestHead, name: str, rest: list[str]) -> Call:
        version: str | None = None
        if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
            version, rest = rest[1], rest[2:]
        if rest == ["infer"]:
            _only(head, "POST")
            return self._admit_infer(head, name, version)
        dataplane = self.dataplane
        if rest == []:
            _only(head, "GET")
            origin, limits = dataplane.caller(head.headers.get("authorization"))
            details = limits.expose_accelerator_details
            return _Answered(
                lambda: json_response(dataplane.model_metadata(origin, name, version, details))
            )
        if rest == ["ready"]:
            _only(head, "GET")
            origin = dataplane.caller(head.headers.get("authorization"))[0]

            def ready() -> Response:
                ok = dataplane.model_ready(origin, name, version)
                return json_response({"name": name, "ready": ok}, 200 if ok else 503)

            return _Answered(ready)
        if rest in (["config"], ["stats"]):  # Triton's configuration and statistics extensions
            _only(head, "GET")
            origin = dataplane.caller(head.headers.get("authorization"))[0]
            if rest == ["config"]:
                return _Answered(
                    lambda: json_response(dataplane.model_config(origin, name, version))
                )
            return _Answered(
                lambda: json_response(
                    {"model_stats": dataplane.model_statistics(origin, name, version)}
                )
            )
        raise route_not_found()

    def _admit_infer(self, head: RequestHead, name: str, version: str | None) -> Call:
        started = time.perf_counter()
        metrics = self.metrics
        series = metrics.unknown if metrics is not None else None  # who: unknown until known
        dataplane = self.dataplane
        try:
            origin, limits = dataplane.caller(head.headers.get("authorization"))
            if metrics is not None:  # unknown names must not grow the series
                known = dataplane.routes.lookup(origin, name) is not None
                series = metrics.series(origin, name if known else "")
            # Refused before the body is read: an unknown model, an origin over its limits.
            dataplane.admit(origin, limits, name)
        except DataPlaneError as error:
            if series is not None:
                series.observe_request(http_error(error).status, time.perf_counter() - started)
            raise
        header_length = head.headers.get(_HEADER_LENGTH_KEY)
        return _Infer(self, origin, name, version, header_length, series, started)


def _only(head: RequestHead, method: str) -> None:
    allowed = (method, "HEAD") if method == "GET" else (method,)
    if head.method not in allowed:
        raise method_not_allowed(head.method, ", ".join(allowed))
