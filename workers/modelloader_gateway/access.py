"""Who is calling, and may they call now: bearer tokens to origins, and each origin's request
rate and concurrency limits. Transport-independent; the HTTP layer only passes the header in.

The control plane publishes an `AccessTable` (token digests, never tokens: the gateway holds
nothing a leak could replay elsewhere). Tokens are compared in constant time against every
digest, and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from modelloader_gateway.errors import TooManyRequests, Unauthorized


@dataclass(frozen=True)
class OriginAccess:
    requests_per_second: float | None = None
    max_concurrent_requests: int | None = None
    expose_accelerator_details: bool = False


@dataclass(frozen=True)
class AccessTable:
    token_digests: Mapping[str, str] = field(default_factory=dict)  # sha256 hex -> origin
    anonymous_origin: str | None = None  # who a call without a token acts for; None: refused
    origins: Mapping[str, OriginAccess] = field(default_factory=dict)

    def of(self, origin: str) -> OriginAccess:
        return self.origins.get(origin, OriginAccess())


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_table(origin: str = "default") -> AccessTable:
    """Everyone acts for one origin: what `modelloader local` starts from."""
    return AccessTable(anonymous_origin=origin)


def authenticate(table: AccessTable, authorization: str | None) -> str:
    """The caller's origin from an `Authorization` header, or Unauthorized."""
    if not authorization:
        if table.anonymous_origin is None:
            raise Unauthorized("a bearer token is required: Authorization: Bearer <token>")
        return table.anonymous_origin
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    presented = token_digest(token)
    found: str | None = None
    # Every digest is compared, match or not: the time taken says nothing about the tokens.
    for digest, origin in table.token_digests.items():
        if hmac.compare_digest(digest, presented) and found is None:
            found = origin
    if found is None:
        raise Unauthorized("the bearer token is not valid")
    return found


class _Bucket:
    """A token bucket: `rate` requests a second, bursts of up to one second's worth."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.updated = now

    def take(self, now: float) -> float:
        """0 when a request may go now, else the seconds until one may."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate  # rate > 0: OriginLimiter refuses 0 first


class OriginLimiter:
    """Per-origin admission: one origin's flood is turned away at the door (429 with
    Retry-After) before it costs the gateway a body read or a worker a slot, so other
    origins keep their latency."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._in_flight: dict[str, int] = {}

    def enter(self, origin: str, access: OriginAccess) -> None:
        """Count a request in, or raise TooManyRequests; pair with `leave`."""
        limit = access.max_concurrent_requests
        in_flight = self._in_flight.get(origin, 0)
        if limit is not None and in_flight >= limit:
            raise TooManyRequests(
                f"origin {origin!r} has {in_flight} requests in flight, its limit "
                "(maxConcurrentRequests); retry when one finishes",
                retry_after=1.0,
            )
        rate = access.requests_per_second
        if rate is not None and rate <= 0:
            raise TooManyRequests(
                f"origin {origin!r} may send no requests (requestsPerSecond is 0)", retry_after=60.0
            )
        if rate is not None:
            now = self._clock()
            bucket = self._buckets.get(origin)
            if bucket is None or bucket.rate != rate:
                bucket = self._buckets[origin] = _Bucket(rate, now)
            wait = bucket.take(now)
            if wait > 0:
                raise TooManyRequests(
                    f"origin {origin!r} is over its rate of {rate:g} requests per second "
                    "(requestsPerSecond)",
                    retry_after=wait,
                )
        self._in_flight[origin] = in_flight + 1

    def leave(self, origin: str) -> None:
        left = self._in_flight.get(origin, 1) - 1
        if left > 0:
            self._in_flight[origin] = left
        else:
            self._in_flight.pop(origin, None)
