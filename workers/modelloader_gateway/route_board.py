"""The gateway's one adapter to Ray: the route table's channel on a cluster.

The operator publishes each new table to a named, detached actor (`RouteBoard`); every gateway
long-polls it and routes from what it gets. The actor outlives the operator, so a gateway that
starts, or keeps running, while the operator is away serves the last table published. Gateways
need no Kubernetes API access at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayError

from modelloader_gateway.load import Key, Load
from modelloader_gateway.routes import RouteTable

log = logging.getLogger(__name__)

BOARD_NAME = "route-table"
SYSTEM_NAMESPACE = "modelloader-system"
# A gateway's long poll returns at least this often, so a board that went away is noticed.
POLL_SECONDS = 10.0
# How often a gateway reports its load, and how old a report may be and still count.
REPORT_SECONDS = 1.0
STALE_REPORT_SECONDS = 10.0


class RouteBoard:
    """Holds the last table (a Ray actor). Revisions are stamped here, from the clock, so
    they keep growing across operator restarts and differ from any a gateway holds."""

    def __init__(self) -> None:
        self._table: RouteTable | None = None
        self._changed = asyncio.Event()
        # gateway -> when it last reported, its models' mean in flight, requests not yet read
        self._in_flight: dict[str, tuple[float, dict[Key, float]]] = {}
        self._requests: dict[Key, int] = {}
        self._reported = asyncio.Event()

    async def report(self, gateway: str, loads: dict[Key, Load]) -> None:
        self._in_flight[gateway] = (time.monotonic(), {k: v.in_flight for k, v in loads.items()})
        for key, load in loads.items():
            self._requests[key] = self._requests.get(key, 0) + load.requests
        self._reported.set()

    async def load(self) -> dict[Key, Load]:
        """Every fresh gateway's last report summed, and the requests since the last read."""
        now = time.monotonic()
        summed: dict[Key, float] = {}
        for gateway, (at, loads) in list(self._in_flight.items()):
            if now - at > STALE_REPORT_SECONDS:
                del self._in_flight[gateway]
                continue
            for key, value in loads.items():
                summed[key] = summed.get(key, 0.0) + value
        out = {
            key: Load(summed.get(key, 0.0), self._requests.get(key, 0))
            for key in {*summed, *self._requests}
        }
        self._requests.clear()
        self._reported.clear()
        return out

    async def put(self, table: RouteTable) -> int:
        revision = max(time.time_ns(), (self._table.revision + 1) if self._table else 0)
        self._table = RouteTable(table.routes, table.access, revision)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return revision

    async def get(self) -> RouteTable | None:
        return self._table

    async def newer(self, revision: int | None, timeout: float) -> RouteTable | None:
        """The table, once it differs from `revision`; None if none came within `timeout`."""
        if self._table is not None and self._table.revision != revision:
            return self._table
        changed = self._changed
        try:
            async with asyncio.timeout(timeout):  # keeps a cancel (see `_pause`)
                await changed.wait()
        except TimeoutError:
            return None
        return self._table


async def connect(address: str | None, role: str) -> None:
    """Join the cluster at `address` (else RAY_ADDRESS's "auto") unless already connected."""
    if not ray.is_initialized():
        await asyncio.to_thread(
            ray.init,
            address=address or "auto",
            log_to_driver=False,
            namespace=f"modelloader-{role}",
        )


def _board(create: bool) -> Any:
    if create:
        return (
            ray.remote(RouteBoard)
            .options(
                name=BOARD_NAME,
                namespace=SYSTEM_NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
            )
            .remote()
        )
    return ray.get_actor(BOARD_NAME, SYSTEM_NAMESPACE)


class RayRouteChannel:
    """The operator's side: publish a table for every gateway of the cluster, and read the
    load they report."""

    def __init__(self) -> None:
        self._board: Any = None

    async def _call(self, method: str, *args: Any) -> Any:
        if self._board is None:
            self._board = await asyncio.to_thread(_board, True)
        try:
            return await asyncio.wait_for(getattr(self._board, method).remote(*args), 30)
        except (RayError, TimeoutError):
            self._board = None  # looked up again next time (its node may have gone)
            raise

    async def publish(self, table: RouteTable) -> None:
        await self._call("put", table)

    async def load(self) -> dict[Key, Load]:
        loads: dict[Key, Load] = await self._call("load")
        return loads


async def follow(
    publish: Callable[[RouteTable], None],
    stop: asyncio.Event,
    report: Callable[[], dict[Key, Load]] | None = None,
    urgent: asyncio.Event | None = None,
) -> None:
    """A gateway's side: hand every new table to `publish` until `stop` is set; with
    `report`, send the gateway's load to the board every `REPORT_SECONDS`, and at once
    when `urgent` is set (a request held for a model scaled to zero)."""
    reporting = (
        asyncio.ensure_future(_report(report, stop, urgent or asyncio.Event()))
        if report is not None
        else None
    )
    board: Any = None
    revision: int | None = None
    try:
        while not stop.is_set():
            try:
                if board is None:
                    board = await asyncio.to_thread(_board, False)
                newer = asyncio.ensure_future(
                    asyncio.wait_for(board.newer.remote(revision, POLL_SECONDS), POLL_SECONDS + 20)
                )
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({newer, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if not newer.done():
                    newer.cancel()
                    break
                table = newer.result()
            except (ValueError, RayError, TimeoutError) as error:
                # No board yet (no operator has published), or it went away: keep the table.
                if board is not None:
                    log.warning("the route table's board is unreachable: %s", error)
                board = None
                await _pause(stop, 1.0)
                continue
            if table is not None:
                revision = table.revision
                publish(table)
    finally:
        if reporting is not None:
            reporting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporting


async def _report(
    report: Callable[[], dict[Key, Load]], stop: asyncio.Event, urgent: asyncio.Event
) -> None:
    name = f"gateway-{uuid.uuid4().hex[:12]}"
    board: Any = None
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REPORT_SECONDS):  # keeps a cancel (see `_pause`)
                await urgent.wait()
        urgent.clear()
        loads = report()
        try:
            if board is None:
                board = await asyncio.to_thread(_board, False)
            await asyncio.wait_for(board.report.remote(name, loads), 10)
        except (ValueError, RayError, TimeoutError):
            board = None  # no operator yet: its load is of no use to anyone


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    # Not asyncio.wait_for: on Python 3.11 a cancel that arrives as the event is set is
    # swallowed, and a loop around this would not stop.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
