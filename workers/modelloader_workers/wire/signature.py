"""A model's input/output signature and the checks a request must pass against it.

Pure: used by the gateway to answer 400 before anything crosses to a worker, and by the worker
to describe what it loaded. Shapes use -1 for a dimension the model lets the caller choose.
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

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Signature:
        def specs(items: Sequence[Mapping[str, Any]]) -> tuple[TensorSpec, ...]:
            return tuple(
                TensorSpec(str(t["name"]), str(t["datatype"]), tuple(int(d) for d in t["shape"]))
                for t in items
            )

        return Signature(specs(data["inputs"]), specs(data["outputs"]))


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


def check_outputs(signature: Signature, requested: Sequence[str]) -> None:
    known = {t.name for t in signature.outputs}
    for name in requested:
        if name not in known:
            raise InvalidRequest(
                f"unknown output {name!r}; the model's outputs are {sorted(known)}"
            )
