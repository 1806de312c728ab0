"""The load a gateway sees per model: requests in flight (held ones included) averaged over
time, and requests arrived. The control plane's autoscaler reads it (in the same process for
`modelloader local`, through the route board from every gateway of a cluster)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

Key = tuple[str, str]  # (origin, model name)


@dataclass(frozen=True)
class Load:
    in_flight: float  # mean requests in flight over the interval
    requests: int  # requests that arrived during it


class LoadMeter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since = clock()
        self._in_flight: dict[Key, int] = {}
        self._area: dict[Key, float] = {}  # in-flight x seconds since the interval began
        self._changed: dict[Key, float] = {}  # when each count last changed
        self._requests: dict[Key, int] = {}

    def enter(self, key: Key) -> None:
        self._move(key, +1)
        self._requests[key] = self._requests.get(key, 0) + 1

    def leave(self, key: Key) -> None:
        self._move(key, -1)

    def in_flight(self, key: Key) -> int:
        return self._in_flight.get(key, 0)

    def _move(self, key: Key, step: int) -> None:
        now = self._clock()
        count = self._in_flight.get(key, 0)
        self._area[key] = self._area.get(key, 0.0) + count * (now - self._changed.get(key, now))
        self._changed[key] = now
        if count + step > 0:
            self._in_flight[key] = count + step
        else:
            self._in_flight.pop(key, None)

    def report(self) -> dict[Key, Load]:
        """The interval since the last report, per model that saw load; a new one begins."""
        now = self._clock()
        seconds = max(now - self._since, 1e-9)
        out: dict[Key, Load] = {}
        for key in {*self._area, *self._in_flight, *self._requests}:
            count = self._in_flight.get(key, 0)
            area = self._area.get(key, 0.0) + count * (now - self._changed.get(key, now))
            out[key] = Load(area / seconds, self._requests.get(key, 0))
        self._since = now
        self._area.clear()
        self._requests.clear()
        self._changed = dict.fromkeys(self._in_flight, now)
        return out
