"""A batch of requests as one invoke: their inputs stacked along the first dimension, the
outputs split back by each request's items. And the check, at load, that a model can do that.

The interpreter's inputs are resized to the batch (`strict=False`: a model converted with a
fixed batch of 1 still takes more when its graph allows it) and each request's tensors are
copied into them at their offset. If a batch fails, its requests run again one by one, so a
request that breaks the interpreter fails alone.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from modelloader_workers.litert_runner import InPlaceRunner, ModelLoadError, Runner
from modelloader_workers.wire.tensor_types import numpy_dtype

Arrays = dict[str, np.ndarray[Any, Any]]


class BatchRunner:
    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        self._in_place = runner if isinstance(runner, InPlaceRunner) else None

    def run(
        self, requests: Sequence[Mapping[str, np.ndarray[Any, Any]]]
    ) -> tuple[list[Arrays | Exception], float]:
        """Each request's outputs (or the error it met), and the seconds spent invoking."""
        started = time.perf_counter()
        try:
            stacked, invoked = self._invoke(requests)
        except Exception as error:
            if len(requests) == 1:
                return [error], time.perf_counter() - started
            return self._one_by_one(requests)
        out: list[Arrays | Exception] = []
        start = 0
        for request in requests:
            items = _items(request)
            out.append({name: array[start : start + items] for name, array in stacked.items()})
            start += items
        return out, invoked

    def _one_by_one(
        self, requests: Sequence[Mapping[str, np.ndarray[Any, Any]]]
    ) -> tuple[list[Arrays | Exception], float]:
        out: list[Arrays | Exception] = []
        total = 0.0
        for request in requests:
            try:
                outputs, invoked = self._invoke([request])
            except Exception as error:
                out.append(error)
            else:
                out.append(outputs)
                total += invoked
        return out, total

    def _invoke(
        self, requests: Sequence[Mapping[str, np.ndarray[Any, Any]]]
    ) -> tuple[Arrays, float]:
        names = list(requests[0])
        runner = self._in_place
        if runner is None:  # a CompiledModel: it takes whole arrays
            inputs = {n: np.concatenate([r[n] for r in requests]) for n in names}
            started = time.perf_counter()
            outputs = self._runner.run(inputs)
            return outputs, time.perf_counter() - started
        items = sum(_items(r) for r in requests)
        runner.resize({n: (items, *requests[0][n].shape[1:]) for n in names}, strict=False)
        _fill(runner, names, requests)
        started = time.perf_counter()
        outputs = runner.invoke()
        return outputs, time.perf_counter() - started


def _fill(
    runner: InPlaceRunner, names: list[str], requests: Sequence[Mapping[str, np.ndarray[Any, Any]]]
) -> None:
    """Each request's tensors into the interpreter's inputs, back to back. A function of its
    own so that its views of the interpreter's memory are gone when it returns: LiteRT
    refuses to invoke while any is alive."""
    for name, buffer in zip(names, runner.input_buffers(names), strict=True):
        offset = 0
        for request in requests:
            array: Any = np.ascontiguousarray(request[name]).reshape(-1)
            data = memoryview(array).cast("B")
            buffer[offset : offset + data.nbytes] = data
            offset += data.nbytes


def _items(request: Mapping[str, np.ndarray[Any, Any]]) -> int:
    return int(next(iter(request.values())).shape[0])


def check_batchable(runner: Runner, max_batch_size: int) -> None:
    """Raise ModelLoadError, saying why, unless every input and output has a batch dimension
    first (of 1, or dynamic) and a batch of two gives each item what a batch of one gives.
    Then run one full batch: the interpreter's memory grows to what `max_batch_size` needs
    now, at load, and not while serving, where each growth costs more than an invoke and a
    batch within the size it had costs next to nothing (bench/RESULTS.md, "Batching")."""
    signature = runner.signature
    for kind, specs in (("input", signature.inputs), ("output", signature.outputs)):
        for spec in specs:
            if not spec.shape or spec.shape[0] not in (1, -1):
                raise ModelLoadError(
                    f"spec.batching needs a batch dimension first in every input and output: "
                    f"{kind} {spec.name!r} has shape {list(spec.shape)}; serve this model "
                    "without spec.batching"
                )
    batcher = BatchRunner(runner)
    one: dict[str, np.ndarray[Any, Any]] = {}
    for spec in signature.inputs:
        shape = tuple(max(1, d) for d in spec.shape)
        one[spec.name] = np.zeros(shape, numpy_dtype(spec.datatype))
    two = {name: np.concatenate([array, array]) for name, array in one.items()}
    # BatchRunner.run hands a failure back as the request's result, never raises.
    (alone,), _ = batcher.run([one])
    (pair,), _ = batcher.run([two])
    if isinstance(alone, Exception) or isinstance(pair, Exception):
        failure = alone if isinstance(alone, Exception) else pair
        raise ModelLoadError(f"spec.batching: the model fails on a batch of two: {failure}")
    for name, first in alone.items():
        second = pair[name]
        if second.shape[:1] != (2,) or not np.allclose(
            second, np.concatenate([first, first]), rtol=1e-4, atol=1e-5, equal_nan=True
        ):
            raise ModelLoadError(
                f"spec.batching: the model does not batch its first dimension: output "
                f"{name!r} is {list(first.shape)} for one item and {list(second.shape)} for "
                "two, or differs between them; serve this model without spec.batching"
            )
    if max_batch_size > 2:
        full = {n: np.concatenate([a] * max_batch_size) for n, a in one.items()}
        (result,), _ = batcher.run([full])
        if isinstance(result, Exception):
            raise ModelLoadError(
                f"spec.batching: the model fails on a batch of maxBatchSize "
                f"({max_batch_size}): {result}"
            )
    batcher.run([one])  # back to one item: what a quiet model runs
