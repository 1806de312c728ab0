"""One route table, two channels: the table the planner decides is handed to a gateway in the
same process (as `modelloader local` does) and through the detached Ray actor to a gateway that
follows it (as the operator and `modelloader gateway` do); both then route every request alike.
Real workers, real Ray, real HTTP."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from modelloader.planner import WorkerView, plan
from modelloader.policy import OriginPolicy, policies
from modelloader.ray_workers import RayWorkers
from modelloader.resource import LoadedModel, LoadedModelSpec, Source
from modelloader.tenancy import TokenSecret, access_table
from modelloader_gateway import route_board
from modelloader_gateway.access import token_digest
from modelloader_gateway.routes import RouteTable
from modelloader_gateway.server import Gateway, GatewayConfig
from modelloader_workers.litert_runner import LiteRTRunner

from tests.integration.conftest import CPU_RESOURCE
from tests.support.calls import from_file, identity

TOKENS = {"a": "token-of-origin-a-0123456789", "b": "token-of-origin-b-0123456789"}
TOKENS["c"] = "token-of-origin-c-0123456789"  # an origin that serves nothing


def lm(name: str, origin: str) -> LoadedModel:
    return LoadedModel(origin, name, LoadedModelSpec(origin, Source(f"file:///{name}")))


def ask(port: int, method: str, path: str, origin: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {TOKENS[origin]}"}
        data = json.dumps(body) if body is not None else None
        conn.request(method, path, data, headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def test_local_and_cluster_gateways_route_alike_from_one_published_table(
    local_ray: str, digits_model: Path, dtypes_model: Path
) -> None:
    workers = RayWorkers(Path(f"/tmp/mlrt-{os.getpid()}"), tcp=True)
    # Two origins with a model of the same name, on different files; a third model loading.
    for_a, for_b, loading = lm("x", "a"), lm("x", "b"), lm("later", "a")
    known = policies(OriginPolicy(""), [])
    secrets = [TokenSecret(o, "token", o, token_digest(t)) for o, t in TOKENS.items()]
    access, problems = access_table(known, secrets)
    assert problems == []

    async def scenario() -> list[tuple[str, str, str, int, Any]]:
        resources = {CPU_RESOURCE: 1.0}
        started = [
            await workers.start(identity(for_a), for_a, from_file(digits_model), "cpu", resources),
            await workers.start(identity(for_b), for_b, from_file(dtypes_model), "cpu", resources),
        ]
        views = [
            WorkerView(
                info.identity.worker_id,
                info.identity.key,
                info.identity.fingerprint,
                1,
                "ready",
                signature=info.signature,
                placement=info.placement,
                address=info.address,
                origin=info.identity.origin,
            )
            for _, info in started
        ]
        decided = plan(
            [for_a, for_b, loading], views, {"CPU": 4.0, CPU_RESOURCE: 4.0}, policies=known
        )
        table = RouteTable(decided.routes, access, revision=1)

        local = Gateway(GatewayConfig(port=0))
        local.publish(table)  # the in-process channel
        cluster = Gateway(GatewayConfig(port=0))
        stop = asyncio.Event()
        following = asyncio.ensure_future(route_board.follow(cluster.publish, stop))
        await route_board.RayRouteChannel().publish(table)
        for gateway in (local, cluster):
            await gateway.start()
        # Until this table arrives: a board left by an earlier test may first hand over its
        # own (older) table.
        for _ in range(200):
            if cluster.routes.published and cluster.routes.table.routes == table.routes:
                break
            await asyncio.sleep(0.05)
        assert cluster.routes.table.routes == table.routes
        assert cluster.routes.table.access == table.access
        assert cluster.routes.table.revision != table.revision  # the board stamps its own

        pixels = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 64)
        infer = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64]}]}
        infer["inputs"][0]["data"] = pixels.ravel().tolist()
        answers = []
        for name, gateway in (("local", local), ("cluster", cluster)):
            port = gateway.http.port
            for origin in ("a", "b", "c"):
                for method, path, body in (
                    ("GET", "/v2/models/x", None),
                    ("GET", "/v2/models/x/ready", None),
                    ("POST", "/v2/models/x/infer", infer),
                    ("GET", "/v2/models/later/ready", None),
                    ("POST", "/v2/models/later/infer", infer),
                ):
                    code, got = await asyncio.to_thread(ask, port, method, path, origin, body)
                    answers.append((name, origin, f"{method} {path}", code, got))
        stop.set()
        await following
        for gateway in (local, cluster):
            await gateway.close()
        for handle, _ in started:
            workers.stop(handle)
        return answers

    answers = asyncio.run(scenario())
    by_gateway: dict[str, dict[tuple[str, str], tuple[int, Any]]] = {}
    for gateway, origin, request, code, body in answers:
        by_gateway.setdefault(gateway, {})[(origin, request)] = (code, body)
    assert by_gateway["local"] == by_gateway["cluster"]  # the same decision, every request
    decided = by_gateway["local"]
    # Origin a's "x" is the digits model, b's is the dtypes model, c has none.
    assert [i["name"] for i in decided[("a", "GET /v2/models/x")][1]["inputs"]] == ["pixels"]
    assert "f16" in {i["name"] for i in decided[("b", "GET /v2/models/x")][1]["inputs"]}
    assert decided[("c", "GET /v2/models/x")][0] == 404
    code, body = decided[("a", "POST /v2/models/x/infer")]
    expected = LiteRTRunner(str(digits_model)).run(
        {"pixels": np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 64)}
    )["probabilities"]
    assert code == 200
    np.testing.assert_allclose(body["outputs"][0]["data"], expected.ravel(), rtol=1e-6)
    assert decided[("b", "POST /v2/models/x/infer")][0] == 400  # dtypes takes other inputs
    # A model with no ready endpoint: not ready, and its requests are 503 in both.
    assert decided[("a", "GET /v2/models/later/ready")][0] == 503
    assert decided[("a", "POST /v2/models/later/infer")][0] == 503
    assert decided[("b", "GET /v2/models/later/ready")][0] == 404  # a's model, not b's
