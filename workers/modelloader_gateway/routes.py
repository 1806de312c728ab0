"""The route table: which endpoints serve each (origin, model, version), and who may call.

The control plane decides it (the planner's output, with the access table beside it) and
publishes it whole; a gateway routes from the table it was given and nothing else (after Ray
Serve, whose controller pushes running replicas to its proxies). `modelloader local` hands the
table over in its own process, the operator through a detached Ray actor (`route_board`), which
also keeps the last table for a gateway that starts while the operator is away.

Every lookup names the caller's origin, so a caller can never reach another origin's model:
the caller's bearer token decides which origin it acts for (`access`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from modelloader_workers.wire.address import Address
from modelloader_workers.wire.signature import Signature

from modelloader_gateway.access import AccessTable

# The only version a LoadedModel has: a changed spec replaces the model in place (the rollout
# is invisible to clients), so a client pinning "1" keeps working across updates.
MODEL_VERSION = "1"
EndpointState = Literal["ready", "draining"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One replica's data-path listener."""

    address: Address
    replica: str  # the replica's worker id: stable while it lives
    state: EndpointState = "ready"  # draining: finishes what it has, takes nothing new
    weight: float = 1.0
    accelerator: str = "cpu"  # what runs it (cpu after a fallback): labels its busy time


@dataclass(frozen=True, slots=True)
class Route:
    origin: str
    name: str
    version: str = MODEL_VERSION
    endpoints: tuple[Endpoint, ...] = ()
    message: str = ""  # why nothing serves it, when nothing does
    signature: Signature | None = None
    # Where it runs (node, accelerator, delegate): shown only to origins whose policy says so.
    placement: Mapping[str, Any] | None = None
    # Scaled to zero: a request is held while a replica starts, not refused.
    wakes: bool = False

    @property
    def ready(self) -> bool:
        return any(e.state == "ready" for e in self.endpoints)


@dataclass(frozen=True)
class RouteTable:
    """Everything a gateway needs, published at once: lookups never see half an update."""

    routes: tuple[Route, ...] = ()
    access: AccessTable = field(default_factory=AccessTable)
    revision: int = 0  # grows with every table the control plane publishes


class Routes:
    """The table a gateway routes from now; replaced whole by `publish`."""

    def __init__(self) -> None:
        self._table = RouteTable()
        self._by_name: dict[tuple[str, str], Route] = {}
        self.published = False  # whether any table has arrived

    def publish(self, table: RouteTable) -> None:
        self._by_name = {(r.origin, r.name): r for r in table.routes}
        self._table = table
        self.published = True

    @property
    def table(self) -> RouteTable:
        return self._table

    @property
    def access(self) -> AccessTable:
        return self._table.access

    def lookup(self, origin: str, name: str) -> Route | None:
        return self._by_name.get((origin, name))

    def addresses(self) -> set[Address]:
        return {e.address for r in self._table.routes for e in r.endpoints}
