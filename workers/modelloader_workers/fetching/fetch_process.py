"""Fetching in a process of its own, started by the worker for each object-store source (s3, gs,
oci; the store is asked even when the node's cache holds the digest, see `fetcher`): a fresh
interpreter with a clean environment (no Ray token, nothing of the worker's) that takes the
request, credentials included, on stdin and answers on stdout. The storage libraries never load
into a process that parses models (the credentials only pass through the worker, of the same
origin, as the load's argument), every connection they make passes the address guard
(`egress_proxy`), and a fetch that hangs or crashes takes nothing else with it. `file://` and
`http(s)://` sources carry no credentials and need nothing but the standard library: they are
fetched in the worker, sparing an interpreter's start per model (bench/RESULTS.md).

`python -m modelloader_workers.fetching.fetch_process` is the child's side.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import urllib.parse
from typing import Any

from modelloader_workers.fetching.located import PROXY_ENV
from modelloader_workers.fetching.request import (
    FetchedModel,
    SourceError,
    SourcePolicy,
    SourceRequest,
)
from modelloader_workers.fetching.scrub import first_line, scrub

# Beyond the download's own deadline: the interpreter's start and the cache's lock.
GRACE_SECONDS = 60.0
# What the child keeps of the worker's environment: where programs and certificates are.
KEPT_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE", "HOME")


IN_PROCESS_SCHEMES = ("file", "http", "https")


def fetch_on_node(request: SourceRequest, policy: SourcePolicy) -> FetchedModel:
    """Fetched here (file, http(s)) or in a fetch process (object stores)."""
    scheme = urllib.parse.urlsplit(request.uri).scheme  # as fetcher.locate routes it
    if scheme in IN_PROCESS_SCHEMES and not request.credentials:
        from modelloader_workers.fetching.fetcher import fetch

        return fetch(request, policy)
    message = json.dumps({"request": request.to_json(), "policy": policy.to_json()})
    environment = {k: os.environ[k] for k in KEPT_ENVIRONMENT if k in os.environ}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "modelloader_workers.fetching.fetch_process"],
            input=message.encode(),
            capture_output=True,
            env=environment | {"PYTHONPATH": ":".join(p for p in sys.path if p)},
            timeout=policy.download_deadline_seconds + GRACE_SECONDS,
            close_fds=True,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SourceError(
            f"{request.uri}: the fetch did not end within "
            f"{policy.download_deadline_seconds + GRACE_SECONDS:g} s"
        ) from None
    try:
        answer: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        text = scrub(done.stderr.decode(errors="replace"), request.credentials)
        tail = text.strip().splitlines()[-1:] or ["no output"]
        raise SourceError(
            f"{request.uri}: the fetch process failed (exit {done.returncode}): {tail[0][:300]}"
        ) from None
    if "error" in answer:
        raise SourceError(str(answer["error"]))
    return FetchedModel.from_json(answer["fetched"])


def main() -> int:
    from modelloader_workers.fetching.egress_proxy import EgressProxy
    from modelloader_workers.fetching.fetcher import fetch
    from modelloader_workers.fetching.http_source import AddressGuard

    # A worker may run under an address-space limit for its models; the fetch is not theirs.
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    message = json.loads(sys.stdin.buffer.read())
    request = SourceRequest.from_json(message["request"])
    policy = SourcePolicy.from_json(message["policy"])
    # Every connection the storage clients make goes through the guard (egress_proxy).
    proxy = EgressProxy(AddressGuard(policy.allow_hosts), policy.http_timeout_seconds)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", PROXY_ENV):
        os.environ[name] = proxy.url
    for name in ("NO_PROXY", "no_proxy"):
        os.environ.pop(name, None)
    try:
        fetched = fetch(request, policy)
    except SourceError as error:
        text = str(error)
        if proxy.refused:  # the clients' own message would hide why
            text = f"{request.uri}: {proxy.refused[0]}"
        elif proxy.unreachable:
            text = f"{request.uri}: cannot reach the store: {proxy.unreachable[0]}"
        answer: dict[str, Any] = {"error": text}
    except Exception as error:  # a library's surprise: still a message, never a traceback
        text = first_line(scrub(str(error), request.credentials))
        answer = {"error": f"{request.uri}: the fetch failed: {type(error).__name__}: {text}"}
    else:
        answer = {"fetched": fetched.to_json()}
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
