"""Who a worker serves: the LoadedModel's key and the spec it loaded, carried to the worker
and back so that a restarted control plane can adopt what runs (as Ray Serve's `ReplicaID`
owns both directions of its name)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True, slots=True)
class ModelKey:
    """A LoadedModel's namespace and name; `namespace/name` in text."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @staticmethod
    def parse(text: str) -> ModelKey:
        namespace, slash, name = text.partition("/")
        if not slash or not namespace or not name:
            raise ValueError(f"{text!r} is not namespace/name")
        return ModelKey(namespace, name)


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    """One replica of one spec of a LoadedModel, as the control plane started it."""

    key: ModelKey
    origin: str
    fingerprint: str  # of the spec it loaded
    generation: int
    worker_id: str  # the control plane's name for this worker
    replica: int = 0  # which of the model's replicas
