"""One fetch on this node: the source located first, always (a path under the roots, the
store's answer to these credentials), then the cache asked for what this very source gave at
this version before (a digest alone is no capability: another origin may know the digest of a
private model, so a cached copy goes only to a request whose source once delivered it), then
the bytes copied into the cache once, under the node's lock for that digest or URI."""

from __future__ import annotations

import dataclasses
import hashlib
import time
import urllib.parse

from modelloader_workers.fetching import file_source, http_source
from modelloader_workers.fetching.located import Located
from modelloader_workers.fetching.node_cache import NodeCache
from modelloader_workers.fetching.request import (
    FetchedModel,
    SourceError,
    SourcePolicy,
    SourceRequest,
)


def fetch(request: SourceRequest, policy: SourcePolicy) -> FetchedModel:
    cache = NodeCache(policy.cache_dir, policy.cache_max_bytes)
    limit = request.byte_limit(policy)
    located = locate(request, policy)
    try:
        if located.size is not None and located.size > limit:
            raise SourceError(
                f"{request.uri}: the model is {located.size} bytes, over "
                + request.byte_limit_text(policy)
            )
        if request.sha256 and located.digest and located.digest != request.sha256:
            raise SourceError(
                f"{request.uri}: sha256 is {located.digest}, but the manifest says {request.sha256}"
            )
        want = request.sha256 or located.digest
        key = want or "uri:" + hashlib.sha256(request.uri.encode()).hexdigest()
        with cache.fetching(key):
            # Only a digest this source gave before, at this version, is served from the cache: a
            # digest alone is no capability (another origin may know one of a private model).
            known = cache.version_digest(request.uri, located.version) if located.version else None
            reused = _reusable(known, want, located.strong_version)
            if reused is not None and (hit := cache.lookup(reused)) is not None:
                fetched = _within(hit, request, policy)
            else:
                deadline = (
                    time.monotonic() + policy.download_deadline_seconds if located.timed else None
                )
                with located.open() as read:
                    fetched = cache.store(
                        read,
                        want,
                        request.uri,
                        limit,
                        deadline,
                        f"{policy.download_deadline_seconds:g} s",
                        request.byte_limit_text(policy),
                        expected=located.size,
                    )
                if located.version:
                    cache.remember_version(request.uri, located.version, fetched.sha256)
    finally:
        located.close()
    return dataclasses.replace(fetched, resolved=located.resolved)


def locate(request: SourceRequest, policy: SourcePolicy) -> Located:
    """The source adapter for the URI's scheme (storage libraries imported only when used)."""
    uri = request.uri
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme == "file":
        return file_source.locate(uri, request.base_dir, policy)
    if scheme in ("http", "https"):
        return http_source.locate(uri, policy)
    if scheme == "s3":
        from modelloader_workers.fetching import s3_source

        return s3_source.locate(uri, request.credentials, policy)
    if scheme == "gs":
        from modelloader_workers.fetching import gcs_source

        return gcs_source.locate(uri, request.credentials, policy)
    if scheme == "oci":
        from modelloader_workers.fetching import oci_source

        return oci_source.locate(uri, request.credentials, policy)
    raise SourceError(
        f"unsupported source {uri!r}: use file://, http(s)://, s3://, gs:// or oci://"
    )


def _reusable(known: str | None, want: str | None, strong: bool) -> str | None:
    """The cached digest a fetch may use instead of the source's bytes: the one this source
    gave at this version, if it is what is wanted, or, with no digest wanted, if the version
    names its bytes for sure (a strong version); else None."""
    if known is not None and (known == want or (strong and want is None)):
        return known
    return None


def _within(hit: FetchedModel, request: SourceRequest, policy: SourcePolicy) -> FetchedModel:
    if hit.size > request.byte_limit(policy):
        raise SourceError(
            f"{request.uri}: the model is {hit.size} bytes, over {request.byte_limit_text(policy)}"
        )
    return hit
