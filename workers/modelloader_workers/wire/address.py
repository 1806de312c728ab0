"""Where a data-path listener is: `unix:/path` on one machine, `tcp:host:port` across nodes.
One type parses and formats both, for the worker that listens, the control plane that
publishes the address and the gateway that connects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["unix", "tcp"]


class AddressError(ValueError):
    """Not `unix:/path`, `tcp:host:port`, or for a listener, `tcp:host`."""


@dataclass(frozen=True, slots=True)
class Address:
    kind: Kind
    where: str  # the socket's path, or the host
    port: int = 0  # tcp only; 0 for a listener: the kernel chooses

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.where}"
        return f"tcp:{self.where}:{self.port}" if self.port else f"tcp:{self.where}"

    @staticmethod
    def parse(text: str) -> Address:
        kind, _, where = text.partition(":")
        if kind == "unix" and where:
            return Address("unix", where)
        if kind == "tcp" and where:
            host, colon, port = where.rpartition(":")
            if not colon:
                return Address("tcp", where)
            if host and port.isdigit() and 0 < int(port) < 65536:
                return Address("tcp", host, int(port))
        raise AddressError(f"{text!r} is not an address: use unix:/path or tcp:host:port")

    def reachable_at(self, host: str) -> Address:
        """A TCP listener on every interface, as reached from elsewhere: at `host`."""
        if self.kind == "tcp" and self.where in ("0.0.0.0", "::"):
            return Address("tcp", host, self.port)
        return self
