"""How many replicas a model with `spec.autoscaling` wants, from the load the gateways report.
Pure: samples in, a decision out; the control loop keeps the samples.

After Knative's KPA and Ray Serve's policy: the signal is requests in flight (admitted and not
yet answered, those a gateway holds for a model scaled to zero included), averaged over each
gateway's reporting interval, about `targetInFlight` per replica.

- Up at once: to what the last `UP_WINDOW_SECONDS` of load needs (a burst is not made to wait
  for a long average).
- Down with hysteresis: never below what any sample of the last `scaleDownDelaySeconds` needed,
  so a load that dips and comes back does not cost a stop and a start.
- To zero (`minReplicas: 0`) after `scaleToZeroAfterSeconds` with nothing in flight and no
  request; from zero as soon as a request is held.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from modelloader.resource import Autoscaling

# The window a scale-up decision averages over: a few gateway reports.
UP_WINDOW_SECONDS = 3.0


@dataclass(frozen=True)
class LoadSample:
    """One gateway interval's load on one model, summed over gateways."""

    at: float  # when the interval ended (the control loop's clock)
    in_flight: float  # mean requests in flight over the interval
    requests: int = 0  # requests that arrived during it


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str


def decide(
    spec: Autoscaling,
    samples: Sequence[LoadSample],
    current: int,
    now: float,
    since: float,
) -> Decision:
    """Replicas wanted now. `current`: what runs (or was last decided); `since`: when this
    model's samples began (a control plane that just started has seen no idle time yet)."""
    target = spec.target_in_flight
    recent = [s for s in samples if now - s.at <= UP_WINDOW_SECONDS]
    held = [s for s in samples if now - s.at <= spec.scale_down_delay_seconds]
    up = _needed(sum(s.in_flight for s in recent) / len(recent), target) if recent else 0
    # The most any sample of the delay window needed: the floor for scaling down.
    floor = max((_needed(s.in_flight, target) for s in held), default=0)
    busy = any(s.in_flight > 0 or s.requests > 0 for s in samples if s.at >= now - _idle(spec))
    if up > current:
        wanted, reason = up, f"{_load(recent)} in flight needs {up} at {target:g} each"
    elif floor < current and now - since >= spec.scale_down_delay_seconds:
        wanted = floor
        reason = f"at most {floor} needed over the last {spec.scale_down_delay_seconds:g} s"
    else:
        wanted, reason = current, "steady"
    if wanted == 0 and current > 0:
        if busy or now - since < _idle(spec):
            wanted, reason = 1, "requests within the scale-to-zero time" if busy else "steady"
        else:
            reason = f"no request for {spec.scale_to_zero_after_seconds:g} s"
    bounded = max(spec.min_replicas, min(spec.max_replicas, wanted))
    if bounded != wanted:
        reason += f"; held within [{spec.min_replicas}, {spec.max_replicas}]"
    return Decision(bounded, reason)


def _needed(in_flight: float, target: float) -> int:
    # A hair of tolerance: an average of exactly twice the target needs 2, not 3.
    return math.ceil(in_flight / target - 1e-9) if in_flight > 0 else 0


def _idle(spec: Autoscaling) -> float:
    """How long a model must see no request before it may go to zero."""
    return max(spec.scale_to_zero_after_seconds, 0.0)


def _load(samples: Sequence[LoadSample]) -> str:
    return f"{sum(s.in_flight for s in samples) / max(1, len(samples)):.1f}"
