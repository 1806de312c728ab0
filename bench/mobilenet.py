"""MobileNetV2 224 as TensorFlow Lite files, made here: the architecture of
`tf.keras.applications.MobileNetV2` with `weights=None` and a fixed seed (nothing is downloaded),
converted three ways: float32, float16-quantised weights, and uint8 full-integer (uint8 input
and output, calibrated on seeded random images). TensorFlow is a bench-only extra.

    .venv/bin/python bench/mobilenet.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

VARIANTS = ("float32", "float16", "uint8")
SEED = 20261125


def build(out: Path) -> dict[str, Path]:
    """Write mobilenet_v2_{variant}.tflite under `out` (reused when present)."""
    paths = {v: out / f"mobilenet_v2_{v}.tflite" for v in VARIANTS}
    if all(p.exists() for p in paths.values()):
        return paths
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    tf.keras.utils.set_random_seed(SEED)
    model = tf.keras.applications.MobileNetV2(input_shape=(224, 224, 3), weights=None, classes=1000)
    # A fixed batch of 1 (the interpreter's shapes are then static) and the tensor names a
    # client sees: "image" in, "probabilities" out.
    image = tf.keras.Input((224, 224, 3), batch_size=1, name="image")
    named = tf.keras.Model(image, {"probabilities": model(image)})

    def converter() -> tf.lite.TFLiteConverter:
        return tf.lite.TFLiteConverter.from_keras_model(named)

    rng = np.random.default_rng(SEED)

    def calibration() -> Iterator[list[np.ndarray]]:
        for _ in range(16):
            yield [rng.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)]

    out.mkdir(parents=True, exist_ok=True)
    for variant in VARIANTS:
        c = converter()
        if variant == "float16":
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            c.target_spec.supported_types = [tf.float16]
        elif variant == "uint8":
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            c.representative_dataset = calibration
            c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            c.inference_input_type = tf.uint8
            c.inference_output_type = tf.uint8
        paths[variant].write_bytes(c.convert())
    return paths


if __name__ == "__main__":
    for variant, path in build(Path(sys.argv[1])).items():
        print(variant, path, path.stat().st_size)
