"""The committed models are exactly what tools/make_models.py writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema

REPO = Path(__file__).resolve().parents[2]


def _make_models() -> object:
    spec = importlib.util.spec_from_file_location("make_models", REPO / "tools" / "make_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dtypes_model_matches_its_script() -> None:
    module = _make_models()
    assert module.dtypes_model() == (REPO / "tests" / "models" / "dtypes.tflite").read_bytes()  # type: ignore[attr-defined]


def _tree(value: Any) -> Any:
    """A flatbuffers object-API value as plain lists and dicts, for comparison."""
    if isinstance(value, list | tuple | np.ndarray):
        return [_tree(v) for v in value]
    if hasattr(value, "__dict__"):
        return {k: _tree(v) for k, v in vars(value).items()}
    return value


def assert_same_trained_model(made: bytes, committed: bytes) -> None:
    """Equal but for the last bits of trained weights: the training runs in float64 through
    BLAS, whose kernels (AVX2 on one CPU, AVX-512 on another) sum in different orders."""
    ours = schema.ModelT.InitFromPackedBuf(made, 0)
    theirs = schema.ModelT.InitFromPackedBuf(committed, 0)
    assert len(ours.buffers) == len(theirs.buffers)
    for mine, other in zip(ours.buffers, theirs.buffers, strict=True):
        a = np.frombuffer(bytes(bytearray(mine.data)) if mine.data is not None else b"", "<f4")
        b = np.frombuffer(bytes(bytearray(other.data)) if other.data is not None else b"", "<f4")
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        mine.data = other.data = None
    assert _tree(ours) == _tree(theirs)


def test_digits_model_matches_its_script_and_classifies_well() -> None:
    model, samples, accuracy = _make_models().digits_model()  # type: ignore[attr-defined]
    example = REPO / "examples" / "01-digits"
    assert_same_trained_model(model, (example / "digits.tflite").read_bytes())
    assert samples == json.loads((example / "samples.json").read_text())
    assert accuracy > 0.95


def test_memory_hog_model_matches_its_script() -> None:
    module = _make_models()
    hog = (REPO / "tests" / "models" / "memory_hog.tflite").read_bytes()
    assert module.memory_hog_model() == hog  # type: ignore[attr-defined]
    assert len(hog) < 4096


def test_scale_model_matches_its_script() -> None:
    module = _make_models()
    assert module.scale_model() == (REPO / "tests" / "models" / "scale.tflite").read_bytes()  # type: ignore[attr-defined]
