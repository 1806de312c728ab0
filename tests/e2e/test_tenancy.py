"""Multi-tenancy end to end, on `modelloader local` with real Ray, LiteRT and HTTP: quotas,
shared processes, memory limits, bearer tokens, unbound origins and rate limits."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLE, MODELS
from tests.e2e.conftest import LocalServer, parent_of, running_local

TOKENS = {
    "shop": "shop-token-0123456789abcdef",
    "games": "games-token-0123456789abcdef",
    "lab": "lab-token-0123456789abcdef",
}
PIXELS = [0.0] * 64


def doc(kind: str, name: str, spec: dict[str, Any], namespace: str | None = None) -> str:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return json.dumps(
        {"apiVersion": "modelloader.dev/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}
    )


def model(name: str, namespace: str, uri: str = "file://digits.tflite", **spec: Any) -> str:
    return doc(
        "LoadedModel", name, {"source": {"uri": uri}, "accelerator": "cpu", **spec}, namespace
    )


def secret(name: str, namespace: str, origin: str, token: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"modelloader.dev/origin": origin},
            },
            "stringData": {"token": token},
        }
    )


def write(path: Path, docs: list[str]) -> None:
    path.write_text("\n---\n".join(docs) + "\n")


SHOP = [f"s{i:03}" for i in range(100)]
GAMES = [f"g{i:02}" for i in range(20)]


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    folder = tmp_path_factory.mktemp("tenants")
    shutil.copy(EXAMPLE / "digits.tflite", folder)
    shutil.copy(MODELS / "memory_hog.tflite", folder)
    write(
        folder / "policies.yaml",
        [
            doc("OriginPolicy", "default", {"allowAnonymous": False}),
            doc("OriginPolicy", "shop", {"quota": {"maxModels": 5, "requestsPerSecond": 5}}),
            doc(
                "OriginPolicy",
                "games",
                {
                    "isolation": "perOrigin",
                    "quota": {"maxWorkers": 2},
                    "exposeAcceleratorDetails": True,
                },
            ),
        ],
    )
    write(
        folder / "secrets.yaml",
        [secret(f"{o}-token", o, o, t) for o, t in TOKENS.items()]
        # A tenant labelling its own Secret for someone else's origin gets nothing.
        + [secret("forged", "games", "shop", "forged-token-0123456789abcdef")],
    )
    write(folder / "shop.yaml", [model(n, "shop") for n in SHOP])
    write(folder / "games.yaml", [model(n, "games") for n in GAMES])
    write(
        folder / "lab.yaml",
        [
            model("hog", "lab", "file://memory_hog.tflite", resources={"memory": "64Mi"}),
            model("digits", "lab"),
        ],
    )
    write(folder / "intruder.yaml", [model("intruder", "games", origin="shop")])
    with running_local(folder) as local:
        want = {n: "Ready" for n in SHOP[:5] + GAMES} | {"hog": "Failed", "intruder": "Failed"}
        local.wait_for(want | {"digits": "Ready"}, timeout=240)
        yield local


def call(
    server: LocalServer, method: str, path: str, token: str | None = None, body: Any = None
) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), json.loads(data) if data else None
    finally:
        conn.close()


def infer(server: LocalServer, name: str, token: str | None) -> tuple[int, dict[str, str], Any]:
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": PIXELS}]}
    return call(server, "POST", f"/v2/models/{name}/infer", token, body)


def items(server: LocalServer, namespace: str) -> dict[str, dict[str, Any]]:
    return {i["name"]: i for i in server.status()["items"] if i["namespace"] == namespace}


def test_a_quota_of_5_runs_exactly_5_of_100_and_the_rest_wait(tenants: LocalServer) -> None:
    shop = items(tenants, "shop")
    ready = sorted(n for n, i in shop.items() if i["status"]["phase"] == "Ready")
    assert ready == SHOP[:5]  # the oldest five, in creation (file) order
    waiting = [i for n, i in shop.items() if n not in ready]
    assert len(waiting) == 95
    for item in waiting:
        assert item["status"]["phase"] == "Pending"
        quota = next(c for c in item["status"]["conditions"] if c["type"] == "QuotaExceeded")
        assert quota["status"] == "True" and quota["reason"] == "maxModels"
        assert "maxModels is 5" in quota["message"]
    origin = tenants.status()["origins"]["shop"]
    assert origin["usage"]["models"] == 5 and origin["limits"]["models"] == 5
    assert origin["waiting"] == 95 and "models" in origin["atLimit"]


def test_a_perorigin_origin_runs_20_models_under_its_2_workers(tenants: LocalServer) -> None:
    games = items(tenants, "games")
    served = {n: i for n, i in games.items() if n in GAMES}
    assert all(i["status"]["phase"] == "Ready" for i in served.values())
    # Each model has a model process of its own; the origin's 2 workers supervise them.
    pids = {i["status"]["placement"]["pid"] for i in served.values()}
    assert len(pids) == len(served)
    workers = {parent_of(pid) for pid in pids}
    assert 1 <= len(workers) <= 2
    shop_workers = {
        parent_of(i["status"]["placement"]["pid"])
        for i in items(tenants, "shop").values()
        if "placement" in i["status"]
    }
    assert not workers & shop_workers  # two origins never share a worker
    status, _, _ = infer(tenants, "g07", TOKENS["games"])
    assert status == 200


def test_a_model_over_its_memory_limit_fails_alone(tenants: LocalServer) -> None:
    lab = items(tenants, "lab")
    hog = lab["hog"]["status"]
    assert hog["phase"] == "Failed"
    assert "64 MiB" in hog["message"] and "spec.resources.memory" in hog["message"]
    assert lab["digits"]["status"]["phase"] == "Ready"
    status, _, body = infer(tenants, "digits", TOKENS["lab"])
    assert status == 200, body


def test_tokens_decide_the_origin_and_other_origins_models_do_not_exist(
    tenants: LocalServer,
) -> None:
    status, headers, body = infer(tenants, "g00", None)
    assert status == 401 and "bearer token" in body["error"]
    assert headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert infer(tenants, "g00", "not-a-token-at-all-000000")[0] == 401
    missing = call(tenants, "GET", "/v2/models/no-such-model", TOKENS["shop"])
    for name in GAMES:  # every model of games is, for shop, exactly like a missing one
        other = call(tenants, "GET", f"/v2/models/{name}", TOKENS["shop"])
        assert other[0] == 404 == missing[0]
        assert other[2]["error"] == missing[2]["error"].replace("no-such-model", name)
    for name in GAMES[:3]:  # shop may send 5 a second
        assert infer(tenants, name, TOKENS["shop"])[0] == 404
        time.sleep(0.25)
    # A forged Secret in games' namespace grants nothing for shop.
    assert infer(tenants, "s000", "forged-token-0123456789abcdef")[0] == 401
    assert any("forged" in e for e in tenants.status()["errors"])


def test_hardware_details_only_for_origins_that_expose_them(tenants: LocalServer) -> None:
    status, _, games = call(tenants, "GET", "/v2/models/g00", TOKENS["games"])
    assert status == 200 and games["parameters"]["placement"]["accelerator"] == "cpu"
    status, _, shop = call(tenants, "GET", "/v2/models/s000", TOKENS["shop"])
    assert status == 200 and "parameters" not in shop
    assert "placement" not in json.dumps(shop)


def test_claiming_an_unbound_origin_is_rejected(tenants: LocalServer) -> None:
    intruder = items(tenants, "games")["intruder"]["status"]
    assert intruder["phase"] == "Failed"
    assert "namespace 'games' may not act for origin 'shop'" in intruder["message"]


def test_an_origin_over_its_rate_gets_429_while_another_is_served(
    tenants: LocalServer,
) -> None:
    def flood() -> list[tuple[int, dict[str, str]]]:
        return [infer(tenants, "s001", TOKENS["shop"])[:2] for _ in range(40)]

    def steady() -> list[int]:
        out = []
        for _ in range(20):
            out.append(infer(tenants, "g03", TOKENS["games"])[0])
            time.sleep(0.01)
        return out

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        flooded, served = pool.submit(flood), pool.submit(steady)
        shop, games = flooded.result(), served.result()
    codes = [code for code, _ in shop]
    assert codes.count(429) >= 20 and codes.count(200) >= 1, codes
    retry = next(h for c, h in shop if c == 429)
    assert int(retry["Retry-After"]) >= 1
    assert games == [200] * 20


def test_deleting_one_lets_the_oldest_waiting_model_proceed(tenants: LocalServer) -> None:
    # Last: it changes the manifests the other tests read.
    shop_file = tenants.folder / "shop.yaml"
    write(shop_file, [model(n, "shop") for n in SHOP if n != "s002"])
    tenants.wait_for({"s005": "Ready"}, timeout=90)
    time.sleep(1.5)  # a few more passes: nobody else gets in
    shop = items(tenants, "shop")
    assert "s002" not in shop
    assert sorted(n for n, i in shop.items() if i["status"]["phase"] == "Ready") == [
        "s000",
        "s001",
        "s003",
        "s004",
        "s005",
    ]
