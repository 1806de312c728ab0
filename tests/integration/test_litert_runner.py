"""The LiteRT adapter on real models: every tensor type, dynamic shapes, the signature."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from modelloader_workers.litert_runner import LiteRTRunner

INPUTS = {
    "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
    "f16": np.array([[0.5, 1.5, -2], [3, 4, 5]], dtype=np.float16),
    "i8": np.array([-3, -1, 0, 5], dtype=np.int8),
    "u8": np.array([1, 200, 100, 255], dtype=np.uint8),
    "i32": np.array([1, 2, 3, -4], dtype=np.int32),
    "i64": np.array([1, 2, 2**40, -5], dtype=np.int64),
    "flag": np.array([True, False, True, False]),
    "dyn": np.ones((3, 5), dtype=np.float32),
}


def test_every_tensor_type(dtypes_model: Path) -> None:
    runner = LiteRTRunner(str(dtypes_model), threads=2)
    types = {t.name: t.datatype for t in runner.signature.inputs}
    assert types == {
        "f32": "FP32",
        "f16": "FP16",
        "i8": "INT8",
        "u8": "UINT8",
        "i32": "INT32",
        "i64": "INT64",
        "flag": "BOOL",
        "dyn": "FP32",
    }
    out = runner.run(INPUTS)
    np.testing.assert_array_equal(out["f32_doubled"], INPUTS["f32"] * 2)
    assert out["f16_doubled"].dtype == np.float16
    np.testing.assert_array_equal(out["f16_doubled"], INPUTS["f16"] * 2)
    np.testing.assert_array_equal(out["i8_relu"], [0, 0, 0, 5])
    np.testing.assert_array_equal(out["u8_min100"], [1, 100, 100, 100])
    np.testing.assert_array_equal(out["i32_squared"], [1, 4, 9, 16])
    np.testing.assert_array_equal(out["i64_plus1"], INPUTS["i64"] + 1)
    np.testing.assert_array_equal(out["flag_not"], [False, True, False, True])


def test_dynamic_dimensions_resize_per_request(dtypes_model: Path) -> None:
    runner = LiteRTRunner(str(dtypes_model))
    assert runner.signature.input("dyn") is not None
    assert runner.signature.input("dyn").shape == (-1, -1)  # type: ignore[union-attr]
    for shape in [(1, 1), (4, 7), (2, 2), (4, 7)]:
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        out = runner.run({**INPUTS, "dyn": x})
        np.testing.assert_allclose(out["dyn_doubled"], x * 2)


def test_digits_example_classifies_its_samples(digits_model: Path) -> None:
    runner = LiteRTRunner(str(digits_model))
    samples = json.loads((digits_model.parent / "samples.json").read_text())["samples"]
    pixels = np.array([s["pixels"] for s in samples], dtype=np.float32)
    probabilities = runner.run({"pixels": pixels})["probabilities"]
    assert probabilities.shape == (10, 10)
    assert probabilities.argmax(axis=1).tolist() == [s["label"] for s in samples]


def test_a_missing_delegate_library_falls_back_only_when_partitioned(digits_model: Path) -> None:
    import pytest
    from modelloader_workers.accelerated_runner import load_runner
    from modelloader_workers.litert_runner import AcceleratorUnavailable, ExternalDelegate

    library = ExternalDelegate("/nonexistent/libedgetpu.so.1", (("device", "usb"),))
    runner, execution = load_runner(str(digits_model), 1, "npu", "partitioned", library)
    assert execution.accelerator == "cpu" and "libedgetpu.so.1" in execution.note
    assert runner.run({"pixels": np.zeros((1, 64), np.float32)})["probabilities"].shape == (1, 10)
    with pytest.raises(AcceleratorUnavailable, match="could not load the delegate library"):
        load_runner(str(digits_model), 1, "npu", "whole", library)


def test_the_delegated_graph_check_on_a_real_delegate(digits_model: Path) -> None:
    """XNNPACK is a real delegate: on the digits MLP it takes the whole graph, which the check
    used for external libraries must recognise."""
    from modelloader_workers.litert_runner import delegated_whole_graph

    runner = LiteRTRunner(str(digits_model))
    assert delegated_whole_graph(runner.interpreter)
