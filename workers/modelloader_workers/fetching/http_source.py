"""`http(s)://` sources, and the address guard every network source goes through.

Downloads have a socket timeout, a deadline for the whole download and a size limit, and reach
public addresses only: each connection, including every redirect hop, checks the address it
actually connects to, so a name that resolves (or re-resolves) to loopback, link-local (cloud
metadata), private or unspecified addresses is refused unless the admin's `allow_hosts` names
it. Object-store endpoints and registries are checked by the same rules (`check_endpoint`).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from modelloader_workers.fetching.located import Located, Reader
from modelloader_workers.fetching.request import SourceError, SourcePolicy

MAX_REDIRECTS = 5


class BlockedAddress(OSError):
    """A source that would reach a non-public address; the message says which."""


def locate(uri: str, policy: SourcePolicy) -> Located:
    """The answer's head is had here: a cached copy goes only to a URL that answers now."""
    guard = AddressGuard(policy.allow_hosts)
    guard.check_url(uri)
    stack = contextlib.ExitStack()
    response = stack.enter_context(guarded_get(uri, guard, policy.http_timeout_seconds))
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > policy.max_bytes:
        stack.close()
        raise SourceError(
            f"{uri}: the model is {length} bytes, over the limit of {policy.max_bytes} bytes"
        )

    @contextlib.contextmanager
    def download() -> Iterator[Reader]:
        try:
            # read1: whatever has arrived, so a slow drip meets the deadline chunk by chunk
            yield response.read1
        except (OSError, http.client.HTTPException) as error:
            raise SourceError(f"{uri}: download failed: {error}") from None

    # The URL alone: a pinned request may have what this URL once gave, nothing else.
    return Located(
        download,
        size=int(length) if length is not None and length.isdigit() else None,
        timed=True,
        version="url",
        strong_version=False,
        close=stack.close,
    )


@contextlib.contextmanager
def guarded_get(
    url: str,
    guard: AddressGuard,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    label: str = "",
) -> Iterator[http.client.HTTPResponse]:
    """GET through the guard; HTTP errors and network failures become a SourceError."""
    label = label or url
    request = urllib.request.Request(url, headers={"User-Agent": "modelloader", **(headers or {})})
    try:
        with opener(guard).open(request, timeout=timeout) as response:
            yield response
    except urllib.error.HTTPError as error:
        raise SourceError(f"{label}: the server answered {error.code} {error.reason}") from None
    except BlockedAddress as error:
        raise SourceError(f"{label}: {error}") from None
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, BlockedAddress):
            raise SourceError(f"{label}: {reason}") from None
        raise SourceError(f"{label}: download failed: {reason}") from None


class AddressGuard:
    """Which addresses sources may connect to: public unicast ones, and those allowed."""

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

    def addresses(self, host: str, port: int) -> list[Any]:
        """Resolve `host`; refuse it if any address is not public and not allowed."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise BlockedAddress(f"{host}: cannot resolve: {error.strerror}") from None
        if host.lower().strip("[]") in self._names:
            return infos
        for *_, sockaddr in infos:
            address = _unmapped(ipaddress.ip_address(sockaddr[0]))
            if not self._public_or_allowed(address):
                raise BlockedAddress(
                    f"{host} resolves to {address}, which is not a public address "
                    "(loopback, link-local, private, multicast or unspecified); "
                    "allow it with --allow-source-host"
                )
        return infos

    def connect(
        self, host: str, port: int, timeout: float | None, source: Any = None
    ) -> socket.socket:
        """Resolve `host`, check every address, connect to a checked one: the address used is
        the address checked (a DNS answer that changes between check and use gains nothing)."""
        last: OSError | None = None
        for family, kind, proto, _, sockaddr in self.addresses(host, port):
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


def check_endpoint(url: str, policy: SourcePolicy, label: str) -> None:
    """An object store's endpoint, reached by its own client: checked by the same rules before
    it is used (the client connects itself, so a name re-resolving later is the store's
    admin's concern; the address rules still keep tenants from naming private endpoints)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SourceError(f"{label}: endpoint {url!r} is not an http(s) URL")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        AddressGuard(policy.allow_hosts).addresses(parsed.hostname, port)
    except BlockedAddress as error:
        raise SourceError(f"{label}: endpoint {error}") from None


def _unmapped(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    return address


def opener(guard: AddressGuard) -> urllib.request.OpenerDirector:
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
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
            if (
                new is not None
                and urllib.parse.urlsplit(newurl).netloc
                != urllib.parse.urlsplit(req.full_url).netloc
            ):
                # A registry's blob redirect goes to storage: its token stays home.
                new.remove_header("Authorization")
            return new

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
