"""The C library through ctypes: its name looked up once a process, a handle per caller."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
from collections.abc import Iterator

import pytest
from modelloader_workers import c_library


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names `find_library` is asked for, from a clean cache."""
    asked: list[str] = []
    real = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        asked.append(name)
        return real(name)

    c_library.name.cache_clear()
    monkeypatch.setattr(ctypes.util, "find_library", find_library)
    yield asked
    c_library.name.cache_clear()


def test_the_c_library_is_looked_up_once_a_process(lookups: list[str]) -> None:
    # find_library runs `ldconfig -p` in a child process each time it is asked.
    for _ in range(5):
        assert c_library.handle().getpid() > 0
    assert lookups == ["c"]


def test_each_caller_gets_a_handle_of_its_own(lookups: list[str]) -> None:
    first, second = c_library.handle(), c_library.handle()
    first.syscall.restype = ctypes.c_long
    assert first is not second
    assert second.syscall.restype is ctypes.c_int  # what one caller declares stays its own


def test_a_handle_keeps_errno_for_get_errno(lookups: list[str]) -> None:
    assert c_library.handle().close(-1) == -1
    assert ctypes.get_errno() == errno.EBADF
