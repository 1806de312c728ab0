"""Model sources against real files and a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from modelloader.resource import LoadedModel, LoadedModelSpec, Source
from modelloader.sources import ModelSources, SourceError, SourcePolicy

DATA = b"TFL3 pretend model bytes" * 100
DIGEST = hashlib.sha256(DATA).hexdigest()


def model(uri: str, sha256: str | None = None, base_dir: Path | None = None) -> LoadedModel:
    return LoadedModel(
        "default", "m", LoadedModelSpec("default", Source(uri, sha256)), base_dir=base_dir
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "m.tflite").write_bytes(DATA)
    (tmp_path / "secret.tflite").write_bytes(b"outside")
    return root


@pytest.fixture
def sources(tmp_path: Path, root: Path) -> ModelSources:
    return ModelSources(SourcePolicy(roots=(root,), cache_dir=tmp_path / "cache", max_bytes=4096))


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
        ("file:///proc/self/environ", "outside the allowed model roots"),
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


def test_digest_mismatch_and_size_limit(sources: ModelSources, root: Path) -> None:
    with pytest.raises(SourceError, match="sha256 is"):
        sources.fetch(model("file://sub/m.tflite", sha256="0" * 64, base_dir=root))
    (root / "big.tflite").write_bytes(b"x" * 5000)
    with pytest.raises(SourceError, match="larger than the limit"):
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
    # A second fetch with the digest comes from the cache, even if the server is gone.
    again = sources.fetch(model("http://127.0.0.1:9/gone.tflite", sha256=DIGEST))
    assert again.path == fetched.path


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
