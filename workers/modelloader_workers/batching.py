"""Dynamic batching's decisions: which waiting requests one invoke runs, and when. Pure (no
sockets, no clock of its own), so every rule is tested without a worker.

The rules are Triton's dynamic batcher's, on the worker's single serving thread:
- Requests run in the order they came. A batch is the oldest waiting request and the ones
  after it with the same shapes (every dimension but the batch's, and the same outputs asked
  for), taken in order while their items fit `max_batch_size`. A request of other shapes
  waits for a batch of its own.
- A batch runs at once when it is full (or the next request of its shapes would overflow
  it), or when it reaches one of `preferred_batch_sizes`; otherwise when its oldest request
  has waited `max_queue_delay_seconds`. With no delay, the
  requests that arrived while the interpreter ran the last batch make up the next one.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPolicy:
    """`spec.batching`, as the worker takes it."""

    max_batch_size: int
    max_queue_delay_seconds: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Waiting:
    """What the decision needs of a waiting request."""

    key: Hashable  # requests of equal keys may share an invoke
    items: int  # its batch dimension
    arrived: float  # when it was read, on the caller's clock


@dataclass(frozen=True)
class Run:
    """Run these requests (positions in the waiting list, in order) as one invoke."""

    take: tuple[int, ...]


@dataclass(frozen=True)
class Wait:
    """Nothing to run yet: look again within `seconds`, or sooner if a request arrives."""

    seconds: float


def next_batch(waiting: Sequence[Waiting], policy: BatchPolicy, now: float) -> Run | Wait | None:
    """The next invoke for `waiting` (in arrival order), or None when nothing waits."""
    if not waiting:
        return None
    oldest = waiting[0]
    take: list[int] = []
    items = 0
    for position, request in enumerate(waiting):
        if request.key != oldest.key:
            continue
        if take and items + request.items > policy.max_batch_size:
            return Run(tuple(take))  # the next one does not fit: nothing can join, so run
        take.append(position)
        items += request.items
        if items == policy.max_batch_size:
            return Run(tuple(take))
    waited = now - oldest.arrived
    if items in policy.preferred_batch_sizes or waited >= policy.max_queue_delay_seconds:
        return Run(tuple(take))
    return Wait(policy.max_queue_delay_seconds - waited)
