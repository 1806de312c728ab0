"""The autoscaler's memory: each autoscaled model's recent load samples and last decision,
kept by the control loop between passes (the decisions themselves are `autoscaler.decide`'s).
A restarted control plane starts from the replicas that run, and waits a full scale-down delay
before it scales anything down."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from modelloader_gateway.load import Load
from modelloader_workers.wire.identity import ModelKey

from modelloader.autoscaler import UP_WINDOW_SECONDS, LoadSample, decide
from modelloader.resource import LoadedModel


@dataclass(frozen=True)
class Scaled:
    """A change of a model's desired replicas, for an Event and a metric."""

    key: ModelKey
    origin: str
    before: int
    after: int
    reason: str


class Scaler:
    def __init__(self) -> None:
        self._samples: dict[ModelKey, deque[LoadSample]] = {}
        self._since: dict[ModelKey, float] = {}
        self._decided: dict[ModelKey, int] = {}

    def update(
        self,
        models: Sequence[LoadedModel],
        loads: Mapping[tuple[str, str], Load],
        running: Mapping[ModelKey, int],
        now: float,
        hints: Mapping[ModelKey, int] | None = None,
    ) -> tuple[dict[ModelKey, int], list[Scaled]]:
        """Desired replicas of every autoscaled model, and the changes since the last call.
        `running`: replicas of each model's current spec that run now; `hints`: what a
        previous control plane decided (from the status), for a model this one has not
        decided on yet, so that a restart neither wakes a model scaled to zero nor shrinks
        one scaled up."""
        decisions: dict[ModelKey, int] = {}
        changes: list[Scaled] = []
        seen = set()
        for model in models:
            spec = model.spec.autoscaling
            if spec is None:
                continue
            key = model.key
            seen.add(key)
            load = loads.get((model.spec.origin, model.name), Load(0.0, 0))
            samples = self._samples.setdefault(key, deque())
            samples.append(LoadSample(now, load.in_flight, load.requests))
            keep = max(
                spec.scale_down_delay_seconds, spec.scale_to_zero_after_seconds, UP_WINDOW_SECONDS
            )
            while samples and now - samples[0].at > keep:
                samples.popleft()
            since = self._since.setdefault(key, now)
            hinted = (hints or {}).get(key)
            first = hinted if hinted is not None else max(1, running.get(key, 0))
            before = self._decided.get(key, first)
            decision = decide(spec, list(samples), before, now, since)
            decisions[key] = decision.replicas
            self._decided[key] = decision.replicas
            if decision.replicas != before:
                changes.append(
                    Scaled(key, model.spec.origin, before, decision.replicas, decision.reason)
                )
        for gone in set(self._samples) - seen:
            self._samples.pop(gone, None)
            self._since.pop(gone, None)
            self._decided.pop(gone, None)
        return decisions, changes
