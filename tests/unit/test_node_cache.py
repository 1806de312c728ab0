"""The node's model cache: atomic, content-addressed, one fetch per digest at a time, bounded
with least-recently-used eviction that never removes a model a worker holds."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from modelloader_workers.fetching import SourceError, SourcePolicy, SourceRequest
from modelloader_workers.fetching.fetch_process import fetch_on_node
from modelloader_workers.fetching.fetcher import fetch
from modelloader_workers.fetching.node_cache import Lease, NodeCache


def reader(data: bytes) -> object:
    chunks = iter([data[i : i + 100] for i in range(0, len(data), 100)] + [b""])
    return lambda _n: next(chunks)


def store(cache: NodeCache, data: bytes) -> str:
    return cache.store(reader(data), None, "test", 1 << 20).sha256  # type: ignore[arg-type]


def test_a_stored_model_is_named_by_its_digest_read_only_and_found_again(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    data = b"model" * 50
    fetched = cache.store(reader(data), None, "test", 1 << 20)  # type: ignore[arg-type]
    assert fetched.sha256 == hashlib.sha256(data).hexdigest() and fetched.transferred
    assert fetched.path.read_bytes() == data
    assert fetched.path.stat().st_mode & 0o777 == 0o444
    again = cache.lookup(fetched.sha256)
    assert again is not None and again.path == fetched.path and not again.transferred
    assert not [p for p in cache.models.iterdir() if p.name.startswith(".incoming")]


def test_a_wrong_digest_or_an_oversized_stream_leaves_nothing_behind(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    with pytest.raises(SourceError, match="sha256 is"):
        cache.store(reader(b"x" * 500), "0" * 64, "test", 1 << 20)  # type: ignore[arg-type]
    with pytest.raises(SourceError, match="larger than"):
        cache.store(reader(b"x" * 500), None, "test", 100)  # type: ignore[arg-type]
    assert list(cache.models.iterdir()) == []


def test_eviction_takes_the_least_recently_used_and_spares_held_models(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path, max_bytes=250)
    old = store(cache, b"a" * 100)
    held = store(cache, b"b" * 100)
    os.utime(cache.path(old), (1, 1))
    os.utime(cache.path(held), (0, 0))  # the oldest of all, but a worker holds it
    lease = Lease(cache.path(held))
    os.utime(cache.path(held), (0, 0))
    newest = store(cache, b"c" * 100)  # 300 bytes > 250: one must go
    assert not cache.path(old).exists()
    assert cache.path(held).exists() and cache.path(newest).exists()
    lease.release()
    store(cache, b"d" * 100)  # now the released one is the least recently used
    assert not cache.path(held).exists()


def test_a_lookup_counts_as_a_use(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path, max_bytes=250)
    first = store(cache, b"a" * 100)
    second = store(cache, b"b" * 100)
    os.utime(cache.path(first), (1, 1))
    os.utime(cache.path(second), (2, 2))
    assert cache.lookup(first) is not None  # used again: now the most recent
    store(cache, b"c" * 100)
    assert cache.path(first).exists() and not cache.path(second).exists()


class _Counting(http.server.BaseHTTPRequestHandler):
    gets = 0
    body = b"model bytes " * 1000

    def do_GET(self) -> None:
        type(self).gets += 1
        time.sleep(0.3)  # long enough for the other fetches to queue on the lock
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def counting_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    _Counting.gets = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/m.tflite"
    server.shutdown()


def test_concurrent_fetches_of_one_digest_store_it_once(
    tmp_path: Path, counting_server: str
) -> None:
    policy = SourcePolicy(roots=(), cache_dir=tmp_path, allow_hosts=("127.0.0.1",))
    digest = hashlib.sha256(_Counting.body).hexdigest()
    results = []

    def one() -> None:
        results.append(fetch(SourceRequest(counting_server, digest), policy))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Each asks the URL (a cached copy goes only to a URL that answers now); one copies it.
    assert _Counting.gets == 4
    assert {r.sha256 for r in results} == {digest}
    assert sum(r.transferred for r in results) == 1


def test_the_fetch_process_answers_and_a_pinned_digest_is_served_from_the_cache(
    tmp_path: Path, counting_server: str
) -> None:
    policy = SourcePolicy(roots=(), cache_dir=tmp_path, allow_hosts=("127.0.0.1",))
    digest = hashlib.sha256(_Counting.body).hexdigest()
    # With credentials the fetch runs in a process of its own (as for s3, gs and oci).
    credentials = {"token": "never-shown"}
    first = fetch_on_node(SourceRequest(counting_server, digest, credentials=credentials), policy)
    assert first.transferred and first.path.read_bytes() == _Counting.body
    second = fetch_on_node(SourceRequest(counting_server, digest), policy)
    assert not second.transferred and _Counting.gets == 2
    with pytest.raises(SourceError, match="origin's maxModelBytes of 10 bytes"):
        fetch_on_node(SourceRequest(counting_server, digest, max_bytes=10), policy)
    with pytest.raises(SourceError, match="not a public address"):
        fetch_on_node(SourceRequest(counting_server), SourcePolicy((), tmp_path))


def test_a_cached_digest_is_no_way_round_the_source_checks(tmp_path: Path) -> None:
    """A pin the cache holds is served only to a source that passes its own checks."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "m.tflite").write_bytes(b"model")
    digest = hashlib.sha256(b"model").hexdigest()
    policy = SourcePolicy(roots=(root,), cache_dir=tmp_path / "cache")
    assert fetch(SourceRequest(f"file://{root}/m.tflite", digest), policy).transferred
    again = fetch(SourceRequest(f"file://{root}/m.tflite", digest), policy)
    assert not again.transferred
    with pytest.raises(SourceError, match="outside the allowed model roots"):
        fetch(SourceRequest("file:///etc/hostname", digest), policy)


class _Truncating(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 500)  # and the connection closes

    def log_message(self, *_: object) -> None:
        pass


def test_a_download_cut_short_is_refused_not_cached(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Truncating)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        policy = SourcePolicy(roots=(), cache_dir=tmp_path, allow_hosts=("127.0.0.1",))
        url = f"http://127.0.0.1:{server.server_address[1]}/m.tflite"
        with pytest.raises(SourceError, match="ended after 500 of 1000 bytes"):
            fetch(SourceRequest(url), policy)
        assert list((tmp_path / "sha256").iterdir()) == []
    finally:
        server.shutdown()
