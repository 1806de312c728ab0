"""A seeded corpus of hostile `.tflite` files, mutated from a good model at test time.

Four families, each the kind of file an attacker or a broken pipeline hands over:
- `flip-*`: a few bytes XORed at random offsets (anywhere in the file: header, tables, weights);
- `trunc-*`: the file cut at random lengths (and to 0, 4 and 8 bytes);
- `magic-*`: the `TFL3` file identifier replaced, or the root offset pointed elsewhere;
- `shape-*`/`buffer-*`/`index-*`: the flatbuffer unpacked with LiteRT's own schema bindings,
  one field set to a hostile value (huge or negative dimensions, buffer offsets and sizes past
  the end of the file, tensor and opcode indices out of range), and packed again: a well-formed
  flatbuffer that lies about its tensors.

Deterministic: the same seed and the same good file give the same bytes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flatbuffers
from ai_edge_litert import schema_py_generated as schema

SEED = 20260521


def _repack(data: bytes, mutate: Callable[[Any], None]) -> bytes:
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    mutate(model)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _structural(data: bytes) -> dict[str, bytes]:
    """Well-formed flatbuffers whose fields lie."""
    big = (1 << 31) - 1  # shapes are int32

    def tensor(index: int, **fields: Any) -> Callable[[Any], None]:
        def mutate(model: Any) -> None:
            for key, value in fields.items():
                setattr(model.subgraphs[0].tensors[index], key, value)

        return mutate

    def every_tensor(**fields: Any) -> Callable[[Any], None]:
        def mutate(model: Any) -> None:
            for t in model.subgraphs[0].tensors:
                for key, value in fields.items():
                    setattr(t, key, value)

        return mutate

    def buffer_offset(offset: int, size: int) -> Callable[[Any], None]:
        def mutate(model: Any) -> None:
            buf = model.buffers[model.subgraphs[0].tensors[1].buffer]
            buf.data = None
            buf.offset = offset
            buf.size = size

        return mutate

    def operator(**fields: Any) -> Callable[[Any], None]:
        def mutate(model: Any) -> None:
            for key, value in fields.items():
                setattr(model.subgraphs[0].operators[0], key, value)

        return mutate

    def model_field(mutate_model: Callable[[Any], None]) -> Callable[[Any], None]:
        return mutate_model

    def drop_buffer_data(model: Any) -> None:
        model.buffers[model.subgraphs[0].tensors[1].buffer].data = [1, 2, 3]

    def input_sig(model: Any) -> None:
        model.signatureDefs[0].inputs[0].tensorIndex = 999

    def opcode(model: Any) -> None:
        model.operatorCodes[0].builtinCode = 100000
        model.operatorCodes[0].deprecatedBuiltinCode = 127

    def subgraph_io(model: Any) -> None:
        model.subgraphs[0].inputs = [-5]

    def no_subgraphs(model: Any) -> None:
        model.subgraphs = []

    def self_loop(model: Any) -> None:
        ops = model.subgraphs[0].operators
        ops[0].inputs = [ops[-1].outputs[0], *list(ops[0].inputs)[1:]]

    mutations: dict[str, Callable[[Any], None]] = {
        "shape-huge-input": tensor(0, shape=[big, big], shapeSignature=[-1, big]),
        "shape-huge-weight": tensor(1, shape=[1 << 20, 1 << 20]),
        "shape-negative": tensor(0, shape=[-7, 64], shapeSignature=[-7, 64]),
        "shape-rank-9": tensor(0, shape=[2] * 9, shapeSignature=[2] * 9),
        "shape-zero": tensor(1, shape=[0, 64]),
        "shape-all-huge": every_tensor(shape=[65536, 65536]),
        "shape-mismatch": tensor(1, shape=[31, 64]),
        "buffer-offset-past-end": buffer_offset(1 << 40, 1 << 30),
        "buffer-offset-inside": buffer_offset(16, 1 << 20),
        "buffer-size-huge": buffer_offset(64, (1 << 64) - 1),
        "buffer-short": model_field(drop_buffer_data),
        "index-buffer": tensor(1, buffer=100000),
        "index-buffer-negative": tensor(1, buffer=(1 << 32) - 1),
        "index-op-input": operator(inputs=[0, 10000, 2]),
        "index-op-output": operator(outputs=[123456]),
        "index-opcode": operator(opcodeIndex=77),
        "index-signature": model_field(input_sig),
        "index-subgraph-io": model_field(subgraph_io),
        "opcode-unknown": model_field(opcode),
        "no-subgraphs": model_field(no_subgraphs),
        "graph-cycle": model_field(self_loop),
        "type-bogus": tensor(0, type=99),
    }
    return {name: _repack(data, mutate) for name, mutate in mutations.items()}


def hostile_models(good: bytes, seed: int = SEED) -> dict[str, bytes]:
    """Name -> file contents, ~50 mutants of `good`."""
    rng = random.Random(seed)
    out: dict[str, bytes] = {}
    for i in range(12):
        data = bytearray(good)
        for _ in range(rng.choice((1, 2, 8))):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        out[f"flip-{i:02d}"] = bytes(data)
    for i in range(4):  # bytes flipped in the first 64: root offset, vtables, header fields
        data = bytearray(good)
        data[rng.randrange(0, 64)] ^= rng.randrange(1, 256)
        out[f"flip-head-{i:02d}"] = bytes(data)
    for length in (0, 4, 8, *sorted(rng.sample(range(9, len(good) - 1), 5))):
        out[f"trunc-{length:05d}"] = good[:length]
    out["magic-zero"] = good[:4] + b"\0\0\0\0" + good[8:]
    out["magic-tfl2"] = good[:4] + b"TFL2" + good[8:]
    out["magic-root-past-end"] = (len(good) + 1000).to_bytes(4, "little") + good[4:]
    out["magic-root-self"] = (0).to_bytes(4, "little") + good[4:]
    out["magic-only"] = good[:8]
    out["magic-garbage"] = good[:8] + bytes(rng.randrange(256) for _ in range(4096))
    out.update(_structural(good))
    return out


def write_hostile_models(good: Path, folder: Path, seed: int = SEED) -> dict[str, Path]:
    paths = {}
    for name, content in hostile_models(good.read_bytes(), seed).items():
        path = folder / f"{name}.tflite"
        path.write_bytes(content)
        paths[name] = path
    return paths
