"""What a fetch is asked for, under which rules, and what it found. Plain data: it crosses from
the control plane to the worker (pickled by Ray) and from the worker to its fetch process (JSON).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SourceError(RuntimeError):
    """The model's file could not be had; the message says why and is shown in status. It never
    carries a credential."""


@dataclass(frozen=True)
class SourcePolicy:
    """The admin's rules for sources, the same on every node."""

    roots: tuple[Path, ...]  # file:// only below these (resolved)
    cache_dir: Path  # on each node: the node's own cache
    max_bytes: int = 1 << 30
    http_timeout_seconds: float = 30.0  # each connect and read
    download_deadline_seconds: float = 600.0  # the whole download: a slow drip ends too
    # Hosts (names as written in the URI or endpoint), addresses or networks (CIDR) that
    # sources may reach although they are not public: an in-cluster model store, a private
    # S3 endpoint or registry, 127.0.0.1 in tests. Empty: public addresses only.
    allow_hosts: tuple[str, ...] = ()
    # Registries spoken to over plain HTTP (as `oras --plain-http`); all others over HTTPS.
    plain_http_registries: tuple[str, ...] = ()
    # The node cache's bound; models no worker uses are evicted, least recently used first.
    # 0: unbounded.
    cache_max_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["roots"] = [str(r) for r in self.roots]
        data["cache_dir"] = str(self.cache_dir)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SourcePolicy:
        fields = dict(data)
        fields["roots"] = tuple(Path(r) for r in fields["roots"])
        fields["cache_dir"] = Path(fields["cache_dir"])
        for name in ("allow_hosts", "plain_http_registries"):
            fields[name] = tuple(fields.get(name, ()))
        return cls(**fields)


@dataclass(frozen=True)
class SourceRequest:
    uri: str
    sha256: str | None = None  # the pin: the bytes must hash to it, wherever they come from
    base_dir: str | None = None  # a relative file:// URI is relative to the manifest's folder
    max_bytes: int | None = None  # the origin's maxModelBytes, below the policy's limit
    # The data of spec.source.credentialsSecret (key -> text). Never printed: repr=False.
    credentials: Mapping[str, str] = field(default_factory=dict, repr=False)

    def byte_limit(self, policy: SourcePolicy) -> int:
        if self.max_bytes is None:
            return policy.max_bytes
        return min(policy.max_bytes, self.max_bytes)

    def byte_limit_text(self, policy: SourcePolicy) -> str:
        limit = self.byte_limit(policy)
        if self.max_bytes is not None and self.max_bytes < policy.max_bytes:
            return f"the origin's maxModelBytes of {limit} bytes"
        return f"the limit of {limit} bytes"

    def to_json(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "sha256": self.sha256,
            "base_dir": self.base_dir,
            "max_bytes": self.max_bytes,
            "credentials": dict(self.credentials),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SourceRequest:
        return cls(
            data["uri"],
            data.get("sha256"),
            data.get("base_dir"),
            data.get("max_bytes"),
            dict(data.get("credentials") or {}),
        )


@dataclass(frozen=True)
class FetchedModel:
    path: Path  # the node cache's copy
    sha256: str
    size: int
    resolved: str = ""  # what a tag resolved to, e.g. oci://registry/repo@sha256:...
    transferred: bool = False  # the bytes came over the wire (False: found in the cache)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"path": str(self.path)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FetchedModel:
        return cls(**(dict(data) | {"path": Path(data["path"])}))
