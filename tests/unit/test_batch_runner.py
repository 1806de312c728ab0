"""A batch as one invoke, against a stand-in interpreter: inputs stacked in order, outputs
split back, and a request that breaks the invoke failing alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from modelloader_workers.batch_runner import BatchRunner
from modelloader_workers.wire.signature import Signature, TensorSpec


class Summer:
    """Rows of 3 floats in, each row's sum out; a NaN anywhere fails the invoke, as a
    model's runtime check would."""

    signature = Signature((TensorSpec("x", "FP32", (-1, 3)),), (TensorSpec("s", "FP32", (-1,)),))
    load_seconds = 0.0

    def __init__(self) -> None:
        self.x = np.zeros((1, 3), np.float32)
        self.invokes: list[int] = []

    def run(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        self.resize({"x": inputs["x"].shape})
        self.x[:] = inputs["x"]
        return self.invoke()

    def resize(self, shapes: Mapping[str, tuple[int, ...]], strict: bool = True) -> None:
        if self.x.shape != shapes["x"]:
            self.x = np.zeros(shapes["x"], np.float32)

    def input_buffers(self, names: Sequence[str]) -> list[memoryview]:
        return [memoryview(self.x.reshape(-1).view(np.uint8))]

    def invoke(self) -> dict[str, np.ndarray[Any, Any]]:
        self.invokes.append(self.x.shape[0])
        if np.isnan(self.x).any():
            raise RuntimeError("a NaN reached the graph")
        return {"s": self.x.sum(axis=1)}


def rows(*values: float) -> dict[str, np.ndarray[Any, Any]]:
    return {"x": np.array([[v, v, v] for v in values], np.float32)}


def test_a_batch_is_one_invoke_and_each_request_gets_its_rows() -> None:
    runner = Summer()
    results, _ = BatchRunner(runner).run([rows(1), rows(2, 3), rows(4)])
    assert runner.invokes == [4]
    assert [r["s"].tolist() for r in results if isinstance(r, dict)] == [[3], [6, 9], [12]]


def test_a_request_that_breaks_the_invoke_fails_alone() -> None:
    runner = Summer()
    results, _ = BatchRunner(runner).run([rows(1), rows(float("nan")), rows(2)])
    assert runner.invokes == [3, 1, 1, 1]  # the batch, then each alone
    assert isinstance(results[1], RuntimeError)
    assert [results[0]["s"].tolist(), results[2]["s"].tolist()] == [[3], [6]]  # type: ignore[index]
