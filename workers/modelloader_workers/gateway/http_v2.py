"""Open Inference Protocol v2 over HTTP: a thin aiohttp layer over `DataPlane`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from modelloader_workers.gateway import codec, openapi
from modelloader_workers.gateway.access import (
    AccessTable,
    OriginAccess,
    OriginLimiter,
    authenticate,
    open_table,
)
from modelloader_workers.gateway.dataplane import MODEL_VERSION, DataPlane
from modelloader_workers.gateway.errors import DataPlaneError
from modelloader_workers.gateway.metrics import GatewayMetrics

HEADER_LENGTH = "Inference-Header-Content-Length"
# Bounds on what one client may hold. A connection idle, or still sending its request line and
# headers, this long is closed (aiohttp's keepalive_timeout, set where the runner is made); an
# infer body must have arrived this long after its headers.
IDLE_TIMEOUT_SECONDS = 15.0
BODY_TIMEOUT_SECONDS = 30.0


class BodyTimeout(DataPlaneError):
    status = 408


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _errors_as_json(max_request_bytes: int) -> Any:
    """Every error, ours or aiohttp's (unknown route, 405, 413), as `{"error": reason}`."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except DataPlaneError as error:
            return error_response(error.status, error.message, error.headers())
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413, f"request body is over the limit of {max_request_bytes} bytes"
            )
        except web.HTTPException as error:
            if error.status < 400:
                raise
            return error_response(error.status, error.reason)

    return middleware


def build_app(
    dataplane: DataPlane,
    metrics: GatewayMetrics | None = None,
    *,
    max_request_bytes: int = 64 << 20,
    ready: Callable[[], bool] = lambda: True,
    access: Callable[[], AccessTable] = open_table,
    limiter: OriginLimiter | None = None,
    body_timeout_seconds: float = BODY_TIMEOUT_SECONDS,
) -> web.Application:
    """`access` returns the current table of tokens and origin limits (the control plane
    replaces it as Secrets and OriginPolicies change); without one, every caller acts for the
    `default` origin."""
    limiter = limiter or OriginLimiter()

    def caller(request: web.Request) -> tuple[str, OriginAccess]:
        """The caller's origin and its limits, from one reading of the access table."""
        table = access()
        origin = authenticate(table, request.headers.get("Authorization"))
        return origin, table.of(origin)

    app = web.Application(
        middlewares=[_errors_as_json(max_request_bytes)], client_max_size=max_request_bytes
    )

    async def server_metadata(_: web.Request) -> web.Response:
        return web.json_response(dataplane.server_metadata())

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def server_ready(_: web.Request) -> web.Response:
        ok = ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def model_metadata(request: web.Request) -> web.Response:
        name, version = _model(request)
        origin, limits = caller(request)
        details = limits.expose_accelerator_details
        return web.json_response(dataplane.model_metadata(origin, name, version, details))

    async def model_ready(request: web.Request) -> web.Response:
        name, version = _model(request)
        ok = dataplane.model_ready(caller(request)[0], name, version)
        return web.json_response({"name": name, "ready": ok}, status=200 if ok else 503)

    async def infer(request: web.Request) -> web.Response:
        started = time.perf_counter()
        name, version = _model(request)
        labels = ("", "")  # who is unknown until authenticated
        status = 500
        entered = ""
        try:
            origin, limits = caller(request)
            entry = dataplane.directory.lookup(origin, name)
            # Unknown names must not grow the series.
            labels = (origin, name if entry is not None else "")
            limiter.enter(origin, limits)
            entered = origin
            try:
                body = await asyncio.wait_for(
                    codec.read_body(request.content, request.content_length, max_request_bytes),
                    body_timeout_seconds,
                )
            except TimeoutError:
                raise BodyTimeout(
                    f"the request body did not arrive within {body_timeout_seconds:g} s"
                ) from None
            decoded = codec.decode_request(body, request.headers.get(HEADER_LENGTH))
            result = await dataplane.infer(origin, name, version, decoded.inputs, decoded.outputs)
            payload, header_length = codec.encode_response(
                name, version or MODEL_VERSION, decoded, result.outputs
            )
            status = 200
            if metrics is not None:
                metrics.request_bytes.labels(*labels).observe(len(body))
                metrics.response_bytes.labels(*labels).observe(len(payload))
                metrics.queue_duration.labels(*labels).observe(result.queue_seconds)
                metrics.inference_duration.labels(*labels).observe(result.invoke_seconds)
                accelerator = entry.accelerator if entry is not None else "cpu"
                metrics.accelerator_busy.labels(*labels, accelerator).inc(result.invoke_seconds)
        except DataPlaneError as error:
            status = error.status
            raise
        except web.HTTPException as error:
            status = error.status
            raise
        finally:
            if entered:
                limiter.leave(entered)
            if metrics is not None:
                metrics.requests.labels(*labels, str(status)).inc()
                metrics.request_duration.labels(*labels).observe(time.perf_counter() - started)
        if header_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(
            body=payload,
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(header_length)},
        )

    async def openapi_document(_: web.Request) -> web.Response:
        return web.json_response(openapi.OPENAPI)

    routes = [
        web.get("/v2", server_metadata),
        web.get("/v2/openapi.json", openapi_document),
        web.get("/v2/health/live", live),
        web.get("/v2/health/ready", server_ready),
    ]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [
            web.get(prefix, model_metadata),
            web.get(prefix + "/ready", model_ready),
            web.post(prefix + "/infer", infer),
        ]
    app.add_routes(routes)
    return app


def _model(request: web.Request) -> tuple[str, str | None]:
    return request.match_info["name"], request.match_info.get("version")
