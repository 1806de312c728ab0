"""What a load is asked and how it fails, apart from LiteRT: the worker (the supervisor) and
the control plane name them without importing numpy or LiteRT (an import that cost every
supervisor about 0.1 s of CPU, bench/RESULTS.md)."""

from __future__ import annotations

from dataclasses import dataclass


class ModelLoadError(RuntimeError):
    """The file could not be made into a runnable model; the message says why."""


class AcceleratorUnavailable(ModelLoadError):
    """The accelerator (or its delegate library) cannot be used on this node at all: with
    `delegation: partitioned` the model may run on the CPU instead."""


@dataclass(frozen=True)
class ExternalDelegate:
    """A TFLite delegate library loaded by path (Edge TPU, a vendor NPU), with its options."""

    path: str
    options: tuple[tuple[str, str], ...] = ()
