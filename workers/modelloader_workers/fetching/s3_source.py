"""`s3://bucket/key` sources, through obstore (the Rust `object_store` crate: signing, retries
and timeouts maintained upstream; nothing of S3's protocol is written here).

Credentials (the LoadedModel's Secret, with the keys AWS's tools use): `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, optionally `AWS_SESSION_TOKEN`, `AWS_ENDPOINT_URL` (MinIO, Ceph, any
S3-compatible store: path-style requests) and `AWS_REGION` or `AWS_DEFAULT_REGION`. Without
keys the request is unsigned (a public bucket).
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

from modelloader_workers.fetching.http_source import check_endpoint
from modelloader_workers.fetching.located import PROXY_ENV, Located, Reader
from modelloader_workers.fetching.node_cache import CHUNK
from modelloader_workers.fetching.request import SourceError, SourcePolicy
from modelloader_workers.fetching.scrub import first_line, scrub

_REGION = re.compile(r"^[a-z0-9-]{1,32}$")


def locate(uri: str, credentials: Mapping[str, str], policy: SourcePolicy) -> Located:
    import obstore
    from obstore.store import S3Store

    parsed = urllib.parse.urlsplit(uri)
    bucket, key = parsed.netloc, urllib.parse.unquote(parsed.path.lstrip("/"))
    if not bucket or not key:
        raise SourceError(f"{uri}: expected s3://BUCKET/KEY")
    endpoint = credentials.get("AWS_ENDPOINT_URL", "").strip()
    region = (
        credentials.get("AWS_REGION") or credentials.get("AWS_DEFAULT_REGION") or "us-east-1"
    ).strip()
    timeout = policy.http_timeout_seconds
    options: dict[str, Any] = {
        "region": region,
        "client_options": {
            "timeout": f"{max(1, round(policy.download_deadline_seconds))}s",
            "connect_timeout": f"{max(1, round(timeout))}s",
            "allow_http": endpoint.startswith("http://"),
        },
        # A few quick retries, bounded in time: an unreachable endpoint ends within it.
        "retry_config": {
            "max_retries": 2,
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=2),
                "base": 2.0,
            },
            "retry_timeout": timedelta(seconds=timeout),
        },
    }
    if not _REGION.match(region):  # it becomes part of AWS's host name
        raise SourceError(f"{uri}: AWS_REGION {region[:40]!r} is not a region name")
    if proxy := os.environ.get(PROXY_ENV):  # in the fetch process: the guarded way out
        options["client_options"]["proxy_url"] = proxy
    if endpoint:
        check_endpoint(endpoint, policy, uri)
        options["endpoint"] = endpoint
        options["virtual_hosted_style_request"] = False
    key_id = credentials.get("AWS_ACCESS_KEY_ID", "").strip()
    if key_id:
        options["access_key_id"] = key_id
        options["secret_access_key"] = credentials.get("AWS_SECRET_ACCESS_KEY", "").strip()
        if token := credentials.get("AWS_SESSION_TOKEN", "").strip():
            options["token"] = token
    else:
        options["skip_signature"] = True
    try:
        store = S3Store(bucket, **options)
    except Exception as error:  # a setting obstore refuses (an endpoint it cannot parse)
        raise SourceError(f"{uri}: {_reason(error, bucket, key, credentials)}") from None
    try:
        # The head only: a cached copy needs no body; a failed head is asked again as a GET,
        # whose answer says which of bucket and key is missing.
        meta = obstore.head(store, key)
    except Exception:  # obstore's errors: one per HTTP outcome
        try:
            obstore.get(store, key)
        except Exception as error:
            raise SourceError(f"{uri}: {_reason(error, bucket, key, credentials)}") from None
        raise SourceError(f"{uri}: the store answered the object's head with an error") from None
    e_tag = meta.get("e_tag")

    @contextlib.contextmanager
    def read() -> Iterator[Reader]:
        try:
            # The version the head saw, or an error: the digest recorded is this version's.
            result = obstore.get(store, key, options={"if_match": e_tag} if e_tag else None)
        except Exception as error:
            raise SourceError(f"{uri}: {_reason(error, bucket, key, credentials)}") from None
        chunks = iter(result.stream(min_chunk_size=CHUNK))

        def next_chunk(_: int) -> bytes:
            try:
                return bytes(next(chunks))
            except StopIteration:
                return b""
            except Exception as error:
                raise SourceError(
                    f"{uri}: the download failed: {first_line(scrub(str(error), credentials))}"
                ) from None

        yield next_chunk

    # Without an ETag the store gives no version to trust: no cached copy by version.
    version = (
        f"{endpoint or 'aws'}|{region}|{e_tag}|{meta.get('version')}|{meta['size']}"
        if e_tag
        else ""
    )
    return Located(read, size=int(meta["size"]), timed=True, version=version)


def _reason(error: Exception, bucket: str, key: str, credentials: Mapping[str, str]) -> str:
    text = scrub(str(error), credentials)
    name = type(error).__name__
    if "NoSuchBucket" in text:
        return f"bucket {bucket!r} does not exist"
    if "NoSuchKey" in text or name in ("FileNotFoundError", "NotFoundError"):
        return f"no object {key!r} in bucket {bucket!r}"
    for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken"):
        if code in text:
            return (
                f"the store refused the credentials ({code}): check spec.source."
                "credentialsSecret's AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
    if name == "PreconditionError":
        return "the object changed while it was being fetched; try again"
    if name in ("PermissionDeniedError", "UnauthenticatedError"):
        return "the store refused the credentials: check spec.source.credentialsSecret"
    return f"cannot get the object: {first_line(text)}"
