"""Model sources (the node's fetcher) against real files and a real HTTP server on loopback
(allowed explicitly: by default a source may reach public addresses only)."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from modelloader.resource import LoadedModel, LoadedModelSpec, Source
from modelloader_workers.fetching import FetchedModel, SourceError, SourcePolicy, SourceRequest
from modelloader_workers.fetching.fetcher import fetch

DATA = b"TFL3 pretend model bytes" * 100
DIGEST = hashlib.sha256(DATA).hexdigest()


def model(uri: str, sha256: str | None = None, base_dir: Path | None = None) -> LoadedModel:
    return LoadedModel(
        "default", "m", LoadedModelSpec("default", Source(uri, sha256)), base_dir=base_dir
    )


class ModelSources:
    """A LoadedModel's source fetched as its worker's node does (in this process)."""

    def __init__(self, policy: SourcePolicy) -> None:
        self.policy = policy

    def fetch(self, model: LoadedModel) -> FetchedModel:
        source = model.spec.source
        base_dir = str(model.base_dir) if model.base_dir else None
        return fetch(SourceRequest(source.uri, source.sha256, base_dir), self.policy)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "m.tflite").write_bytes(DATA)
    (tmp_path / "secret.tflite").write_bytes(b"outside")
    return root


@pytest.fixture
def sources(tmp_path: Path, root: Path) -> ModelSources:
    return ModelSources(
        SourcePolicy(
            roots=(root,), cache_dir=tmp_path / "cache", max_bytes=4096, allow_hosts=("127.0.0.1",)
        )
    )


@pytest.fixture
def strict(tmp_path: Path, root: Path) -> ModelSources:
    """The default policy: public addresses only."""
    return ModelSources(SourcePolicy(roots=(root,), cache_dir=tmp_path / "strict", max_bytes=4096))


def test_relative_and_absolute_file_uris_land_in_the_cache(
    sources: ModelSources, root: Path
) -> None:
    relative = sources.fetch(model("file://sub/m.tflite", base_dir=root))
    absolute = sources.fetch(model(f"file://{root}/sub/m.tflite", sha256=DIGEST))
    assert relative.sha256 == DIGEST == absolute.sha256
    assert relative.path == absolute.path and relative.path.read_bytes() == DATA
    assert relative.path.name == f"{DIGEST}.tflite"


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("file://../secret.tflite", "outside the allowed model roots"),
        ("file://sub/../../secret.tflite", "outside the allowed model roots"),
        ("file:///etc/passwd", "outside the allowed model roots"),
        ("file:///proc/self/environ", "in /dev, /proc or /sys"),
        ("file://../../etc/passwd", "outside the allowed model roots"),
        ("file://sub/%2e%2e/%2e%2e/secret.tflite", "outside the allowed model roots"),
        ("file:///dev/zero", "in /dev, /proc or /sys"),
        ("file://sub/m.tflite%00.txt", "NUL byte"),
        ("file://sub/missing.tflite", "no such file"),
        ("file://sub", "not a regular file"),
    ],
)
def test_file_uris_outside_the_roots_or_not_files(
    sources: ModelSources, root: Path, uri: str, needle: str
) -> None:
    with pytest.raises(SourceError, match=needle):
        sources.fetch(model(uri, base_dir=root))


def test_a_symlink_out_of_the_root_is_refused(sources: ModelSources, root: Path) -> None:
    os.symlink(root.parent / "secret.tflite", root / "link.tflite")
    with pytest.raises(SourceError, match="outside the allowed model roots"):
        sources.fetch(model("file://link.tflite", base_dir=root))


def test_a_device_under_a_root_is_refused(tmp_path: Path) -> None:
    sources = ModelSources(SourcePolicy(roots=(Path("/dev"),), cache_dir=tmp_path / "c"))
    with pytest.raises(SourceError, match="not a regular file"):
        sources.fetch(model("file:///dev/zero"))


@pytest.mark.parametrize("uri", ["file:///proc/self/environ", "file:///sys/kernel/notes"])
def test_kernel_files_are_refused_even_under_a_root_of_slash(tmp_path: Path, uri: str) -> None:
    sources = ModelSources(SourcePolicy(roots=(Path("/"),), cache_dir=tmp_path / "c"))
    with pytest.raises(SourceError, match="in /dev, /proc or /sys"):
        sources.fetch(model(uri))


def test_a_symlink_into_proc_is_refused(tmp_path: Path, root: Path) -> None:
    sources = ModelSources(SourcePolicy(roots=(Path("/"),), cache_dir=tmp_path / "c"))
    os.symlink("/proc/self/environ", root / "env.tflite")
    with pytest.raises(SourceError, match="in /dev, /proc or /sys"):
        sources.fetch(model("file://env.tflite", base_dir=root))


def test_a_fifo_under_a_root_is_refused_without_blocking(sources: ModelSources, root: Path) -> None:
    os.mkfifo(root / "fifo.tflite")
    with pytest.raises(SourceError, match="not a regular file"):
        sources.fetch(model("file://fifo.tflite", base_dir=root))


def test_digest_mismatch_and_size_limit(sources: ModelSources, root: Path) -> None:
    with pytest.raises(SourceError, match="sha256 is"):
        sources.fetch(model("file://sub/m.tflite", sha256="0" * 64, base_dir=root))
    (root / "big.tflite").write_bytes(b"x" * 5000)
    with pytest.raises(SourceError, match="over the limit"):  # its size says so, unread
        sources.fetch(model("file://big.tflite", base_dir=root))


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/m.tflite":
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.end_headers()
            self.wfile.write(DATA)
        elif self.path == "/big.tflite":
            self.send_response(200)
            self.end_headers()  # no length: the limit must bite while streaming
            self.wfile.write(b"x" * 10000)
        elif self.path == "/lying-length.tflite":
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
        elif self.path == "/slow.tflite":
            self.send_response(200)
            self.end_headers()
            for _ in range(40):  # a byte every 50 ms: never idle long enough for the timeout
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        elif self.path.startswith("/redirect?"):
            self.send_response(302)
            self.send_header("Location", self.path.split("?", 1)[1])
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_http_download_verified_and_cached(sources: ModelSources, server: str) -> None:
    fetched = sources.fetch(model(f"{server}/m.tflite", sha256=DIGEST))
    assert fetched.path.read_bytes() == DATA
    # The same URL pinned to the digest it gave: from the cache, no second download.
    again = sources.fetch(model(f"{server}/m.tflite", sha256=DIGEST))
    assert again.path == fetched.path and not again.transferred
    # Another URL naming that digest gets nothing from the cache: a digest is no capability.
    with pytest.raises(SourceError, match="download failed"):
        sources.fetch(model("http://127.0.0.1:9/gone.tflite", sha256=DIGEST))


@pytest.mark.parametrize(
    ("path", "sha256", "needle"),
    [
        ("/missing.tflite", None, "answered 404"),
        ("/big.tflite", None, "larger than the limit"),
        ("/m.tflite", "1" * 64, "sha256 is"),
    ],
)
def test_http_failures(
    sources: ModelSources, server: str, path: str, sha256: str | None, needle: str
) -> None:
    with pytest.raises(SourceError, match=needle):
        sources.fetch(model(f"{server}{path}", sha256=sha256))


def test_unreachable_server(sources: ModelSources) -> None:
    with pytest.raises(SourceError, match="download failed"):
        sources.fetch(model("http://127.0.0.1:9/m.tflite"))


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.8.9.10",
        "localhost",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "0.0.0.0",
        "[::]",
        "169.254.169.254",  # cloud metadata
        "[fe80::1]",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "[fd00::1]",
        "224.0.0.1",
        "2130706433",  # 127.0.0.1 as one number
        "0x7f.1",
    ],
)
def test_sources_that_reach_non_public_addresses_are_refused(
    strict: ModelSources, host: str
) -> None:
    # Refused before any connection is made: nothing listens on these ports anyway.
    with pytest.raises(SourceError, match="not a public address"):
        strict.fetch(model(f"http://{host}:9/m.tflite"))


def test_the_loopback_server_is_refused_by_default(strict: ModelSources, server: str) -> None:
    with pytest.raises(SourceError, match=r"resolves to 127\.0\.0\.1, which is not a public"):
        strict.fetch(model(f"{server}/m.tflite", sha256=DIGEST))


@pytest.mark.parametrize("allow", ["127.0.0.1", "127.0.0.0/8", "localhost"])
def test_allow_hosts_admits_an_address_a_network_or_a_name(
    tmp_path: Path, server: str, allow: str
) -> None:
    sources = ModelSources(SourcePolicy(roots=(), cache_dir=tmp_path / "c", allow_hosts=(allow,)))
    url = server.replace("127.0.0.1", "localhost") if allow == "localhost" else server
    assert sources.fetch(model(f"{url}/m.tflite")).sha256 == DIGEST


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254, which is not a public"),
        ("http://[::1]:9/m.tflite", "::1, which is not a public"),
        ("http://10.1.2.3/m.tflite", "10.1.2.3, which is not a public"),
        ("file:///etc/passwd", "is not allowed"),
        ("ftp://127.0.0.1/m.tflite", "only http"),
        ("/loop", "answered 302"),
    ],
)
def test_redirects_are_checked_hop_by_hop(
    sources: ModelSources, server: str, target: str, needle: str
) -> None:
    # The first hop (127.0.0.1) is allowed; where it redirects to is not.
    with pytest.raises(SourceError, match=needle):
        sources.fetch(model(f"{server}/redirect?{target}"))


def test_a_redirect_to_an_allowed_host_is_followed(sources: ModelSources, server: str) -> None:
    fetched = sources.fetch(model(f"{server}/redirect?{server}/m.tflite", sha256=DIGEST))
    assert fetched.path.read_bytes() == DATA


def test_credentials_in_the_url_are_refused(sources: ModelSources, server: str) -> None:
    with pytest.raises(SourceError, match="credentials"):
        sources.fetch(model(server.replace("http://", "http://user:pw@") + "/m.tflite"))


def test_a_declared_length_over_the_limit_is_refused_unread(
    sources: ModelSources, server: str
) -> None:
    with pytest.raises(SourceError, match="over the limit"):
        sources.fetch(model(f"{server}/lying-length.tflite"))


def test_a_slow_drip_download_meets_the_deadline(tmp_path: Path, server: str) -> None:
    sources = ModelSources(
        SourcePolicy(
            roots=(),
            cache_dir=tmp_path / "c",
            allow_hosts=("127.0.0.1",),
            http_timeout_seconds=5,
            download_deadline_seconds=0.5,
        )
    )
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"took longer than 0\.5 s"):
        sources.fetch(model(f"{server}/slow.tflite"))
    assert time.monotonic() - started < 1.5
