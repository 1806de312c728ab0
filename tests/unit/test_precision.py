"""spec.precision: fp16 takes effect (XNNPACK forced to half precision, real LiteRT) where the
CPU can, and where it cannot the model runs in fp32 with a reason, never silently."""

from __future__ import annotations

import json

import numpy as np
import pytest
from modelloader_workers.accelerated_runner import load_runner
from modelloader_workers.litert_runner import LiteRTRunner
from modelloader_workers.precision import cpu_fp16_problem, host_fp16_problem

from tests.conftest import EXAMPLE

MODEL = str(EXAMPLE / "digits.tflite")
PIXELS = np.array(
    [s["pixels"] for s in json.loads((EXAMPLE / "samples.json").read_text())["samples"]],
    dtype=np.float32,
)


@pytest.mark.parametrize(
    ("machine", "flags", "problem"),
    [
        ("x86_64", {"avx2", "f16c", "fma"}, None),
        ("x86_64", {"avx2"}, "F16C"),
        ("x86_64", {"sse4_2"}, "AVX2 and F16C"),
        ("aarch64", {"fp", "asimd", "asimdhp"}, None),
        ("aarch64", {"fp", "asimd"}, "asimdhp"),
        ("riscv64", set(), "riscv64"),
    ],
)
def test_which_cpus_run_half_precision(machine: str, flags: set[str], problem: str | None) -> None:
    found = cpu_fp16_problem(machine, flags)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_fp16_takes_effect_on_this_cpu_or_says_why_not() -> None:
    fp32 = LiteRTRunner(MODEL).run({"pixels": PIXELS})["probabilities"]
    runner, execution = load_runner(MODEL, 1, "cpu", "partitioned", None, "fp16")
    got = runner.run({"pixels": PIXELS})["probabilities"]
    if host_fp16_problem() is None:
        assert execution.precision == "fp16" and not execution.note
        # Half precision: close to fp32, but not its bits (fp16 flushes the tiny
        # probabilities to zero and rounds the rest to 11 bits).
        assert not np.array_equal(got, fp32)
        np.testing.assert_allclose(got, fp32, atol=2e-3)
        assert (got.argmax(axis=1) == fp32.argmax(axis=1)).all()
    else:
        assert execution.precision == "fp32" and execution.note.startswith("precision fp16")
        np.testing.assert_array_equal(got, fp32)


def test_without_half_precision_the_model_runs_in_fp32_with_a_reason() -> None:
    runner, execution = load_runner(
        MODEL, 1, "cpu", "partitioned", None, "fp16", fp16_problem=lambda: "no F16C here"
    )
    assert execution.precision == "fp32"
    assert execution.note == "precision fp16: no F16C here; running in fp32"
    fp32 = LiteRTRunner(MODEL).run({"pixels": PIXELS})["probabilities"]
    np.testing.assert_array_equal(runner.run({"pixels": PIXELS})["probabilities"], fp32)


def test_fp32_stays_the_interpreter_with_its_exact_bits() -> None:
    runner, execution = load_runner(MODEL, 1, "cpu", "partitioned", None, "fp32")
    assert execution.precision == "fp32" and not execution.note
    fp32 = LiteRTRunner(MODEL).run({"pixels": PIXELS})["probabilities"]
    np.testing.assert_array_equal(runner.run({"pixels": PIXELS})["probabilities"], fp32)
