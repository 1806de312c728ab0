"""Whether this node can run a model in half precision, decided from what its CPU offers.

`precision: fp16` on the CPU asks XNNPACK to force half-precision inference
(TFLITE_XNNPACK_DELEGATE_FLAG_FORCE_FP16 in LiteRT's xnnpack_delegate.h). XNNPACK has
half-precision kernels on x86-64 with AVX2 and F16C, and on ARM64 with the FP16 arithmetic
extension (`asimdhp` in /proc/cpuinfo); elsewhere it cannot, and the model runs in fp32 with a
`Degraded` reason saying why, rather than a setting that silently does nothing.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from pathlib import Path

XNNPACK_FORCE_FP16 = 0x00000004
X86 = ("x86_64", "amd64")
ARM64 = ("aarch64", "arm64")


def cpu_fp16_problem(machine: str, flags: Iterable[str]) -> str | None:
    """Why XNNPACK cannot run half precision on this CPU, or None when it can."""
    have = {f.lower() for f in flags}
    machine = machine.lower()
    if machine in X86:
        missing = sorted({"avx2", "f16c"} - have)
        if not missing:
            return None
        return (
            f"this node's CPU lacks {' and '.join(m.upper() for m in missing)}, which "
            "XNNPACK's half-precision kernels need"
        )
    if machine in ARM64:
        if "asimdhp" in have:
            return None
        return "this node's CPU lacks FP16 arithmetic (asimdhp), which XNNPACK needs"
    return f"XNNPACK has no half-precision kernels for {machine or 'this CPU'}"


def host_fp16_problem() -> str | None:
    return cpu_fp16_problem(platform.machine(), _cpu_flags())


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags
