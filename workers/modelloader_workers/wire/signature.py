"""A model's input/output signature and the checks a request must pass against it.

Pure: used by the gateway to answer 400 before anything crosses to a worker, and by the worker
to describe what it loaded. Shapes use -1 for a dimension the model lets the caller choose.

A model served with batching (`max_batch_size` > 0) has a batch dimension first in every input
and output, shown as -1: a request sends k items (1 <= k <= max_batch_size, the same k in every
input), and the worker stacks the requests of a batch along it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # a v2 datatype name, e.g. "FP32"
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0  # > 0: batched; the first dimension is the batch's

    def batched(self, max_batch_size: int) -> Signature:
        """This signature with every tensor's first dimension the batch's (-1)."""
        return Signature(
            tuple(_batch_first(t) for t in self.inputs),
            tuple(_batch_first(t) for t in self.outputs),
            max_batch_size,
        )

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }
        if self.max_batch_size:
            out["max_batch_size"] = self.max_batch_size
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Signature:
        def specs(items: Sequence[Mapping[str, Any]]) -> tuple[TensorSpec, ...]:
            return tuple(
                TensorSpec(str(t["name"]), str(t["datatype"]), tuple(int(d) for d in t["shape"]))
                for t in items
            )

        return Signature(
            specs(data["inputs"]), specs(data["outputs"]), int(data.get("max_batch_size", 0))
        )


def _batch_first(spec: TensorSpec) -> TensorSpec:
    return TensorSpec(spec.name, spec.datatype, (-1, *spec.shape[1:]))


class InvalidRequest(ValueError):
    """The request does not fit the model: the message says which tensor and why (a 400)."""


def shape_fits(shape: Sequence[int], spec_shape: Sequence[int]) -> bool:
    return len(shape) == len(spec_shape) and all(
        want in (-1, got) for got, want in zip(shape, spec_shape, strict=True)
    )


def check_inputs(signature: Signature, given: Mapping[str, tuple[str, Sequence[int]]]) -> None:
    """Check names, datatypes and shapes of the request's inputs; `given` maps name ->
    (datatype, shape). Raises InvalidRequest naming the first problem found."""
    expected = {t.name for t in signature.inputs}
    unknown = sorted(set(given) - expected)
    if unknown:
        raise InvalidRequest(
            f"unexpected input {unknown[0]!r}; the model's inputs are {sorted(expected)}"
        )
    missing = [t.name for t in signature.inputs if t.name not in given]
    if missing:
        raise InvalidRequest(f"missing input {missing[0]!r}")
    for spec in signature.inputs:
        datatype, shape = given[spec.name]
        if datatype != spec.datatype:
            raise InvalidRequest(
                f"input {spec.name!r}: datatype {datatype} does not match the model's "
                f"{spec.datatype}"
            )
        if any(d < 0 for d in shape):
            raise InvalidRequest(f"input {spec.name!r}: shape {list(shape)} has a negative size")
        if not shape_fits(shape, spec.shape):
            raise InvalidRequest(
                f"input {spec.name!r}: shape {list(shape)} does not match the model's "
                f"{list(spec.shape)} (-1 means any size)"
            )
    if signature.max_batch_size:
        _check_batch(signature, given)


def _check_batch(signature: Signature, given: Mapping[str, tuple[str, Sequence[int]]]) -> None:
    sizes = {name: int(shape[0]) for name, (_, shape) in given.items() if len(shape)}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name!r} {size}" for name, size in sorted(sizes.items()))
        raise InvalidRequest(
            f"the inputs' first dimensions (the batch) differ: {listed}; each input holds the "
            "same number of items"
        )
    for name, size in sizes.items():
        if not 1 <= size <= signature.max_batch_size:
            raise InvalidRequest(
                f"input {name!r}: a batch of {size} items; the model takes 1 to "
                f"{signature.max_batch_size} per request (spec.batching.maxBatchSize)"
            )


def check_outputs(signature: Signature, requested: Sequence[str]) -> None:
    known = {t.name for t in signature.outputs}
    for name in requested:
        if name not in known:
            raise InvalidRequest(
                f"unknown output {name!r}; the model's outputs are {sorted(known)}"
            )
