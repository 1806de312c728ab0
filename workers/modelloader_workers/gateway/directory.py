"""The one place that maps (origin, model name) to a served model.

The control plane publishes entries here (in-process for `modelloader local`); the data plane
only reads. Every lookup names the caller's origin, so a caller can never reach another origin's
model: for now every caller acts for one origin, later a bearer token decides which.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from modelloader_workers.signature import Signature


@dataclass(frozen=True)
class ModelEntry:
    origin: str
    name: str
    ready: bool
    message: str = ""
    signature: Signature | None = None
    address: str | None = None  # the worker's data-path socket while ready


class ModelDirectory:
    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], ModelEntry] = {}

    def publish(self, entries: Iterable[ModelEntry]) -> None:
        """Replace the whole directory at once: lookups never see half an update."""
        self._entries = {(e.origin, e.name): e for e in entries}

    def lookup(self, origin: str, name: str) -> ModelEntry | None:
        return self._entries.get((origin, name))

    def addresses(self) -> set[str]:
        return {e.address for e in self._entries.values() if e.address}
