"""The C library through ctypes, its file name looked up once per process.

`ctypes.util.find_library` runs `ldconfig -p` in a child process and parses its output: about
2 ms each time on the machine of bench/RESULTS.md, and a model process looked it up five times
on its way into its sandbox. `model_process.die_with_parent`, the first thing a spawner and a
fresh model process do, looks it up, so a process forked by a spawner never does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def name() -> str | None:
    """The C library's file name (None where it cannot be found: ctypes then opens the
    program itself, whose symbols include the C library's)."""
    return ctypes.util.find_library("c")


def handle() -> ctypes.CDLL:
    """A handle of the caller's own (the `argtypes` and `restype` it sets on a function are
    its own), with errno kept for `ctypes.get_errno`."""
    return ctypes.CDLL(name(), use_errno=True)
