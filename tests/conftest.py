"""Shared paths for every tier of tests."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "01-digits"
MODELS = REPO / "tests" / "models"


@pytest.fixture
def digits_model() -> Path:
    return EXAMPLE / "digits.tflite"


@pytest.fixture
def dtypes_model() -> Path:
    return MODELS / "dtypes.tflite"
