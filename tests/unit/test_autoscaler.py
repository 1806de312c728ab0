"""The autoscaler on synthetic load curves: the decisions as a function of time, each run
through the same memory the control loop keeps (`scaling.Scaler`), on a fake clock."""

from __future__ import annotations

import itertools
import math

import pytest
from modelloader.autoscaler import LoadSample, decide
from modelloader.resource import Autoscaling, LoadedModel, LoadedModelSpec, Source
from modelloader.scaling import Scaler
from modelloader_gateway.load import Load

SPEC = Autoscaling(
    max_replicas=5,
    min_replicas=1,
    target_in_flight=2.0,
    scale_down_delay_seconds=10.0,
    scale_to_zero_after_seconds=30.0,
)


def model(spec: Autoscaling = SPEC) -> LoadedModel:
    return LoadedModel("ns", "m", LoadedModelSpec("ns", Source("file:///m"), autoscaling=spec))


def run(curve: list[float], spec: Autoscaling = SPEC, step: float = 0.5) -> list[int]:
    """Replicas decided after each sample of in-flight `curve` (one sample every `step` s;
    a sample with load counts one request, none without)."""
    scaler = Scaler()
    m = model(spec)
    decided = []
    current = 1
    for i, in_flight in enumerate(curve):
        loads = {("ns", "m"): Load(in_flight, 1 if in_flight > 0 else 0)}
        scale, _ = scaler.update([m], loads, {m.key: current}, now=i * step)
        current = scale[m.key]
        decided.append(current)
    return decided


def test_a_step_up_scales_up_within_the_up_window() -> None:
    decided = run([1.0] * 10 + [8.0] * 10)
    assert decided[9] == 1
    # Up as the short window's average rises: all the way within UP_WINDOW_SECONDS (3 s).
    assert decided[10:] == sorted(decided[10:]) and decided[11] >= 2
    assert decided[16] == 4  # 8 in flight at 2 each


def test_a_dip_shorter_than_the_delay_does_not_scale_down() -> None:
    curve = [8.0] * 20 + [0.5] * 10 + [8.0] * 10  # a 5 s dip, under the 10 s delay
    decided = run(curve)
    assert min(decided[20:]) == 4


def test_a_lasting_drop_scales_down_after_the_delay_only() -> None:
    curve = [8.0] * 20 + [2.0] * 40  # 2 in flight needs 1
    decided = run(curve)
    drop = 20
    # Not before the delay (10 s = 20 samples) has passed with the lower load...
    assert all(d == 4 for d in decided[drop : drop + 19])
    # ...and then to what the window needs.
    assert decided[-1] == 1


def test_never_outside_min_and_max() -> None:
    assert max(run([1000.0] * 10)) == SPEC.max_replicas
    assert min(run([0.0] * 200)) == SPEC.min_replicas


def test_idle_goes_to_zero_only_with_min_zero_and_after_the_idle_time() -> None:
    spec = Autoscaling(
        max_replicas=3,
        min_replicas=0,
        target_in_flight=1.0,
        scale_down_delay_seconds=2.0,
        scale_to_zero_after_seconds=10.0,
    )
    decided = run([1.0] * 4 + [0.0] * 40, spec)
    idle_from = 4
    zero_at = decided.index(0)
    assert (zero_at - idle_from) * 0.5 >= spec.scale_to_zero_after_seconds - 0.5
    assert all(d == 1 for d in decided[idle_from:zero_at])
    assert decided[-1] == 0


def test_a_request_for_a_model_at_zero_wakes_it_at_once() -> None:
    spec = Autoscaling(max_replicas=3, min_replicas=0, scale_to_zero_after_seconds=1.0)
    decision = decide(spec, [LoadSample(100.0, 0.5, 1)], current=0, now=100.0, since=0.0)
    assert decision.replicas == 1
    quiet = decide(spec, [LoadSample(100.0, 0.0, 0)], current=0, now=100.0, since=99.0)
    assert quiet.replicas == 0  # a control plane that just started does not wake it


def test_a_restarted_control_plane_keeps_what_the_last_one_decided() -> None:
    scaler = Scaler()
    m = model(Autoscaling(max_replicas=3, min_replicas=0))
    scale, changes = scaler.update([m], {}, {}, now=0.0, hints={m.key: 0})
    assert scale[m.key] == 0 and changes == []  # scaled to zero stays there
    scale, changes = Scaler().update([m], {}, {m.key: 3}, now=0.0, hints={m.key: 3})
    assert scale[m.key] == 3 and changes == []  # and a scaled-up one is not shrunk at once


@pytest.mark.parametrize(
    ("load", "target"), list(itertools.product((0.5, 1.0, 3.0, 7.5, 20.0), (1.0, 2.0, 4.0)))
)
def test_a_steady_load_settles_on_ceil_of_load_over_target(load: float, target: float) -> None:
    spec = Autoscaling(
        max_replicas=50, min_replicas=1, target_in_flight=target, scale_down_delay_seconds=5.0
    )
    decided = run([load] * 60, spec)
    assert decided[-1] == max(1, math.ceil(load / target))
    # Monotone on a steady load: it settles once, it does not flap.
    assert decided == sorted(decided)


def test_every_change_is_reported_once_with_a_reason() -> None:
    scaler = Scaler()
    m = model()
    reported = []
    current = 1
    for i, load in enumerate([1.0] * 4 + [9.0] * 4 + [1.0] * 40):
        scale, changes = scaler.update([m], {("ns", "m"): Load(load, 1)}, {m.key: current}, i)
        current = scale[m.key]
        reported += changes
    ups = [c for c in reported if c.after > c.before]
    downs = [c for c in reported if c.after < c.before]
    assert ups and ups[-1].after == 5 and [c.before for c in ups[1:]] == [c.after for c in ups[:-1]]
    assert [(c.before, c.after) for c in downs] == [(5, 1)]  # once the delay has passed
    assert all(c.reason for c in reported)
