"""`gs://bucket/object` sources, through Google's own client (google-cloud-storage).

Chosen over obstore for this scheme: obstore requires a Last-Modified header on every GCS
answer, which GCS emulators (gcp-storage-emulator, used by the tests) leave out; and over
gcsfs, which probes a gRPC endpoint for a minute before each first use of a bucket.

Credentials (the LoadedModel's Secret): a service-account JSON key under
`gcloud-application-credentials.json` (KServe's key name) or `key.json` (what
`gcloud iam service-accounts keys create` writes); optionally `GCS_ENDPOINT_URL` for an
emulator or a private endpoint. Without a key, requests are anonymous (a public bucket).
"""

from __future__ import annotations

import contextlib
import json
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

from modelloader_workers.fetching.http_source import check_endpoint
from modelloader_workers.fetching.located import Located, Reader
from modelloader_workers.fetching.node_cache import CHUNK
from modelloader_workers.fetching.request import SourceError, SourcePolicy
from modelloader_workers.fetching.scrub import first_line, scrub

KEY_NAMES = ("gcloud-application-credentials.json", "key.json")
TOKEN_URIS = ("https://oauth2.googleapis.com/token", "https://accounts.google.com/o/oauth2/token")
READ_ONLY = "https://www.googleapis.com/auth/devstorage.read_only"


def locate(uri: str, credentials: Mapping[str, str], policy: SourcePolicy) -> Located:
    from google.api_core import exceptions
    from google.api_core.retry import Retry
    from google.auth.credentials import AnonymousCredentials
    from google.auth.exceptions import RefreshError
    from google.cloud import storage
    from google.oauth2 import service_account

    parsed = urllib.parse.urlsplit(uri)
    bucket_name, name = parsed.netloc, urllib.parse.unquote(parsed.path.lstrip("/"))
    if not bucket_name or not name:
        raise SourceError(f"{uri}: expected gs://BUCKET/OBJECT")
    endpoint = credentials.get("GCS_ENDPOINT_URL", "").strip()
    if endpoint:
        check_endpoint(endpoint, policy, uri)
    key_text = next((credentials[k] for k in KEY_NAMES if credentials.get(k)), None)
    project = "modelloader"
    identity: Any
    if key_text is None:
        identity = AnonymousCredentials()  # type: ignore[no-untyped-call]
    else:
        try:
            info = json.loads(key_text)
            # google-auth posts the signed assertion to the key's token_uri: a tenant's key
            # must not point it at an address of the admin's network.
            token_uri = info.get("token_uri", TOKEN_URIS[0])
            if token_uri not in TOKEN_URIS:
                raise SourceError(
                    f"{uri}: the service-account key's token_uri {str(token_uri)[:80]!r} is not "
                    "Google's token endpoint"
                )
            identity = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                info, scopes=[READ_ONLY]
            )
            project = str(info.get("project_id") or project)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise SourceError(
                f"{uri}: spec.source.credentialsSecret does not hold a service-account JSON "
                f"key: {first_line(scrub(str(error), credentials))}"
            ) from None
    timeout = policy.http_timeout_seconds
    retry = Retry(timeout=timeout, initial=0.1, maximum=2.0)
    client = storage.Client(
        project=project,
        credentials=identity,
        client_options={"api_endpoint": endpoint} if endpoint else None,
    )
    bucket = client.bucket(bucket_name)
    try:
        blob = bucket.get_blob(name, timeout=timeout, retry=retry)
        if blob is None:
            if not bucket.exists(timeout=timeout, retry=retry):
                raise SourceError(f"{uri}: bucket {bucket_name!r} does not exist")
            raise SourceError(f"{uri}: no object {name!r} in bucket {bucket_name!r}")
    except (exceptions.Unauthorized, exceptions.Forbidden, RefreshError):
        # A refresh error's text may quote the token endpoint's answer: not shown.
        raise SourceError(
            f"{uri}: the store refused the credentials: check spec.source.credentialsSecret"
        ) from None
    except SourceError:
        raise
    except Exception as error:  # transport errors, a deadline, a refresh that failed
        raise SourceError(
            f"{uri}: cannot get the object: {first_line(scrub(str(error), credentials))}"
        ) from None

    @contextlib.contextmanager
    def read() -> Iterator[Reader]:
        try:
            with blob.open("rb", chunk_size=CHUNK, timeout=timeout, retry=retry) as stream:
                yield stream.read
        except SourceError:
            raise
        except Exception as error:
            raise SourceError(
                f"{uri}: the download failed: {first_line(scrub(str(error), credentials))}"
            ) from None

    # Without a generation the store gives no version to trust: no cached copy by version.
    version = f"{endpoint or 'google'}|{blob.generation}|{blob.size}" if blob.generation else ""
    return Located(read, size=int(blob.size or 0) or None, timed=True, version=version)
