"""Model sources: where a LoadedModel's file comes from, fetched into a content-addressed cache.

`file://` paths must lie under an allowed root (symlinks resolved first, so a link cannot lead
out); `http(s)://` downloads have a timeout and a size limit. When the manifest gives a sha256
the bytes must match it. Every model is copied into `<cache>/sha256/<digest>.tflite` and the
worker loads that copy: an immutable snapshot, so editing the original file later cannot change
a running model underneath it, and two manifests naming the same bytes share one file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from modelloader.resource import LoadedModel

CHUNK = 1 << 20


class SourceError(RuntimeError):
    """The model's file could not be had; the message says why and is shown in status."""


@dataclass(frozen=True)
class SourcePolicy:
    roots: tuple[Path, ...]  # file:// only below these (resolved)
    cache_dir: Path
    max_bytes: int = 1 << 30
    http_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class FetchedModel:
    path: Path  # the cached copy
    sha256: str
    size: int


class ModelSources:
    def __init__(self, policy: SourcePolicy) -> None:
        self.policy = SourcePolicy(
            roots=tuple(r.resolve() for r in policy.roots),
            cache_dir=policy.cache_dir,
            max_bytes=policy.max_bytes,
            http_timeout_seconds=policy.http_timeout_seconds,
        )
        (policy.cache_dir / "sha256").mkdir(parents=True, exist_ok=True)

    def fetch(self, model: LoadedModel) -> FetchedModel:
        """Blocking: call it from a thread."""
        uri = model.spec.source.uri
        want = model.spec.source.sha256
        if want is not None and (cached := self._cached(want)) is not None:
            return cached
        parsed = urllib.parse.urlsplit(uri)
        if parsed.scheme == "file":
            path = self.local_path(uri, model.base_dir)
            with _open_regular(path) as stream:
                return self._store(stream, want, uri)
        if parsed.scheme in ("http", "https"):
            return self._download(uri, want)
        raise SourceError(f"unsupported source {uri!r}: use file://, http:// or https://")

    def local_path(self, uri: str, base_dir: Path | None) -> Path:
        """The file a file:// URI names, if it lies under an allowed root. `file:///abs/path`
        is absolute; `file://model.tflite` or `file://./sub/model.tflite` is relative to the
        manifest's folder (so an example folder can be moved as a whole)."""
        rest = uri[len("file://") :]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        text = urllib.parse.unquote(rest)
        if "\x00" in text:
            raise SourceError(f"{uri}: the path contains a NUL byte")
        if text.startswith("/"):
            candidate = Path(text)
        elif base_dir is None:
            raise SourceError(f"{uri}: a relative path needs a manifest folder to start from")
        else:
            candidate = base_dir / text
        resolved = Path(os.path.realpath(candidate))
        if not any(resolved.is_relative_to(root) for root in self.policy.roots):
            roots = ", ".join(str(r) for r in self.policy.roots) or "none"
            raise SourceError(
                f"{uri}: {resolved} is outside the allowed model roots ({roots}); "
                "add its folder with --model-root"
            )
        return resolved

    def _cached(self, sha256: str) -> FetchedModel | None:
        path = self.policy.cache_dir / "sha256" / f"{sha256}.tflite"
        try:
            return FetchedModel(path, sha256, path.stat().st_size)
        except FileNotFoundError:
            return None

    def _store(self, stream: BinaryIO, want: str | None, uri: str) -> FetchedModel:
        digest = hashlib.sha256()
        size = 0
        target_dir = self.policy.cache_dir / "sha256"
        fd, tmp_name = tempfile.mkstemp(dir=target_dir, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in iter(lambda: stream.read(CHUNK), b""):
                    size += len(chunk)
                    if size > self.policy.max_bytes:
                        raise SourceError(
                            f"{uri}: the model is larger than the limit of "
                            f"{self.policy.max_bytes} bytes"
                        )
                    digest.update(chunk)
                    out.write(chunk)
            got = digest.hexdigest()
            if want is not None and got != want:
                raise SourceError(f"{uri}: sha256 is {got}, but the manifest says {want}")
            final = target_dir / f"{got}.tflite"
            os.chmod(tmp_name, 0o444)
            os.replace(tmp_name, final)
            return FetchedModel(final, got, size)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)

    def _download(self, uri: str, want: str | None) -> FetchedModel:
        request = urllib.request.Request(uri, headers={"User-Agent": "modelloader"})
        try:
            with urllib.request.urlopen(request, timeout=self.policy.http_timeout_seconds) as resp:
                length = resp.headers.get("Content-Length")
                if length is not None and int(length) > self.policy.max_bytes:
                    raise SourceError(
                        f"{uri}: the model is {length} bytes, over the limit of "
                        f"{self.policy.max_bytes} bytes"
                    )
                return self._store(resp, want, uri)
        except urllib.error.HTTPError as error:
            raise SourceError(f"{uri}: the server answered {error.code} {error.reason}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise SourceError(f"{uri}: download failed: {reason}") from None


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[BinaryIO]:
    """Open a regular file only: a device, FIFO or /proc entry is refused without blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SourceError(f"file://{path}: no such file") from None
    except OSError as error:
        raise SourceError(f"file://{path}: cannot open: {error.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SourceError(f"file://{path}: not a regular file")
    with os.fdopen(fd, "rb") as stream:
        yield stream


def default_roots(manifest_paths: Sequence[Path]) -> tuple[Path, ...]:
    """Without --model-root: the folders of the manifests given."""
    return tuple(sorted({(p if p.is_dir() else p.parent).resolve() for p in manifest_paths}))
