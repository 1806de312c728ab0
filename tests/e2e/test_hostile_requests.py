"""Hostile requests and hostile sources against a real `modelloader local`.

- Schemathesis fuzzes every operation of the OpenAPI document the gateway serves
  (`/v2/openapi.json`), valid and invalid data alike: no answer may be a 5xx, and the server
  must answer every request (a dropped connection fails the test).
- An oversized body gets 413 before the server reads it; a body sent a byte a second is cut off
  (408) and headers sent a byte a second end with the idle timeout; hundreds of idle
  connections are closed on time and starve nobody meanwhile.
- Sources that reach loopback or link-local addresses, kernel files, paths out of the roots and
  a wrong digest each end Failed with a message.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import EXAMPLE, MODELS
from tests.e2e.conftest import MAX_REQUEST_BYTES, LocalServer, manifest, running_local

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from schemathesis.checks import not_a_server_error  # noqa: E402

pytestmark = pytest.mark.e2e

IDLE_SECONDS = 3.0
BODY_SECONDS = 3.0
FUZZ_EXAMPLES = 30  # per operation, generation mode and model name
PIXELS = json.loads((EXAMPLE / "samples.json").read_text())["samples"][0]["pixels"]
GOOD_BODY = json.dumps(
    {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": PIXELS}]}
).encode()

HOSTILE_SOURCES = {
    "src-loopback": {"uri": "http://127.0.0.1:9/digits.tflite"},
    "src-localhost": {"uri": "http://localhost:9/digits.tflite"},
    "src-metadata": {"uri": "http://169.254.169.254/latest/meta-data/"},
    "src-v6-linklocal": {"uri": "http://[fe80::1]/m.tflite"},
    "src-unspecified": {"uri": "http://0.0.0.0:9/m.tflite"},
    "src-proc": {"uri": "file:///proc/self/environ"},
    "src-device": {"uri": "file:///dev/zero"},
    "src-traversal": {"uri": "file://../../../../etc/passwd"},
    "src-digest": {"uri": "file://digits.tflite", "sha256": "0" * 64},
    "src-scheme": {"uri": "ftp://example.com/m.tflite"},
}


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    folder = tmp_path_factory.mktemp("hostile-requests")
    shutil.copy(EXAMPLE / "digits.tflite", folder)
    shutil.copy(MODELS / "dtypes.tflite", folder)
    (folder / "digits.yaml").write_text(
        manifest("digits", "file://digits.tflite", accelerator="cpu")
    )
    (folder / "dtypes.yaml").write_text(manifest("dtypes", "file://dtypes.tflite"))
    (folder / "sources.yaml").write_text(
        "---\n".join(_source_manifest(n, s) for n, s in HOSTILE_SOURCES.items())
    )
    extra = ("--idle-timeout", str(IDLE_SECONDS), "--body-timeout", str(BODY_SECONDS))
    with running_local(folder, *extra) as server:
        server.wait_for({"digits": "Ready", "dtypes": "Ready"})
        yield server
        assert server.process.poll() is None, server.log()


def _source_manifest(name: str, source: dict[str, str]) -> str:
    text = manifest(name, source["uri"], accelerator="cpu")
    if "sha256" in source:
        body = json.loads(text)
        body["spec"]["source"]["sha256"] = source["sha256"]
        text = json.dumps(body) + "\n"
    return text


def _fuzz_targets(api: Any) -> Iterator[tuple[str, Any, Any]]:
    """(label, operation, strategy) for every operation, valid and invalid data; operations
    on a model also with its name (and version) fixed to each served model, so that fuzzed
    bodies reach a real worker rather than a 404."""
    from schemathesis import GenerationMode

    for result in api.get_all_operations():
        operation = result.ok()
        names: list[dict[str, str] | None] = [None]
        if "{name}" in operation.path:
            versioned = "{version}" in operation.path
            names += [{"name": m, **({"version": "1"} if versioned else {})} for m in MODELS_SERVED]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for params in names:
                label = f"{operation.label} {mode.value} {params or ''}"
                yield label, operation, operation.as_strategy(mode, path_parameters=params)


MODELS_SERVED = ("digits", "dtypes")


def test_fuzzed_requests_never_get_a_5xx(local: LocalServer) -> None:
    api = schemathesis.openapi.from_url(f"http://{local.url}/v2/openapi.json")
    statuses: collections.Counter[int] = collections.Counter()
    failures: list[str] = []
    targets = 0
    for label, _operation, strategy in _fuzz_targets(api):
        targets += 1

        @hypothesis.given(case=strategy)
        @hypothesis.settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def fuzz(case: Any) -> None:
            response = case.call(timeout=15)  # a dropped connection raises: the test fails
            statuses[response.status_code] += 1
            case.validate_response(response, checks=[not_a_server_error])

        try:
            fuzz()
        except hypothesis.errors.Unsatisfiable:
            pass  # nothing to make invalid (no body, any string is a name): not a failure
        except (Exception, BaseExceptionGroup) as error:  # schemathesis: a group
            failures.append(f"{label}: {str(error)[:2000]}")
    total = sum(statuses.values())
    print(f"fuzz: {targets} targets, {total} requests, statuses {dict(sorted(statuses.items()))}")
    assert not failures, "\n\n".join(failures)
    assert total > 400
    assert not [s for s in statuses if s >= 500]
    assert local.process.poll() is None
    assert _infer(local.port) == 200


def _infer(port: int, timeout: float = 10) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/v2/models/digits/infer", body=GOOD_BODY)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _raw(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


def _status_line(sock: socket.socket) -> str:
    return sock.recv(4096).split(b"\r\n", 1)[0].decode()


def test_an_oversized_body_is_refused_unread(local: LocalServer) -> None:
    declared = 1 << 30  # a GiB declared; a KiB sent
    head = (
        f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    with _raw(local.port, head + b"{" * 1024) as sock:
        assert _status_line(sock) == "HTTP/1.1 413 Request Entity Too Large"
    assert time.monotonic() - started < 2
    # Chunked, with no length to look at: cut off at the limit while reading.
    connection = http.client.HTTPConnection("127.0.0.1", local.port, timeout=30)
    chunks = (b"[" * 65536 for _ in range(2 * MAX_REQUEST_BYTES // 65536))
    connection.request("POST", "/v2/models/digits/infer", body=chunks, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413, response.read()
    assert "over the limit" in json.loads(response.read())["error"]
    connection.close()


def test_slow_senders_and_idle_connections_are_bounded(local: LocalServer) -> None:
    idle = [socket.create_connection(("127.0.0.1", local.port)) for _ in range(300)]
    slow_headers = _raw(local.port, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost")
    slow_body = _raw(
        local.port,
        b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{",
    )
    stop = threading.Event()

    def drip() -> None:  # a byte a second on both slow connections
        while not stop.wait(1.0):
            for sock in (slow_headers, slow_body):
                with contextlib.suppress(OSError):
                    sock.send(b"x")

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    started = time.monotonic()
    served = []
    try:
        # Meanwhile another client is served, promptly, again and again.
        while time.monotonic() - started < BODY_SECONDS + 1:
            t0 = time.monotonic()
            assert _infer(local.port, timeout=5) == 200
            served.append(time.monotonic() - t0)
            time.sleep(0.1)
        slow_body.settimeout(BODY_SECONDS + 12)  # + the sweeper's period and a busy machine
        assert _status_line(slow_body).startswith("HTTP/1.1 408")
        body_cut = time.monotonic() - started
        # The idle ones and the header drip end at the idle timeout.
        deadline = started + IDLE_SECONDS + 30
        open_ = [*idle, slow_headers]
        while open_ and time.monotonic() < deadline:
            still = []
            for sock in open_:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    if sock.recv(1) == b"":
                        continue  # closed by the server
                except (ConnectionResetError, BrokenPipeError):
                    continue
                except TimeoutError:
                    pass
                still.append(sock)
            open_ = still
        idle_cut = time.monotonic() - started
    finally:
        stop.set()
        dripper.join()
        for sock in [*idle, slow_headers, slow_body]:
            sock.close()
    print(
        f"bounds: {len(served)} requests served during 300 idle + 2 slow connections, "
        f"slowest {max(served) * 1000:.0f} ms; slow body cut (408) after {body_cut:.1f}s; "
        f"idle and slow-header connections closed after {idle_cut:.1f}s"
    )
    assert not open_, f"{len(open_)} connections still open after {idle_cut:.1f}s"
    assert max(served) < 1.0
    assert _infer(local.port) == 200


def test_hostile_sources_end_failed_with_a_message(local: LocalServer) -> None:
    want = dict.fromkeys(HOSTILE_SOURCES, "Failed")
    local.wait_for(want, timeout=60)
    messages = {n: local.item(n)["status"].get("message", "") for n in HOSTILE_SOURCES}
    print("sources:", json.dumps(messages, indent=1))
    expected = {
        "src-loopback": "not a public address",
        "src-localhost": "not a public address",
        "src-metadata": "not a public address",
        "src-v6-linklocal": "not a public address",
        "src-unspecified": "not a public address",
        "src-proc": "/dev, /proc or /sys",
        "src-device": "/dev, /proc or /sys",
        "src-traversal": "outside the allowed model roots",
        "src-digest": "sha256 is",
        "src-scheme": "must start with file://, http://, https://, s3://, gs:// or oci://",
    }
    wrong = {n: m for n, m in messages.items() if expected[n] not in m}
    assert not wrong, wrong
