"""The committed models are exactly what tools/make_models.py writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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


def test_digits_model_matches_its_script_and_classifies_well() -> None:
    model, samples, accuracy = _make_models().digits_model()  # type: ignore[attr-defined]
    example = REPO / "examples" / "01-digits"
    assert model == (example / "digits.tflite").read_bytes()
    assert samples == json.loads((example / "samples.json").read_text())
    assert accuracy > 0.95


def test_memory_hog_model_matches_its_script() -> None:
    module = _make_models()
    hog = (REPO / "tests" / "models" / "memory_hog.tflite").read_bytes()
    assert module.memory_hog_model() == hog  # type: ignore[attr-defined]
    assert len(hog) < 4096
