"""The one adapter to LiteRT: load a .tflite file, describe it, run it.

CPU inference goes through the classic `Interpreter`, which applies XNNPACK by default and takes
an explicit thread count: faster here than `CompiledModel` (bench/RESULTS.md, "What changed,
and what each change bought"), which the CPU uses only for fp16.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from modelloader_workers.loading import AcceleratorUnavailable as AcceleratorUnavailable
from modelloader_workers.loading import ExternalDelegate as ExternalDelegate
from modelloader_workers.loading import ModelLoadError as ModelLoadError
from modelloader_workers.wire.signature import Signature, TensorSpec
from modelloader_workers.wire.tensor_types import UnsupportedDatatype, v2_datatype


class Runner(Protocol):
    """What the worker needs of a loaded model, whichever LiteRT API runs it."""

    signature: Signature
    load_seconds: float

    def run(
        self, inputs: Mapping[str, np.ndarray[Any, Any]]
    ) -> dict[str, np.ndarray[Any, Any]]: ...


@runtime_checkable
class InPlaceRunner(Runner, Protocol):
    """A runner whose input buffers the worker may fill itself (`LiteRTRunner`)."""

    def resize(self, shapes: Mapping[str, tuple[int, ...]], strict: bool = True) -> None: ...

    def input_buffers(self, names: Sequence[str]) -> list[memoryview]: ...

    def invoke(self) -> dict[str, np.ndarray[Any, Any]]: ...


@dataclass(frozen=True)
class _Binding:
    spec: TensorSpec
    index: int  # the tensor's index in the interpreter


class LiteRTRunner:
    """One interpreter. Not thread-safe: the worker serialises calls to `run`."""

    def __init__(
        self, model_path: str, threads: int = 1, delegate: ExternalDelegate | None = None
    ) -> None:
        started = time.perf_counter()
        check_identifier(model_path)
        try:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType

            extra: dict[str, Any] = {}
            if delegate is not None:
                extra["experimental_delegates"] = [_load_delegate(delegate)]
                # XNNPACK would take what the library leaves, hiding how much it took.
                extra["experimental_op_resolver_type"] = (
                    OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
                )
            self._interpreter = Interpreter(model_path=model_path, num_threads=threads, **extra)
            self._inputs, self._outputs = self._bindings()
            self._input_index = {b.spec.name: b.index for b in self._inputs}
            self._interpreter.allocate_tensors()
            # Input shapes as allocated now; `run` resizes only when a request differs.
            self._shapes: dict[int, tuple[int, ...]] = {
                int(d["index"]): tuple(int(x) for x in d["shape"])
                for d in self._interpreter.get_input_details()
            }
        except ModelLoadError:
            raise
        except Exception as error:  # LiteRT reports bad models as ValueError/RuntimeError
            raise ModelLoadError(_describe_load_error(error)) from None
        self.signature = Signature(
            tuple(b.spec for b in self._inputs), tuple(b.spec for b in self._outputs)
        )
        self.load_seconds = time.perf_counter() - started

    @property
    def interpreter(self) -> Any:
        return self._interpreter

    def _bindings(self) -> tuple[list[_Binding], list[_Binding]]:
        """Name tensors by the model's signature when it has exactly one (the names its author
        chose, e.g. "pixels"), else by tensor name."""
        interpreter = self._interpreter
        signatures = interpreter.get_signature_list()
        if len(signatures) == 1:
            runner = interpreter.get_signature_runner(next(iter(signatures)))
            inputs = runner.get_input_details().items()
            outputs = runner.get_output_details().items()
        else:
            inputs = ((d["name"], d) for d in interpreter.get_input_details())
            outputs = ((d["name"], d) for d in interpreter.get_output_details())
        return (
            [_binding(name, detail) for name, detail in inputs],
            [_binding(name, detail) for name, detail in outputs],
        )

    def run(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        """Run once. The caller has checked names, dtypes and shapes against `signature`."""
        self.resize({name: array.shape for name, array in inputs.items()})
        interpreter = self._interpreter
        for binding in self._inputs:
            interpreter.set_tensor(binding.index, inputs[binding.spec.name])
        return self.invoke()

    def resize(self, shapes: Mapping[str, tuple[int, ...]], strict: bool = True) -> None:
        """Give the inputs these shapes (checked against `signature` by the caller); the
        tensors are reallocated only when a shape changes. `strict=False` may change a
        dimension the model fixed (a batch's: `batch_runner`)."""
        interpreter = self._interpreter
        resized = False
        for binding in self._inputs:
            shape = shapes[binding.spec.name]
            if self._shapes[binding.index] != shape:
                interpreter.resize_tensor_input(binding.index, list(shape), strict=strict)
                self._shapes[binding.index] = shape
                resized = True
        if resized:
            interpreter.allocate_tensors()

    def input_buffers(self, names: Sequence[str]) -> list[memoryview]:
        """The interpreter's own input buffers, as flat writable bytes, in the order of
        `names`: the worker receives a request's tensors straight into them (no copy through
        a buffer of its own). Valid until the next `resize` or `invoke`, and the caller drops
        them before either (LiteRT refuses to run while views of its memory are alive)."""
        out = []
        for name in names:
            view = memoryview(self._interpreter.tensor(self._input_index[name])())
            out.append(view.cast("B") if view.nbytes else memoryview(bytearray()))
        return out

    def invoke(self) -> dict[str, np.ndarray[Any, Any]]:
        """Run on what the input tensors hold now; the outputs are copies."""
        interpreter = self._interpreter
        interpreter.invoke()
        return {b.spec.name: interpreter.get_tensor(b.index) for b in self._outputs}


def _binding(name: str, detail: Mapping[str, Any]) -> _Binding:
    try:
        datatype = v2_datatype(detail["dtype"])
    except UnsupportedDatatype as error:
        raise ModelLoadError(f"tensor {name!r}: {error}") from None
    signature = detail.get("shape_signature")
    shape = signature if signature is not None and len(signature) else detail["shape"]
    return _Binding(TensorSpec(name, datatype, tuple(int(d) for d in shape)), int(detail["index"]))


def preload() -> None:
    """Import LiteRT's interpreter now (a warm model process pays for it before its load)."""
    import ai_edge_litert.interpreter  # noqa: F401


def _load_delegate(delegate: ExternalDelegate) -> Any:
    from ai_edge_litert.interpreter import load_delegate

    try:
        return load_delegate(delegate.path, dict(delegate.options))
    except (OSError, ValueError, RuntimeError) as error:
        raise AcceleratorUnavailable(
            f"could not load the delegate library {delegate.path}: {' '.join(str(error).split())}"
        ) from None


def delegated_whole_graph(interpreter: Any) -> bool:
    """After delegation, the interpreter lists the original ops plus one DELEGATE node per
    delegated partition; the graph is whole on the delegate when one such node produces every
    output of the graph and there is no other partition."""
    ops = interpreter._get_ops_details()
    partitions = [op for op in ops if op["op_name"] == "DELEGATE"]
    outputs = {int(d["index"]) for d in interpreter.get_output_details()}
    return len(partitions) == 1 and outputs <= {int(i) for i in partitions[0]["outputs"]}


def check_identifier(model_path: str) -> None:
    """A TensorFlow Lite file carries "TFL3" at byte 4; say so plainly for anything else
    rather than leave it to the flatbuffer verifier's message."""
    try:
        with open(model_path, "rb") as stream:
            head = stream.read(8)
    except OSError as error:
        raise ModelLoadError(f"cannot read the model file: {error.strerror}") from None
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise ModelLoadError(
            "not a TensorFlow Lite model: the file lacks the TFL3 identifier at byte 4"
        )


def _describe_load_error(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    # LiteRT's messages can run to many lines of internal context; the first says what failed.
    first = text.splitlines()[0]
    return f"LiteRT could not load the model: {first}"
