"""Model sources, the control plane's side: what a worker's node is to fetch.

The node that runs a model fetches it (`modelloader_workers.fetching`), into its own cache:
no volume shared between the operator and the Ray pods. Here the LoadedModel's source becomes
a `SourceRequest`: the URI, the sha256 pin, the manifest's folder (for relative `file://`
URIs), the origin's maxModelBytes, and the data of `spec.source.credentialsSecret`, read
from the LoadedModel's own namespace only (by the operator from the API server, by
`modelloader local` from its manifest files) and handed to that model's worker alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

from modelloader_workers.fetching import SourceError, SourcePolicy, SourceRequest

from modelloader.resource import LoadedModel

__all__ = ["CredentialLookup", "ModelSources", "SourceError", "SourcePolicy", "default_roots"]

# (namespace, Secret name) -> the Secret's data as text, or None when there is no such Secret.
CredentialLookup = Callable[[str, str], Awaitable[Mapping[str, str] | None]]


async def no_credentials(_namespace: str, _name: str) -> Mapping[str, str] | None:
    return None


class ModelSources:
    def __init__(self, lookup: CredentialLookup = no_credentials) -> None:
        self._lookup = lookup

    async def request(self, model: LoadedModel, max_bytes: int | None) -> SourceRequest:
        source = model.spec.source
        credentials: Mapping[str, str] = {}
        if source.credentials_secret:
            namespace = model.key.namespace
            found = await self._lookup(namespace, source.credentials_secret)
            if found is None:
                raise SourceError(
                    f"spec.source.credentialsSecret: there is no Secret "
                    f"{source.credentials_secret!r} in namespace {namespace!r}"
                )
            credentials = found
        return SourceRequest(
            source.uri,
            source.sha256,
            str(model.base_dir) if model.base_dir is not None else None,
            max_bytes,
            dict(credentials),
        )


def default_roots(manifest_paths: Sequence[Path]) -> tuple[Path, ...]:
    """Without --model-root: the folders of the manifests given."""
    return tuple(sorted({(p if p.is_dir() else p.parent).resolve() for p in manifest_paths}))
