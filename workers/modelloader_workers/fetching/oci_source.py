"""`oci://registry/repository:tag` and `oci://registry/repository@sha256:...` sources: a model
pushed to a registry as an OCI artifact (e.g. `oras push reg/repo:v1 model.tflite`).

Written on the OCI distribution API's pull side (a manifest GET, a token when the registry
asks for one, a blob GET) over the same guarded HTTP opener as http(s) sources, so every hop,
a blob's redirect to storage included, passes the address rules, with our timeouts. ORAS's
Python client was the alternative: it sets no request timeout, retries a failing request five
times over about two minutes, and reads the node's own Docker config; it pushes the tests'
models.

The model is the manifest's layer whose media type says tflite, else the layer titled
`*.tflite` (`org.opencontainers.image.title`, which ORAS sets from the file name), else the
only layer. Credentials: the LoadedModel's Secret of type `kubernetes.io/dockerconfigjson`
(`.dockerconfigjson`: `auths.<registry>.auth`, or `.username` and `.password`).
Registries named by the admin's `--plain-http-registry` are spoken to over HTTP.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

from modelloader_workers.fetching.http_source import (
    AddressGuard,
    BlockedAddress,
    guarded_get,
    opener,
)
from modelloader_workers.fetching.located import Located, Reader
from modelloader_workers.fetching.request import SourceError, SourcePolicy
from modelloader_workers.fetching.scrub import first_line

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
TITLE = "org.opencontainers.image.title"
MAX_MANIFEST_BYTES = 4 << 20
_LAYER_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_REFERENCE = re.compile(
    r"^(?P<host>[^/]+)/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


def locate(uri: str, credentials: Mapping[str, str], policy: SourcePolicy) -> Located:
    match = _REFERENCE.match(uri[len("oci://") :])
    if match is None:
        raise SourceError(
            f"{uri}: expected oci://REGISTRY/REPOSITORY:TAG or oci://REGISTRY/REPOSITORY@sha256:..."
        )
    host, repo = match["host"], match["repo"]
    reference = match["digest"] or match["tag"] or "latest"
    scheme = "http" if host in policy.plain_http_registries else "https"
    session = _Session(uri, host, scheme, _login(uri, host, credentials), policy)
    body, content_type = session.manifest(repo, reference)
    manifest_digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if match["digest"] and manifest_digest != match["digest"]:
        raise SourceError(
            f"{uri}: the registry's manifest is {manifest_digest}, not the digest asked for"
        )
    try:
        manifest = json.loads(body)
    except ValueError:
        raise SourceError(f"{uri}: the manifest is not JSON") from None
    media_type = manifest.get("mediaType") or content_type
    if media_type in INDEX_TYPES or "manifests" in manifest:
        raise SourceError(
            f"{uri}: an image index, not a model artifact: name one of its manifests by digest"
        )
    layer = _model_layer(uri, manifest.get("layers") or [])
    digest = str(layer.get("digest", ""))
    if not _LAYER_DIGEST.match(digest):
        raise SourceError(f"{uri}: the model layer's digest {digest[:80]!r} is not a sha256")
    size = layer.get("size")

    @contextlib.contextmanager
    def read() -> Iterator[Reader]:
        with session.blob(repo, digest) as response:
            yield response.read1

    return Located(
        read,
        size=int(size) if isinstance(size, int) else None,
        digest=digest.removeprefix("sha256:"),
        resolved=f"oci://{host}/{repo}@{manifest_digest}",
        timed=True,
        # This registry's manifest, fetched with these credentials, names this layer: the
        # node may serve its cached copy of a layer it fetched from here before.
        version=f"{scheme}|{manifest_digest}|{digest}",
    )


def _model_layer(uri: str, layers: list[Any]) -> Mapping[str, Any]:
    layers = [layer for layer in layers if isinstance(layer, Mapping)]
    by_type = [layer for layer in layers if "tflite" in str(layer.get("mediaType", "")).lower()]
    by_title = [
        layer
        for layer in layers
        if str((layer.get("annotations") or {}).get(TITLE, "")).endswith(".tflite")
    ]
    for found in (by_type, by_title, layers if len(layers) == 1 else []):
        if found:
            chosen: Mapping[str, Any] = found[0]
            return chosen
    raise SourceError(
        f"{uri}: the manifest has no model layer (one whose media type names tflite, or "
        f"titled *.tflite, or a single layer); it has {len(layers)} layers"
    )


def _login(uri: str, host: str, credentials: Mapping[str, str]) -> tuple[str, str] | None:
    text = credentials.get(".dockerconfigjson")
    if not text:
        return None
    try:
        auths = json.loads(text).get("auths") or {}
        entry = next(
            (auths[k] for k in (host, f"https://{host}", f"http://{host}") if k in auths), None
        )
        if entry is None:
            return None
        if entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return user, password
        return str(entry["username"]), str(entry["password"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SourceError(
            f"{uri}: spec.source.credentialsSecret's .dockerconfigjson is not a Docker config "
            "with auths.<registry>.auth or .username and .password"
        ) from None


class _Session:
    """Requests to one registry, with the token it hands out when it asks for one."""

    def __init__(
        self,
        uri: str,
        host: str,
        scheme: str,
        login: tuple[str, str] | None,
        policy: SourcePolicy,
    ) -> None:
        self._uri = uri
        self._base = f"{scheme}://{host}"
        self._login = login
        self._timeout = policy.http_timeout_seconds
        self._guard = AddressGuard(policy.allow_hosts)
        self._opener = opener(self._guard)  # once: every request goes through the guard
        self._authorization: str | None = None

    def manifest(self, repo: str, reference: str) -> tuple[bytes, str]:
        url = f"{self._base}/v2/{repo}/manifests/{reference}"
        accept = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
        what = (
            f"manifest {reference}"
            if reference.startswith("sha256:")
            else f"tag {reference!r} in repository {repo!r}"
        )
        with self._get(url, {"Accept": accept}, what=what) as response:
            body = response.read(MAX_MANIFEST_BYTES + 1)
            if len(body) > MAX_MANIFEST_BYTES:
                raise SourceError(f"{self._uri}: the manifest is over {MAX_MANIFEST_BYTES} bytes")
            return body, response.headers.get("Content-Type", "")

    def blob(self, repo: str, digest: str) -> contextlib.AbstractContextManager[Any]:
        return self._get(f"{self._base}/v2/{repo}/blobs/{digest}", {}, what=f"blob {digest}")

    @contextlib.contextmanager
    def _get(self, url: str, headers: dict[str, str], what: str) -> Iterator[Any]:
        for attempt in range(2):
            sent = dict(headers)
            if self._authorization:
                sent["Authorization"] = self._authorization
            request = urllib.request.Request(url, headers={"User-Agent": "modelloader", **sent})
            try:
                response = self._opener.open(request, timeout=self._timeout)
            except urllib.error.HTTPError as error:
                challenge = error.headers.get("WWW-Authenticate", "")
                error.close()
                if error.code == 401 and attempt == 0 and challenge:
                    self._authorization = self._answer(challenge)
                    continue
                raise SourceError(self._http_error(error.code, what)) from None
            except (urllib.error.URLError, OSError) as error:
                reason = getattr(error, "reason", error)
                if isinstance(reason, BlockedAddress):
                    raise SourceError(f"{self._uri}: {reason}") from None
                raise SourceError(
                    f"{self._uri}: cannot reach the registry: {first_line(str(reason))}"
                ) from None
            with response:
                yield response
            return

    def _answer(self, challenge: str) -> str:
        """The Authorization for a 401's challenge: Basic, or a Bearer token from its realm."""
        kind, _, rest = challenge.partition(" ")
        if kind.lower() == "basic":
            if self._login is None:
                raise SourceError(self._http_error(401, "the registry"))
            return "Basic " + base64.b64encode(":".join(self._login).encode()).decode()
        params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        realm = params.pop("realm", "")
        if kind.lower() != "bearer" or not realm:
            raise SourceError(f"{self._uri}: the registry asks for {kind!r} authentication")
        token_url = realm + "?" + urllib.parse.urlencode(params)
        headers = {}
        if self._login is not None:
            basic = base64.b64encode(":".join(self._login).encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        with guarded_get(
            token_url, self._guard, self._timeout, headers, label=f"{self._uri}: token"
        ) as response:
            try:
                answer = json.loads(response.read(1 << 20))
            except ValueError:
                raise SourceError(f"{self._uri}: the registry's token is not JSON") from None
        token = answer.get("token") or answer.get("access_token")
        if not token:
            raise SourceError(f"{self._uri}: the registry gave no token")
        return f"Bearer {token}"

    def _http_error(self, code: int, what: str) -> str:
        if code in (401, 403):
            hint = (
                "check spec.source.credentialsSecret"
                if self._login
                else "set spec.source.credentialsSecret to a dockerconfigjson Secret"
            )
            return f"{self._uri}: the registry refused access ({code}): {hint}"
        if code == 404:
            return f"{self._uri}: the registry has no {what}"
        return f"{self._uri}: the registry answered {code} for the {what}"
