"""A bounded memo for the data path's repeated work: a client sending the same shapes sends the
same header bytes every time, so each side parses and checks a header once."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """A bounded memo of a pure function (of a header's bytes, mostly). Cleared when full:
    the working set is a few shapes per model, and a client cycling through more only loses
    the memo, never correctness. Exceptions are not remembered."""

    def __init__(self, compute: Callable[[K], V] | None = None, size: int = 256) -> None:
        self._compute = compute
        self._size = size
        self._known: dict[K, V] = {}

    def __call__(self, key: K) -> V:
        assert self._compute is not None, "a memo without a function: use get"
        return self.get(key, self._compute)

    def get(self, key: K, compute: Callable[[K], V]) -> V:
        """The value for `key`, computed by `compute` when not remembered (for a function
        that needs more than the key, which the key must then stand for)."""
        known = self._known.get(key)
        if known is None:
            if len(self._known) >= self._size:
                self._known.clear()
            known = self._known[key] = compute(key)
        return known
