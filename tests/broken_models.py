"""Broken model files, made from the good one at test time."""

from __future__ import annotations

from pathlib import Path


def write_broken_models(good: Path, folder: Path) -> dict[str, Path]:
    data = bytearray(good.read_bytes())
    corrupt = bytearray(data)
    # Scramble the flatbuffer's root table and vtable offsets, keep the TFL3 identifier.
    for i in range(8, 64):
        corrupt[i] ^= 0xA5
    files = {
        "corrupt": bytes(corrupt),
        "truncated": bytes(data[: len(data) // 3]),
        "not-a-model": b"# this is a README, not a model\n" * 20,
    }
    paths = {}
    for name, content in files.items():
        path = folder / f"{name}.tflite"
        path.write_bytes(content)
        paths[name] = path
    return paths
