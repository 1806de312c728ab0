"""What a source adapter reports before any model byte moves, and how to read the bytes."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

Reader = Callable[[int], bytes]
# Where the storage clients find the guarded way out (set in the fetch process only).
PROXY_ENV = "MODELLOADER_EGRESS_PROXY"


@dataclass(frozen=True)
class Located:
    open: Callable[[], AbstractContextManager[Reader]]
    size: int | None = None  # when the store says so: refused over the limit before reading
    digest: str | None = None  # sha256 the bytes have (an OCI layer's): a cached copy serves
    resolved: str = ""  # e.g. a tag resolved to its manifest digest
    timed: bool = False  # the download deadline applies while reading
    # The source's version as its store names it (endpoint, ETag or generation, size; a
    # registry's manifest digest; a file's inode and times): the same version seen again is
    # the digest it had, not another download. Empty: no way to know.
    version: str = ""
    # Whether the version says the bytes did not change (a validator). A weak one (an http
    # URL: the same URL may serve other bytes now) serves only a request pinned to the digest
    # the URL once gave.
    strong_version: bool = True
    # Ends what locating began (an answer not read, a file kept open): called in any case.
    close: Callable[[], None] = lambda: None
