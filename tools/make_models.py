"""Make the small models that the example and the tests use, from data that packages ship.

    .venv/bin/python tools/make_models.py

- examples/01-digits/digits.tflite: a classifier of scikit-learn's 8x8 digits (an MLP trained
  here, 64 -> 32 ReLU -> 10 softmax, batch dimension dynamic), with samples.json: held-out
  images and their labels, which the demo and the tests classify.
- tests/models/dtypes.tflite: one input and one output of each tensor type that matters
  (float32, float16, int8, uint8, int32, int64, bool) and a float32 input with two dynamic
  dimensions; each output is a simple function of its input, so tests can check the arithmetic.
- tests/models/memory_hog.tflite: a few hundred bytes that need 512 MiB to run (a scalar
  tiled to 128M floats, then summed): what a model over its memory limit looks like.
- tests/models/scale.tflite: y = 2x for a float32 x of shape [batch, n], both dimensions
  dynamic: requests of several widths, for batching's tests.

Deterministic: the same versions of scikit-learn and NumPy write the same bytes, and a test
checks that the committed files are what this script writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tflite_build import Graph, schema

ROOT = Path(__file__).resolve().parent.parent
B = schema.BuiltinOperator
Opt = schema.BuiltinOptions


def digits_model() -> tuple[bytes, dict[str, Any], float]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=600, random_state=0)
    clf.fit(x_train, y_train)
    accuracy = float(clf.score(x_test, y_test))

    g = Graph()
    pixels = g.tensor("pixels", np.float32, [1, 64], signature=[-1, 64])
    # FULLY_CONNECTED wants weights as [units, inputs].
    w1 = g.const("dense/kernel", clf.coefs_[0].T.astype(np.float32))
    b1 = g.const("dense/bias", clf.intercepts_[0].astype(np.float32))
    hidden = g.tensor("dense/relu", np.float32, [1, 32], signature=[-1, 32])
    relu = schema.FullyConnectedOptionsT()
    relu.fusedActivationFunction = schema.ActivationFunctionType.RELU
    g.op(B.FULLY_CONNECTED, [pixels, w1, b1], [hidden], Opt.FullyConnectedOptions, relu)
    w2 = g.const("logits/kernel", clf.coefs_[1].T.astype(np.float32))
    b2 = g.const("logits/bias", clf.intercepts_[1].astype(np.float32))
    logits = g.tensor("logits", np.float32, [1, 10], signature=[-1, 10])
    g.op(
        B.FULLY_CONNECTED,
        [hidden, w2, b2],
        [logits],
        Opt.FullyConnectedOptions,
        schema.FullyConnectedOptionsT(),
    )
    probabilities = g.tensor("probabilities", np.float32, [1, 10], signature=[-1, 10])
    softmax = schema.SoftmaxOptionsT()
    softmax.beta = 1.0
    g.op(B.SOFTMAX, [logits], [probabilities], Opt.SoftmaxOptions, softmax)
    model = g.build(
        {"pixels": pixels},
        {"probabilities": probabilities},
        description="scikit-learn digits MLP (tools/make_models.py)",
    )

    picks = [int(np.flatnonzero(y_test == digit)[0]) for digit in range(10)]
    samples = {
        "description": "One held-out 8x8 image per digit, pixels scaled to [0, 1], row-major.",
        "test_accuracy": round(accuracy, 4),
        "samples": [
            {"label": int(y_test[i]), "pixels": [round(float(v), 4) for v in x_test[i]]}
            for i in picks
        ],
    }
    return model, samples, accuracy


def dtypes_model() -> bytes:
    g = Graph()
    two = g.const("two", np.array([2.0], np.float32))

    f32 = g.tensor("f32", np.float32, [2, 3])
    f32_out = g.tensor("f32_doubled", np.float32, [2, 3])
    g.op(B.ADD, [f32, f32], [f32_out], Opt.AddOptions, schema.AddOptionsT())

    f16 = g.tensor("f16", np.float16, [2, 3])
    f16_wide = g.tensor("f16_as_f32", np.float32, [2, 3])
    g.op(B.DEQUANTIZE, [f16], [f16_wide])
    f16_doubled = g.tensor("f16_doubled_f32", np.float32, [2, 3])
    g.op(B.MUL, [f16_wide, two], [f16_doubled], Opt.MulOptions, schema.MulOptionsT())
    f16_out = g.tensor("f16_doubled", np.float16, [2, 3])
    g.op(B.CAST, [f16_doubled], [f16_out])

    i8 = g.tensor("i8", np.int8, [4])
    i8_out = g.tensor("i8_relu", np.int8, [4])
    g.op(B.MAXIMUM, [i8, g.const("i8_zero", np.zeros(4, np.int8))], [i8_out])

    u8 = g.tensor("u8", np.uint8, [4])
    u8_out = g.tensor("u8_min100", np.uint8, [4])
    g.op(B.MINIMUM, [u8, g.const("u8_100", np.full(4, 100, np.uint8))], [u8_out])

    i32 = g.tensor("i32", np.int32, [4])
    i32_out = g.tensor("i32_squared", np.int32, [4])
    g.op(B.MUL, [i32, i32], [i32_out], Opt.MulOptions, schema.MulOptionsT())

    i64 = g.tensor("i64", np.int64, [4])
    i64_out = g.tensor("i64_plus1", np.int64, [4])
    g.op(
        B.ADD,
        [i64, g.const("i64_one", np.ones(4, np.int64))],
        [i64_out],
        Opt.AddOptions,
        schema.AddOptionsT(),
    )

    flag = g.tensor("flag", np.bool_, [4])
    flag_out = g.tensor("flag_not", np.bool_, [4])
    g.op(B.LOGICAL_NOT, [flag], [flag_out])

    dyn = g.tensor("dyn", np.float32, [1, 1], signature=[-1, -1])
    dyn_out = g.tensor("dyn_doubled", np.float32, [1, 1], signature=[-1, -1])
    g.op(B.MUL, [dyn, two], [dyn_out], Opt.MulOptions, schema.MulOptionsT())

    return g.build(
        {
            "f32": f32,
            "f16": f16,
            "i8": i8,
            "u8": u8,
            "i32": i32,
            "i64": i64,
            "flag": flag,
            "dyn": dyn,
        },
        {
            "f32_doubled": f32_out,
            "f16_doubled": f16_out,
            "i8_relu": i8_out,
            "u8_min100": u8_out,
            "i32_squared": i32_out,
            "i64_plus1": i64_out,
            "flag_not": flag_out,
            "dyn_doubled": dyn_out,
        },
        description="one tensor of each type (tools/make_models.py)",
    )


HOG_ELEMENTS = 128 << 20  # float32: 512 MiB of intermediate tensor


def memory_hog_model() -> bytes:
    g = Graph()
    x = g.tensor("x", np.float32, [1])
    wide = g.tensor("wide", np.float32, [HOG_ELEMENTS])
    g.op(B.TILE, [x, g.const("multiples", np.array([HOG_ELEMENTS], np.int32))], [wide])
    total = g.tensor("total", np.float32, [])
    options = schema.ReducerOptionsT()
    options.keepDims = False
    g.op(
        B.SUM,
        [wide, g.const("axis", np.array([0], np.int32))],
        [total],
        Opt.ReducerOptions,
        options,
    )
    return g.build({"x": x}, {"total": total}, description="needs 512 MiB (tools/make_models.py)")


def scale_model() -> bytes:
    g = Graph()
    x = g.tensor("x", np.float32, [1, 1], signature=[-1, -1])
    y = g.tensor("y", np.float32, [1, 1], signature=[-1, -1])
    two = g.const("two", np.array([2.0], np.float32))
    g.op(B.MUL, [x, two], [y], Opt.MulOptions, schema.MulOptionsT())
    return g.build({"x": x}, {"y": y}, description="y = 2x (tools/make_models.py)")


def main() -> None:
    model, samples, accuracy = digits_model()
    example = ROOT / "examples" / "01-digits"
    (example / "digits.tflite").write_bytes(model)
    (example / "samples.json").write_text(json.dumps(samples, indent=1) + "\n")
    (ROOT / "tests" / "models" / "dtypes.tflite").write_bytes(dtypes_model())
    (ROOT / "tests" / "models" / "memory_hog.tflite").write_bytes(memory_hog_model())
    (ROOT / "tests" / "models" / "scale.tflite").write_bytes(scale_model())
    print(f"digits: held-out accuracy {accuracy:.3f}, {len(model)} bytes")


if __name__ == "__main__":
    main()
