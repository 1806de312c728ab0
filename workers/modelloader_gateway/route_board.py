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
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayError

from modelloader_gateway.routes import RouteTable

log = logging.getLogger(__name__)

BOARD_NAME = "route-table"
SYSTEM_NAMESPACE = "modelloader-system"
# A gateway's long poll returns at least this often, so a board that went away is noticed.
POLL_SECONDS = 10.0


class RouteBoard:
    """Holds the last table (a Ray actor). Revisions are stamped here, from the clock, so
    they keep growing across operator restarts and differ from any a gateway holds."""

    def __init__(self) -> None:
        self._table: RouteTable | None = None
        self._changed = asyncio.Event()

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
            await asyncio.wait_for(changed.wait(), timeout)
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
    """The operator's side: publish a table for every gateway of the cluster."""

    def __init__(self) -> None:
        self._board: Any = None

    async def publish(self, table: RouteTable) -> None:
        if self._board is None:
            self._board = await asyncio.to_thread(_board, True)
        try:
            await asyncio.wait_for(self._board.put.remote(table), 30)
        except (RayError, TimeoutError):
            self._board = None  # looked up again next time (its node may have gone)
            raise


async def follow(publish: Callable[[RouteTable], None], stop: asyncio.Event) -> None:
    """A gateway's side: hand every new table to `publish` until `stop` is set."""
    board: Any = None
    revision: int | None = None
    while not stop.is_set():
        try:
            if board is None:
                board = await asyncio.to_thread(_board, False)
            table = await asyncio.wait_for(
                board.newer.remote(revision, POLL_SECONDS), POLL_SECONDS + 20
            )
        except (ValueError, RayError, TimeoutError) as error:
            # No board yet (no operator has published), or it went away: keep the last table.
            if board is not None:
                log.warning("the route table's board is unreachable: %s", error)
            board = None
            await _pause(stop, 1.0)
            continue
        if table is not None:
            revision = table.revision
            publish(table)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
