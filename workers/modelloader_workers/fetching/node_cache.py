"""The node's model cache: `<dir>/sha256/<digest>.tflite`, shared by every worker on the node.

Files are written under a temporary name and renamed into place (a reader never sees half a
model), read-only once there. One fetch of a digest (or of a URI not yet known by digest) runs
at a time on the node: a second asks the same lock, then finds the file. A worker serving a
model holds a shared `flock` on its file (a lease: the kernel drops it when the process dies),
so eviction, which takes the file's lock exclusively without waiting, never removes a model in
use. Beyond the bound, models nobody uses go, least recently used (by modification time,
touched on every use) first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from modelloader_workers.fetching.request import FetchedModel, SourceError

CHUNK = 1 << 20
SUFFIX = ".tflite"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")

log = logging.getLogger(__name__)


class NodeCache:
    def __init__(self, root: Path, max_bytes: int = 0) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.models = root / "sha256"
        self._locks = root / "locks"
        self._versions = root / "versions"
        for folder in (self.models, self._locks, self._versions):
            folder.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _DIGEST.match(sha256):  # a name from outside must never leave the folder
            raise SourceError(f"{sha256!r} is not a sha256 digest")
        return self.models / f"{sha256}{SUFFIX}"

    def lookup(self, sha256: str) -> FetchedModel | None:
        path = self.path(sha256)
        try:
            size = path.stat().st_size
            os.utime(path)  # recently used
        except FileNotFoundError:
            return None
        return FetchedModel(path, sha256, size)

    def version_digest(self, uri: str, version: str) -> str | None:
        """The digest this source gave when last fetched at this version, if known: the only
        way to a cached copy (see `fetcher`)."""
        try:
            digest = self._version_path(uri, version).read_text().strip()
        except FileNotFoundError:
            return None
        return digest if _DIGEST.match(digest) else None

    def remember_version(self, uri: str, version: str, digest: str) -> None:
        path = self._version_path(uri, version)
        fd, tmp_name = tempfile.mkstemp(dir=self._versions, prefix=".incoming-")
        with os.fdopen(fd, "w") as out:
            out.write(digest)
        os.replace(tmp_name, path)

    def _version_path(self, uri: str, version: str) -> Path:
        return self._versions / hashlib.sha256(f"{uri}\0{version}".encode()).hexdigest()

    @contextlib.contextmanager
    def fetching(self, key: str) -> Iterator[None]:
        """One fetch of `key` (a digest, or a URI's hash) at a time on this node."""
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        fd = os.open(self._locks / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def store(
        self,
        read: Callable[[int], bytes],
        want: str | None,
        label: str,
        max_bytes: int,
        deadline: float | None = None,
        deadline_text: str = "",
        limit_text: str = "",
        expected: int | None = None,
    ) -> FetchedModel:
        """Copy a stream into the cache, checking size, deadline and digest as it goes, and
        that it did not end before the `expected` size its source announced (a connection
        closed early ends an http body without an error)."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.models, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in iter(lambda: read(CHUNK), b""):
                    size += len(chunk)
                    if size > max_bytes:
                        limit_text = limit_text or f"the limit of {max_bytes} bytes"
                        raise SourceError(f"{label}: the model is larger than {limit_text}")
                    if deadline is not None and time.monotonic() > deadline:
                        raise SourceError(f"{label}: the download took longer than {deadline_text}")
                    digest.update(chunk)
                    out.write(chunk)
            if expected is not None and size < expected:
                raise SourceError(f"{label}: the download ended after {size} of {expected} bytes")
            got = digest.hexdigest()
            if want is not None and got != want:
                raise SourceError(f"{label}: sha256 is {got}, but the manifest says {want}")
            final = self.path(got)
            os.chmod(tmp_name, 0o444)
            try:
                os.link(tmp_name, final)  # atomic, and never over an existing file
            except FileExistsError:
                # The same bytes are here already, perhaps held by a worker: keep that file
                # (replacing it would leave the holder on an unlinked copy nobody can evict).
                os.utime(final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        self.evict(keep=got)
        return FetchedModel(final, got, size, transferred=True)

    def evict(self, keep: str = "") -> list[str]:
        """Down to the bound, least recently used first, never a model a worker holds."""
        if self.max_bytes <= 0:
            return []
        entries = []
        for path in self.models.glob(f"*{SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                entries.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path.stem == keep or not _remove_unused(path):
                continue
            total -= size
            removed.append(path.stem)
        if total > self.max_bytes:
            log.warning(
                "model cache %s holds %d bytes, over its bound of %d: the rest is in use",
                self.root,
                total,
                self.max_bytes,
            )
        return removed


def _remove_unused(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False  # a worker holds it
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


class Lease:
    """A worker's hold on a cached model while it serves it (see the module's doc)."""

    def __init__(self, path: Path) -> None:
        self._fd: int | None = os.open(path, os.O_RDONLY)
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        if os.fstat(self._fd).st_nlink == 0:  # evicted just before the lock was had
            self.release()
            raise FileNotFoundError(path)
        os.utime(path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
