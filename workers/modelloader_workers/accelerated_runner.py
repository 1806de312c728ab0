"""Running a model on an accelerator: LiteRT's `CompiledModel` with GPU or NPU flags.

`delegation: whole` asks for the accelerator alone, so LiteRT fails when an op cannot run there
(with "whole", the error says to use "partitioned"); `partitioned` adds the CPU flag when the
accelerator alone fails, and the CPU takes the ops the accelerator cannot. When the
accelerator cannot be initialised at all on this node (no Vulkan adapter, no vendor runtime),
`partitioned` falls back to the CPU interpreter and says so; `whole` fails with the reason.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelloader_workers.litert_runner import (
    AcceleratorUnavailable,
    ExternalDelegate,
    LiteRTRunner,
    ModelLoadError,
    Runner,
    check_identifier,
    delegated_whole_graph,
)
from modelloader_workers.precision import XNNPACK_FORCE_FP16, host_fp16_problem
from modelloader_workers.wire.tensor_types import numpy_dtype

SIGNATURE_INDEX = 0
# What `ai_edge_litert.tensor_buffer.TensorBuffer` can hold (2.3.0: no INT64, no INT16).
BUFFER_DATATYPES = {"FP32", "FP16", "INT32", "INT8", "UINT8", "BOOL"}
HINTS = {
    "gpu": "LiteRT drives GPUs through WebGPU (Vulkan on Linux): the node needs the Vulkan "
    "loader (libvulkan1) and the GPU driver's Vulkan ICD",
    "npu": "the node needs the vendor's LiteRT dispatch library (e.g. ai-edge-litert-sdk-intel)",
}


@dataclass(frozen=True)
class Execution:
    """Where the model's ops run, for the LoadedModel's status."""

    accelerator: str  # what actually runs it: cpu, gpu or npu
    delegate: str  # xnnpack, gpu, npu
    delegated_ops_share: float | None  # 1.0 whole graph; None when LiteRT does not say
    note: str = ""  # why it differs from what was asked, if it does
    precision: str = "fp32"  # what the kernels compute in: fp32, or fp16 where asked and able


class CompiledModelRunner:
    """One `CompiledModel`. Not thread-safe: the worker serialises calls to `run`."""

    def __init__(
        self,
        model_path: str,
        accelerator: str,
        delegation: str,
        precision: str = "fp32",
        threads: int = 1,
    ) -> None:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator as HA
        from ai_edge_litert.options import CpuOptions, GpuOptions, Options

        def options(accelerators: Any) -> Any:
            # fp16: XNNPACK forced to half precision on the CPU; the GPU computes in fp16
            # unless told to keep fp32, so fp32 is enforced there when asked.
            flags = XNNPACK_FORCE_FP16 if precision == "fp16" else None
            return Options(
                accelerators,
                cpu_options=CpuOptions(num_threads=threads, xnnpack_flags=flags),
                gpu_options=GpuOptions(enforce_f32=precision != "fp16"),
            )

        started = time.perf_counter()
        check_identifier(model_path)
        alone = {"cpu": HA.CPU, "gpu": HA.GPU, "npu": HA.NPU}[accelerator]
        # The accelerator alone first: if that compiles, the whole graph is on it. LiteRT's
        # is_fully_accelerated() counts the CPU as an accelerator, so with the CPU flag added
        # it cannot tell us; a partitioned model that needed the CPU reports no share.
        fully = True
        try:
            try:
                self._model = CompiledModel.from_file(model_path, options=options(alone))
            except Exception:
                if delegation == "whole" or accelerator == "cpu":
                    raise
                fully = False
                self._model = CompiledModel.from_file(model_path, options=options(alone | HA.CPU))
            signatures = self._model.get_signature_list()
            self._key = next(iter(signatures))
            self._input_names: list[str] = list(signatures[self._key]["inputs"])
            self._output_names: list[str] = list(signatures[self._key]["outputs"])
            # CompiledModel reports current shapes only; the interpreter knows which
            # dimensions are dynamic (-1), which clients need to see.
            self.signature = LiteRTRunner(model_path).signature
            unsupported = sorted(
                {t.datatype for t in (*self.signature.inputs, *self.signature.outputs)}
                - BUFFER_DATATYPES
            )
            if unsupported:
                raise AcceleratorUnavailable(
                    f"LiteRT could not compile the model for the {accelerator.upper()}: its "
                    f"tensor buffers do not take {', '.join(unsupported)} inputs or outputs"
                )
            self._shapes: dict[str, tuple[int, ...]] = {
                name: tuple(int(d) for d in detail["shape"])
                for name, detail in self._model.get_input_tensor_details(self._key).items()
            }
            self._allocate()
        except ModelLoadError:
            raise
        except Exception as error:
            failed = (
                f"LiteRT could not compile the model for the {accelerator.upper()} "
                f"({_reason(error)})"
            )
            hint = HINTS.get(accelerator)
            raise AcceleratorUnavailable(f"{failed}; {hint}" if hint else failed) from None
        note = (
            ""
            if fully
            else (
                f"the {accelerator.upper()} could not take the whole graph; LiteRT runs the rest "
                "on the CPU"
            )
        )
        delegate = "xnnpack" if accelerator == "cpu" else accelerator
        self.execution = Execution(
            accelerator, delegate, 1.0 if fully else None, note, precision=precision
        )
        self.load_seconds = time.perf_counter() - started

    def _allocate(self) -> None:
        self._inputs = self._model.create_input_buffers(SIGNATURE_INDEX)
        self._outputs = self._model.create_output_buffers(SIGNATURE_INDEX)
        details = self._model.get_output_tensor_details(self._key)
        self._out_shapes = [tuple(details[n]["shape"]) for n in self._output_names]

    def run(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        resized = False
        for index, name in enumerate(self._input_names):
            shape = inputs[name].shape
            if self._shapes.get(name) != shape:
                self._model.resize_input_tensor(index, list(shape), SIGNATURE_INDEX)
                self._shapes[name] = shape
                resized = True
        if resized:
            self._allocate()
        for buffer, name in zip(self._inputs, self._input_names, strict=True):
            buffer.write(np.ascontiguousarray(inputs[name]))
        self._model.run_by_index(SIGNATURE_INDEX, self._inputs, self._outputs)
        result = {}
        for name, buffer, shape in zip(
            self._output_names, self._outputs, self._out_shapes, strict=True
        ):
            spec = self.signature.output(name)
            assert spec is not None
            dtype = numpy_dtype(spec.datatype)
            count = int(np.prod(shape, dtype=np.int64))
            result[name] = np.asarray(buffer.read(count, dtype)).reshape(shape)
        return result


def load_runner(
    model_path: str,
    threads: int,
    accelerator: str,
    delegation: str,
    delegate: ExternalDelegate | None = None,
    precision: str = "fp32",
    fp16_problem: Callable[[], str | None] = host_fp16_problem,
) -> tuple[Runner, Execution]:
    """The runner for this placement. CPU: the classic interpreter with XNNPACK (faster here
    than CompiledModel's defaults), or CompiledModel with XNNPACK forced to fp16 when asked
    and the CPU can; GPU/NPU: an external delegate library when the operator's configuration
    names one for that class, else CompiledModel; with the CPU fallback above. fp16 that
    cannot be had runs in fp32 with a note (`Degraded`); only an external delegate asked for
    the `whole` graph fails the load instead."""
    if accelerator == "cpu":
        if precision == "fp16":
            problem = fp16_problem()
            if problem is None:
                try:
                    runner = CompiledModelRunner(model_path, "cpu", delegation, "fp16", threads)
                    return runner, runner.execution
                except AcceleratorUnavailable as error:  # e.g. tensor types it cannot buffer
                    problem = str(error)
            note = f"precision fp16: {problem}; running in fp32"
            return LiteRTRunner(model_path, threads), Execution("cpu", "xnnpack", 1.0, note)
        return LiteRTRunner(model_path, threads), Execution("cpu", "xnnpack", 1.0)
    try:
        if delegate is not None:
            return _with_delegate(model_path, threads, accelerator, delegation, delegate, precision)
        runner = CompiledModelRunner(model_path, accelerator, delegation, precision, threads)
        return runner, runner.execution
    except AcceleratorUnavailable as error:
        if delegation == "whole":
            raise
        cpu, execution = load_runner(
            model_path, threads, "cpu", "partitioned", None, precision, fp16_problem
        )
        note = "; ".join(n for n in (f"running on the CPU instead: {error}", execution.note) if n)
        return cpu, dataclasses.replace(execution, delegated_ops_share=0.0, note=note)


def _with_delegate(
    model_path: str,
    threads: int,
    accelerator: str,
    delegation: str,
    delegate: ExternalDelegate,
    precision: str = "fp32",
) -> tuple[Runner, Execution]:
    name = Path(delegate.path).name
    unsupported = ""
    if precision == "fp16":
        unsupported = (
            f"precision fp16: the delegate {name} chooses its own precision and takes no "
            "setting for it"
        )
        if delegation == "whole":
            raise ModelLoadError(f"{unsupported}; use precision fp32, or delegation 'partitioned'")
    runner = LiteRTRunner(model_path, threads, delegate)
    whole = delegated_whole_graph(runner.interpreter)
    if delegation == "whole" and not whole:
        raise ModelLoadError(
            f"delegation 'whole': the delegate {name} did not take the whole graph; use "
            "delegation 'partitioned' to let the CPU run the rest"
        )
    note = "" if whole else f"the delegate {name} took part of the graph; the CPU runs the rest"
    if unsupported:
        note = "; ".join(n for n in (f"{unsupported}: running as it chooses", note) if n)
    return runner, Execution(accelerator, name, 1.0 if whole else None, note)


def _reason(error: Exception) -> str:
    """LiteRT's Python errors often carry only source locations ("ERROR: [file.h:123]"); the
    useful text went to stderr. Keep what is not a location."""
    text = re.sub(r"ERROR: \[[^\]]*\]|[└]", " ", str(error))
    text = " ".join(text.split())
    return text[:300] or "the accelerator could not be initialised on this node"
