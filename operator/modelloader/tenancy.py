"""What the gateway needs to know about origins, derived from OriginPolicies and token Secrets.
Pure: the operator reads Secrets from the API server, `modelloader local` from files.

A token Secret is labelled `modelloader.dev/origin: <origin>`, lives in a namespace bound to
that origin, and holds the token under the key `token`. A Secret in a namespace that may not
speak for its origin grants nothing (and is reported), so a tenant cannot mint tokens for
someone else's origin by labelling a Secret of its own.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from modelloader_gateway.access import AccessTable, OriginAccess, token_digest

from modelloader import API_GROUP
from modelloader.policy import Policies

ORIGIN_LABEL = f"{API_GROUP}/origin"
TOKEN_KEY = "token"


@dataclass(frozen=True)
class TokenSecret:
    namespace: str
    name: str
    origin: str
    digest: str  # sha256 of the token: the token itself is not kept


@dataclass(frozen=True)
class SecretProblem:
    namespace: str
    name: str
    message: str


def is_token_secret(doc: Any) -> bool:
    if not isinstance(doc, Mapping) or doc.get("kind") != "Secret":
        return False
    labels = (doc.get("metadata") or {}).get("labels") or {}
    return isinstance(labels, Mapping) and ORIGIN_LABEL in labels


def parse_token_secret(
    doc: Mapping[str, Any], default_namespace: str = "default"
) -> TokenSecret | SecretProblem:
    meta = doc.get("metadata") or {}
    namespace = str(meta.get("namespace") or default_namespace)
    name = str(meta.get("name") or "?")
    origin = str((meta.get("labels") or {}).get(ORIGIN_LABEL) or "")
    token: str | None = None
    string_data = doc.get("stringData") or {}
    data = doc.get("data") or {}
    if isinstance(string_data, Mapping) and isinstance(string_data.get(TOKEN_KEY), str):
        token = string_data[TOKEN_KEY]
    elif isinstance(data, Mapping) and isinstance(data.get(TOKEN_KEY), str):
        try:
            token = base64.b64decode(data[TOKEN_KEY], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return SecretProblem(namespace, name, f"data.{TOKEN_KEY} is not base64 text")
    if not origin:
        return SecretProblem(namespace, name, f"label {ORIGIN_LABEL} is empty")
    if not token or len(token.strip()) < 16:
        return SecretProblem(
            namespace, name, f"key {TOKEN_KEY!r} must hold a token of at least 16 characters"
        )
    return TokenSecret(namespace, name, origin, token_digest(token.strip()))


def access_table(
    policies: Policies,
    secrets: Iterable[TokenSecret],
    anonymous_default: str | None = None,
) -> tuple[AccessTable, list[SecretProblem]]:
    """Tokens of Secrets whose namespace speaks for their origin; the origin anonymous calls
    act for (a policy with allowAnonymous, else `anonymous_default`); each origin's limits."""
    problems: list[SecretProblem] = []
    digests: dict[str, str] = {}
    for secret in secrets:
        if not policies.binds(secret.origin, secret.namespace):
            problems.append(
                SecretProblem(
                    secret.namespace,
                    secret.name,
                    f"namespace {secret.namespace!r} may not issue tokens for origin "
                    f"{secret.origin!r}; the token is ignored",
                )
            )
            continue
        owner = digests.setdefault(secret.digest, secret.origin)
        if owner != secret.origin:  # one token, two origins: neither may use it
            problems.append(
                SecretProblem(secret.namespace, secret.name, "the same token serves two origins")
            )
            digests[secret.digest] = ""
    anonymous = sorted(o for o, p in policies.by_origin.items() if p.allow_anonymous)
    if anonymous:
        anonymous_origin: str | None = anonymous[0]
    elif anonymous_default is not None and policies.of(anonymous_default).allow_anonymous:
        anonymous_origin = anonymous_default
    else:
        anonymous_origin = None
    origins = {
        origin: _access(policies, origin)
        for origin in {*policies.by_origin, *digests.values(), *(anonymous[:1])}
        if origin
    }
    if anonymous_origin is not None:
        origins[anonymous_origin] = _access(policies, anonymous_origin)
    table = AccessTable(
        token_digests={d: o for d, o in digests.items() if o},
        anonymous_origin=anonymous_origin,
        origins=origins,
    )
    return table, problems


def _access(policies: Policies, origin: str) -> OriginAccess:
    policy = policies.of(origin)
    return OriginAccess(
        requests_per_second=policy.quota.requests_per_second,
        max_concurrent_requests=policy.quota.max_concurrent_requests,
        expose_accelerator_details=policy.expose_accelerator_details,
    )
