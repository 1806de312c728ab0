"""Model sources: where a LoadedModel's file comes from, fetched into a content-addressed cache.

`file://` paths must lie under an allowed root (symlinks resolved first, so a link cannot lead
out), and never in /dev, /proc or /sys, whatever the roots. `http(s)://` downloads have a socket
timeout, a deadline for the whole download and a size limit, and reach public addresses only:
each connection, including every redirect hop, checks the address it actually connects to, so a
name that resolves (or re-resolves) to loopback, link-local (cloud metadata), private or
unspecified addresses is refused unless `allow_hosts` names it. When the manifest gives a
sha256 the bytes must match it. Every model is copied into `<cache>/sha256/<digest>.tflite` and the
worker loads that copy: an immutable snapshot, so editing the original file later cannot change
a running model underneath it, and two manifests naming the same bytes share one file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import ipaddress
import os
import socket
import stat
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from modelloader.resource import LoadedModel

CHUNK = 1 << 20
MAX_REDIRECTS = 5
# Kernel and device trees: never a model, whatever the roots say (`--model-root /`).
FORBIDDEN_TREES = (Path("/dev"), Path("/proc"), Path("/sys"))


class SourceError(RuntimeError):
    """The model's file could not be had; the message says why and is shown in status."""


@dataclass(frozen=True)
class SourcePolicy:
    roots: tuple[Path, ...]  # file:// only below these (resolved)
    cache_dir: Path
    max_bytes: int = 1 << 30
    http_timeout_seconds: float = 30.0  # each connect and read
    download_deadline_seconds: float = 600.0  # the whole download: a slow drip ends too
    # Hosts (names as written in the URI), addresses or networks (CIDR) that http(s) sources
    # may reach although they are not public: e.g. an in-cluster model store, or 127.0.0.1 in
    # tests. Empty: public addresses only.
    allow_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class FetchedModel:
    path: Path  # the cached copy
    sha256: str
    size: int


class ModelSources:
    def __init__(self, policy: SourcePolicy) -> None:
        self.policy = dataclasses.replace(policy, roots=tuple(r.resolve() for r in policy.roots))
        self._guard = AddressGuard(policy.allow_hosts)
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
                return self._store(stream.read, want, uri)
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
        if any(resolved.is_relative_to(tree) for tree in FORBIDDEN_TREES):
            raise SourceError(
                f"{uri}: {resolved} is in /dev, /proc or /sys: a device or kernel file, "
                "not a regular file"
            )
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

    def _store(
        self,
        read: Callable[[int], bytes],
        want: str | None,
        uri: str,
        deadline: float | None = None,
    ) -> FetchedModel:
        digest = hashlib.sha256()
        size = 0
        target_dir = self.policy.cache_dir / "sha256"
        fd, tmp_name = tempfile.mkstemp(dir=target_dir, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in iter(lambda: read(CHUNK), b""):
                    size += len(chunk)
                    if size > self.policy.max_bytes:
                        raise SourceError(
                            f"{uri}: the model is larger than the limit of "
                            f"{self.policy.max_bytes} bytes"
                        )
                    if deadline is not None and time.monotonic() > deadline:
                        raise SourceError(
                            f"{uri}: the download took longer than "
                            f"{self.policy.download_deadline_seconds:g} s"
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
        self._guard.check_url(uri)
        request = urllib.request.Request(uri, headers={"User-Agent": "modelloader"})
        deadline = time.monotonic() + self.policy.download_deadline_seconds
        opener = _opener(self._guard)
        try:
            with opener.open(request, timeout=self.policy.http_timeout_seconds) as resp:
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > self.policy.max_bytes:
                    raise SourceError(
                        f"{uri}: the model is {length} bytes, over the limit of "
                        f"{self.policy.max_bytes} bytes"
                    )
                # read1: whatever has arrived, so a slow drip meets the deadline chunk by chunk
                return self._store(resp.read1, want, uri, deadline)
        except urllib.error.HTTPError as error:
            raise SourceError(f"{uri}: the server answered {error.code} {error.reason}") from None
        except BlockedAddress as error:
            raise SourceError(f"{uri}: {error}") from None
        except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, BlockedAddress):
                raise SourceError(f"{uri}: {reason}") from None
            raise SourceError(f"{uri}: download failed: {reason}") from None


class BlockedAddress(OSError):
    """An http(s) source that would reach a non-public address; the message says which."""


class AddressGuard:
    """Which addresses downloads may connect to: public unicast ones, and those allowed."""

    def __init__(self, allow_hosts: Sequence[str]) -> None:
        self._names = {h.lower().strip("[]") for h in allow_hosts}
        self._networks = []
        for entry in allow_hosts:
            with contextlib.suppress(ValueError):
                self._networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))

    def check_url(self, uri: str) -> None:
        """Refuse a URL without a host, or with credentials (they would be sent anywhere)."""
        parsed = urllib.parse.urlsplit(uri)
        if not parsed.hostname:
            raise SourceError(f"{uri}: the URL has no host")
        if parsed.username is not None or parsed.password is not None:
            raise SourceError(f"{uri}: credentials in the URL are not supported")

    def connect(
        self, host: str, port: int, timeout: float | None, source: Any = None
    ) -> socket.socket:
        """Resolve `host`, check every address, connect to a checked one: the address used is
        the address checked (a DNS answer that changes between check and use gains nothing)."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        allowed_name = host.lower().strip("[]") in self._names
        last: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            address = _unmapped(ipaddress.ip_address(sockaddr[0]))
            if not allowed_name and not self._public_or_allowed(address):
                raise BlockedAddress(
                    f"{host} resolves to {address}, which is not a public address "
                    "(loopback, link-local, private, multicast or unspecified); "
                    "allow it with --allow-source-host"
                )
            sock = socket.socket(family, kind, proto)
            try:
                if timeout is not None:
                    sock.settimeout(timeout)
                if source is not None:
                    sock.bind(source)
                sock.connect(sockaddr)
                return sock
            except OSError as error:
                sock.close()
                last = error
        raise last or OSError(f"{host}: no address to connect to")

    def _public_or_allowed(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if any(address in network for network in self._networks):
            return True
        return address.is_global and not address.is_multicast


def _unmapped(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    return address


def _opener(guard: AddressGuard) -> urllib.request.OpenerDirector:
    """http(s) only, no proxies from the environment (the guard must see the real peer), at most
    MAX_REDIRECTS redirects, each to http(s) and through the guard again."""

    def guarded(cls: type[http.client.HTTPConnection]) -> Any:
        def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
            connection = cls(host, **kwargs)
            connection._create_connection = (  # type: ignore[attr-defined]
                lambda address, timeout=None, source=None: guard.connect(
                    address[0], address[1], timeout, source
                )
            )
            return connection

        return make

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(guarded(http.client.HTTPConnection), req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(guarded(http.client.HTTPSConnection), req)

    class Redirects(urllib.request.HTTPRedirectHandler):
        max_redirections = MAX_REDIRECTS

        def redirect_request(
            self,
            req: urllib.request.Request,
            fp: Any,
            code: int,
            msg: str,
            headers: Any,
            newurl: str,
        ) -> urllib.request.Request | None:
            if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
                raise BlockedAddress(f"redirected to {newurl!r}: only http(s) is followed")
            guard.check_url(newurl)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler({}),
        urllib.request.UnknownHandler(),
        Http(),
        Https(),
        urllib.request.HTTPDefaultErrorHandler(),
        Redirects(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


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
