"""What a tenant's source cannot reach or take: another tenant's cached model by its digest,
files outside the cache through a crafted digest, addresses behind an object store's redirect,
a token endpoint of its own choosing, or a host name smuggled in as a region. The object-store
fetches run through the real fetch process and its egress proxy; servers are real, on
loopback."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from modelloader_workers.fetching import SourceError, SourcePolicy, SourceRequest
from modelloader_workers.fetching.fetch_process import fetch_on_node
from modelloader_workers.fetching.fetcher import fetch
from modelloader_workers.fetching.node_cache import NodeCache

PRIVATE = b"a private model of another origin"
DIGEST = hashlib.sha256(PRIVATE).hexdigest()


@pytest.fixture
def cached(tmp_path: Path) -> SourcePolicy:
    """A node whose cache holds another origin's model, fetched from a file it may read."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "private.tflite").write_bytes(PRIVATE)
    policy = SourcePolicy(roots=(root,), cache_dir=tmp_path / "cache")
    assert fetch(SourceRequest(f"file://{root}/private.tflite", DIGEST), policy).transferred
    return policy


def test_a_known_digest_does_not_fetch_a_cached_model_from_another_source(
    cached: SourcePolicy,
) -> None:
    (root,) = cached.roots
    with pytest.raises(SourceError, match="no such file"):
        fetch(SourceRequest(f"file://{root}/nothing-here.tflite", DIGEST), cached)
    allowed = SourcePolicy(cached.roots, cached.cache_dir, allow_hosts=("127.0.0.1",))
    with pytest.raises(SourceError, match="download failed"):
        fetch(SourceRequest("http://127.0.0.1:9/m.tflite", DIGEST), allowed)


def test_a_digest_never_names_a_file_outside_the_cache(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    for crafted in ("../../etc/passwd", "a" * 63 + "/", "A" * 64):
        with pytest.raises(SourceError, match="not a sha256 digest"):
            cache.lookup(crafted)


def test_a_region_cannot_carry_a_host(tmp_path: Path) -> None:
    credentials = {"AWS_ACCESS_KEY_ID": "key", "AWS_REGION": "x@127.0.0.1:9/#"}
    with pytest.raises(SourceError, match="is not a region name"):
        fetch_on_node(
            SourceRequest("s3://bucket/m.tflite", credentials=credentials),
            SourcePolicy((), tmp_path),
        )


def test_a_key_cannot_choose_its_token_endpoint(tmp_path: Path) -> None:
    key = {
        "type": "service_account",
        "client_email": "x@example.iam.gserviceaccount.com",
        "private_key": "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n",
        "token_uri": "http://169.254.169.254/token",
    }
    credentials = {"key.json": json.dumps(key)}
    with pytest.raises(SourceError, match="not Google's token endpoint"):
        fetch_on_node(
            SourceRequest("gs://bucket/m.tflite", credentials=credentials),
            SourcePolicy((), tmp_path),
        )


class _Redirect(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def redirecting() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_object_store_redirect_to_a_private_address_is_refused(
    tmp_path: Path, redirecting: str
) -> None:
    """The endpoint is allowed; where it redirects is not: the egress proxy refuses it."""
    credentials = {
        "AWS_ACCESS_KEY_ID": "key-id",
        "AWS_SECRET_ACCESS_KEY": "secret-key",
        "AWS_ENDPOINT_URL": redirecting,
    }
    policy = SourcePolicy((), tmp_path, allow_hosts=("127.0.0.1",), http_timeout_seconds=5)
    with pytest.raises(SourceError, match=r"169\.254\.169\.254.*not a public address"):
        fetch_on_node(SourceRequest("s3://bucket/m.tflite", credentials=credentials), policy)
