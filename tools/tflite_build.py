"""A tiny writer of TensorFlow Lite flatbuffers, for the models that tests and examples need.

It uses the flatbuffer schema bindings that `ai-edge-litert` ships, so making a model needs no
TensorFlow: a graph is a list of builtin operators over tensors, packed into one subgraph with a
`serving_default` signature (the names clients see).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

_TENSOR_TYPES: dict[np.dtype[Any], int] = {
    np.dtype(np.float32): schema.TensorType.FLOAT32,
    np.dtype(np.float16): schema.TensorType.FLOAT16,
    np.dtype(np.int8): schema.TensorType.INT8,
    np.dtype(np.uint8): schema.TensorType.UINT8,
    np.dtype(np.int16): schema.TensorType.INT16,
    np.dtype(np.int32): schema.TensorType.INT32,
    np.dtype(np.int64): schema.TensorType.INT64,
    np.dtype(np.bool_): schema.TensorType.BOOL,
}


@dataclass
class Graph:
    """One subgraph under construction; `tensor`, `const` and `op` return tensor indices."""

    tensors: list[Any] = field(default_factory=list)
    buffers: list[Any] = field(default_factory=lambda: [schema.BufferT()])
    opcodes: list[int] = field(default_factory=list)
    operators: list[Any] = field(default_factory=list)

    def tensor(
        self, name: str, dtype: Any, shape: list[int], signature: list[int] | None = None
    ) -> int:
        t = schema.TensorT()
        t.name = name
        t.type = _TENSOR_TYPES[np.dtype(dtype)]
        # The runtime shape uses 1 where the signature says "any size" (-1).
        t.shape = [1 if d < 0 else d for d in signature] if signature is not None else shape
        if signature is not None:
            t.shapeSignature = signature
        t.buffer = 0
        self.tensors.append(t)
        return len(self.tensors) - 1

    def const(self, name: str, value: Any) -> int:
        array = np.ascontiguousarray(value)
        buf = schema.BufferT()
        buf.data = np.frombuffer(array.tobytes(), dtype=np.uint8).tolist()
        self.buffers.append(buf)
        index = self.tensor(name, array.dtype, list(array.shape))
        self.tensors[index].buffer = len(self.buffers) - 1
        return index

    def op(
        self,
        builtin: int,
        inputs: list[int],
        outputs: list[int],
        options_type: int = 0,
        options: Any = None,
    ) -> None:
        if builtin not in self.opcodes:
            self.opcodes.append(builtin)
        o = schema.OperatorT()
        o.opcodeIndex = self.opcodes.index(builtin)
        o.inputs = inputs
        o.outputs = outputs
        o.builtinOptionsType = options_type
        o.builtinOptions = options
        self.operators.append(o)

    def build(
        self, inputs: dict[str, int], outputs: dict[str, int], description: str = ""
    ) -> bytes:
        """Pack the graph; `inputs`/`outputs` map signature names to tensor indices."""
        subgraph = schema.SubGraphT()
        subgraph.tensors = self.tensors
        subgraph.inputs = list(inputs.values())
        subgraph.outputs = list(outputs.values())
        subgraph.operators = self.operators
        subgraph.name = "main"

        def tensor_maps(named: dict[str, int]) -> list[Any]:
            maps = []
            for name, index in named.items():
                m = schema.TensorMapT()
                m.name = name
                m.tensorIndex = index
                maps.append(m)
            return maps

        signature = schema.SignatureDefT()
        signature.signatureKey = "serving_default"
        signature.inputs = tensor_maps(inputs)
        signature.outputs = tensor_maps(outputs)

        model = schema.ModelT()
        model.version = 3
        model.description = description
        model.subgraphs = [subgraph]
        model.buffers = self.buffers
        model.signatureDefs = [signature]
        model.operatorCodes = []
        for builtin in self.opcodes:
            code = schema.OperatorCodeT()
            code.builtinCode = builtin
            code.deprecatedBuiltinCode = min(builtin, 127)
            code.version = 1
            model.operatorCodes.append(code)

        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())
