"""The one place that maps (origin, model name) to a served model.

The control plane publishes entries here (in-process for `modelloader local`); the data plane
only reads. Every lookup names the caller's origin, so a caller can never reach another origin's
model: the caller's bearer token decides which origin it acts for (`access`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from modelloader_workers.signature import Signature


@dataclass(frozen=True)
class ModelEntry:
    origin: str
    name: str
    ready: bool
    message: str = ""
    signature: Signature | None = None
    address: str | None = None  # the worker's data-path socket while ready
    accelerator: str = "cpu"  # what runs it (cpu, gpu, npu): labels its busy time in metrics
    # Where it runs (node, accelerator, delegate): shown only to origins whose policy says so.
    placement: Mapping[str, Any] | None = None


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
