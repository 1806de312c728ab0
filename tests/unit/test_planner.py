"""The planner, without Ray: every combination of worker observations for one model,
plus the cases that involve several models."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta

import pytest
from modelloader.placement import PlacementConfig
from modelloader.planner import StartWorker, StopWorker, WorkerState, WorkerView, plan
from modelloader.policy import OriginPolicy, policies
from modelloader.quota import DEFAULT_MODEL_MEMORY
from modelloader.resource import LoadedModel, LoadedModelSpec, Source
from modelloader.status import render
from modelloader_workers.wire.address import Address
from modelloader_workers.wire.placement import Placement
from modelloader_workers.wire.signature import Signature, TensorSpec

CPU_ONLY = {"CPU": 2.0}
STATES: tuple[WorkerState | None, ...] = (None, "starting", "ready", "failed", "dead")


def model(
    name: str = "m",
    origin: str = "default",
    namespace: str = "default",
    uri: str = "file:///m.tflite",
    accelerator: str = "cpu",
    generation: int = 1,
) -> LoadedModel:
    spec = LoadedModelSpec(origin=origin, source=Source(uri), accelerator=accelerator)  # type: ignore[arg-type]
    return LoadedModel(namespace, name, spec, generation)


def view(
    m: LoadedModel,
    state: WorkerState,
    wid: str | None = None,
    *,
    fingerprint: str | None = None,
    generation: int | None = None,
) -> WorkerView:
    return WorkerView(
        id=wid or f"w-{state}",
        key=m.key,
        fingerprint=fingerprint or m.fingerprint,
        generation=generation or m.generation,
        state=state,
        message="boom" if state in ("failed", "dead") else "",
        signature=Signature((), ()) if state == "ready" else None,
        address=Address("unix", f"/{wid}") if state == "ready" else None,
    )


def test_new_model_starts_a_worker() -> None:
    m = model()
    result = plan([m], [], CPU_ONLY)
    assert result.effects == (StartWorker(m, "cpu", {}, memory_limit=DEFAULT_MODEL_MEMORY),)
    assert result.states[m.key].phase == "Loading"


@pytest.mark.parametrize(("current", "older"), list(itertools.product(STATES, STATES)))
def test_every_combination_of_current_and_older_worker(
    current: WorkerState | None, older: WorkerState | None
) -> None:
    """An update in flight: an older generation's worker and maybe one for the current spec."""
    old_model = model(uri="file:///old.tflite", generation=1)
    m = model(generation=2)
    workers = []
    if older is not None:
        workers.append(view(old_model, older, "old"))
    if current is not None:
        workers.append(view(m, current, "new"))
    result = plan([m], workers, CPU_ONLY)
    state = result.states[m.key]
    stops = {e.worker_id for e in result.effects if isinstance(e, StopWorker)}
    starts = [e for e in result.effects if isinstance(e, StartWorker)]

    # Traffic goes to the current spec's worker once it is ready, else to a ready older one.
    serving = [w.id for w in state.serving]
    if current == "ready":
        assert serving == ["new"]
    elif older == "ready":
        assert serving == ["old"]
    else:
        assert serving == []
    # Ready exactly when something serves.
    assert (state.phase == "Ready") == bool(serving)
    # The old worker stops once the new one serves; it is never stopped while it is all we have.
    if older == "ready":
        assert ("old" in stops) == (current == "ready")
    elif older is not None:
        assert "old" in stops or (current is None and older == "starting")
    # A worker for the current spec is started when there is none, or after it died.
    assert bool(starts) == (current in (None, "dead"))
    # A failed load is final until the spec changes: no retry, and Failed unless old serves.
    if current == "failed":
        assert state.phase == ("Ready" if older == "ready" else "Failed")
        assert "boom" in state.message
    # Nothing that serves is ever stopped.
    assert not set(serving) & stops


def test_a_replacement_after_a_death_is_degraded_until_it_serves() -> None:
    m = model()
    replacement = dataclasses.replace(view(m, "starting", "w.r1"), restarts=1)
    state = plan([m], [replacement], CPU_ONLY).states[m.key]
    assert state.phase == "Loading" and state.conditions.degraded[:2] == (True, "WorkerRestarting")
    serving = dataclasses.replace(view(m, "ready", "w.r1"), restarts=1)
    assert plan([m], [serving], CPU_ONLY).states[m.key].conditions.degraded.status is False


def test_removed_model_stops_its_workers() -> None:
    m = model()
    result = plan([], [view(m, "ready", "a"), view(m, "starting", "b")], CPU_ONLY)
    assert {e.worker_id for e in result.effects if isinstance(e, StopWorker)} == {"a", "b"}


def test_failed_model_does_not_disturb_others() -> None:
    good, bad = model("good"), model("bad")
    result = plan([good, bad], [view(good, "ready", "g"), view(bad, "failed", "b")], CPU_ONLY)
    assert result.effects == ()
    assert result.states[good.key].phase == "Ready"
    assert result.states[bad.key].phase == "Failed"


def test_name_clash_within_an_origin_fails_the_later_model() -> None:
    first = model("same", namespace="a", origin="shop")
    second = model("same", namespace="b", origin="shop")
    other_origin = model("same", namespace="c", origin="elsewhere")
    bound = policies(
        OriginPolicy(""),
        [OriginPolicy("shop", namespaces=("a", "b")), OriginPolicy("elsewhere", ("c",))],
    )
    result = plan([first, second, other_origin], [], CPU_ONLY, policies=bound)
    assert result.states[second.key].phase == "Failed"
    assert "a/same" in result.states[second.key].message
    assert {e.model.key for e in result.effects if isinstance(e, StartWorker)} == {
        first.key,
        other_origin.key,
    }


def test_gpu_without_gpu_nodes_waits_pending_then_starts() -> None:
    m = model(accelerator="gpu")
    waiting = plan([m], [], CPU_ONLY)
    assert waiting.effects == ()
    state = waiting.states[m.key]
    assert state.phase == "Pending"
    assert (
        state.conditions.scheduled.status is False and "GPU" in state.conditions.scheduled.message
    )
    later = plan([m], [], {**CPU_ONLY, "GPU": 1.0})
    assert later.effects == (
        StartWorker(m, "gpu", {"GPU": 1.0}, memory_limit=DEFAULT_MODEL_MEMORY),
    )


def test_auto_takes_the_best_accelerator_offered() -> None:
    m = model(accelerator="auto")
    assert plan([m], [], {"CPU": 1, "GPU": 1}).effects == (
        StartWorker(m, "gpu", {"GPU": 1.0}, memory_limit=DEFAULT_MODEL_MEMORY),
    )
    assert plan([m], [], {"CPU": 1, "NPU": 2}).effects == (
        StartWorker(m, "npu", {"NPU": 1.0}, memory_limit=DEFAULT_MODEL_MEMORY),
    )
    assert plan([m], [], {"CPU": 1}).effects == (
        StartWorker(m, "cpu", {}, memory_limit=DEFAULT_MODEL_MEMORY),
    )


def test_cpu_workers_can_be_pinned_to_cpu_nodes() -> None:
    config = PlacementConfig(cpu_resource="modelloader-cpu", npu_resource="vendor.com/npu")
    m, n = model("m", accelerator="cpu"), model("n", accelerator="npu")
    result = plan([m, n], [], {"CPU": 4, "modelloader-cpu": 100, "vendor.com/npu": 1}, config)
    assert result.effects == (
        StartWorker(m, "cpu", {"modelloader-cpu": 1.0}, memory_limit=DEFAULT_MODEL_MEMORY),
        StartWorker(n, "npu", {"vendor.com/npu": 1.0}, memory_limit=DEFAULT_MODEL_MEMORY),
    )
    waiting = plan([m], [], {"CPU": 4}, config)
    assert waiting.states[m.key].phase == "Pending"
    assert "modelloader-cpu" in waiting.states[m.key].message


def test_condition_times_move_only_on_change() -> None:
    m = model()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    loading = render(m, plan([m], [view(m, "starting", "w")], CPU_ONLY).states[m.key], None, t0)
    ready = render(
        m,
        plan([m], [view(m, "ready", "w")], CPU_ONLY).states[m.key],
        loading,
        t0 + timedelta(seconds=5),
    )
    times = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    assert times["Scheduled"] == "2026-01-01T00:00:00Z"  # True all along
    assert times["Ready"] == "2026-01-01T00:00:05Z"  # False -> True
    assert ready["phase"] == "Ready" and ready["observedGeneration"] == 1


def test_status_shows_signature_and_placement_of_the_serving_worker() -> None:
    m = model()
    w = dataclasses.replace(
        view(m, "ready", "w"),
        signature=Signature((TensorSpec("x", "FP32", (1,)),), ()),
        placement=Placement("n", "id", "cpu", "xnnpack", 7),
        load_seconds=0.25,
    )
    status = render(m, plan([m], [w], CPU_ONLY).states[m.key], None, datetime.now(UTC))
    assert status["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1]}]
    assert status["placement"]["accelerator"] == "cpu"
    assert status["loadSeconds"] == 0.25


def test_a_crash_loop_stops_restarts_until_the_spec_changes() -> None:
    m = model()
    dead = dataclasses.replace(view(m, "dead"), recent_deaths=2)
    again = plan([m], [dead], CPU_ONLY)
    assert any(isinstance(e, StartWorker) for e in again.effects)  # twice: still restarted
    looping = dataclasses.replace(dead, recent_deaths=3, message="the worker process exited")
    result = plan([m], [looping], CPU_ONLY)
    assert result.effects == ()  # kept, not restarted
    state = result.states[m.key]
    assert state.phase == "Failed" and state.conditions.loaded.reason == "CrashLoop"
    assert "the worker process exited" in state.message
    edited = model(uri="file:///other.tflite")
    fixed = plan([edited], [dataclasses.replace(looping, key=edited.key)], CPU_ONLY)
    assert {type(e) for e in fixed.effects} == {StartWorker, StopWorker}


def test_routes_carry_the_serving_workers_endpoint_and_accelerator() -> None:
    on_gpu, waiting = model("a", accelerator="gpu"), model("b")
    serving = dataclasses.replace(
        view(on_gpu, "ready", "wa"), placement=Placement("n", "id", "gpu", "gpu", 7)
    )
    result = plan([on_gpu, waiting], [serving], {**CPU_ONLY, "GPU": 1.0})
    routes = {r.name: r for r in result.routes}
    assert [(e.address, e.replica, e.accelerator) for e in routes["a"].endpoints] == [
        (Address("unix", "/wa"), "wa", "gpu")
    ]
    assert routes["a"].ready and routes["a"].placement == {
        "node": "n",
        "nodeId": "id",
        "accelerator": "gpu",
        "delegate": "gpu",
        "pid": 7,
        "precision": "fp32",
    }
    assert not routes["b"].ready and routes["b"].endpoints == ()
    assert "loading" in routes["b"].message


# Replicas


def replicated(count: int, **spec: object) -> LoadedModel:
    m = model()
    return dataclasses.replace(m, spec=dataclasses.replace(m.spec, replicas=count, **spec))


def replica(
    m: LoadedModel, index: int, state: WorkerState = "ready", node: str = "n1", **more: object
) -> WorkerView:
    return dataclasses.replace(
        view(m, state, f"{m.generation}-{index}"),
        replica=index,
        placement=Placement(node, node, "cpu", "xnnpack", 100 + index),
        **more,
    )


def test_a_model_starts_one_worker_per_replica_and_routes_to_every_ready_one() -> None:
    m = replicated(3)
    first = plan([m], [], CPU_ONLY)
    assert [e.replica for e in first.effects if isinstance(e, StartWorker)] == [0, 1, 2]
    running = [replica(m, 0), replica(m, 1), replica(m, 2, "starting")]
    result = plan([m], running, CPU_ONLY)
    state = result.states[m.key]
    assert result.effects == () and state.phase == "Ready" and state.desired == 3
    assert [e.replica for e in result.routes[0].endpoints] == ["1-0", "1-1"]
    assert state.conditions.degraded[:2] == (True, "ReplicasUnavailable")
    assert "2 of 3 replicas ready" in state.message


def test_scaling_down_stops_the_highest_replicas_and_up_starts_the_missing_ones() -> None:
    m = replicated(1)
    running = [replica(m, 0), replica(m, 1), replica(m, 2)]
    stops = {e.worker_id for e in plan([m], running, CPU_ONLY).effects if isinstance(e, StopWorker)}
    assert stops == {"1-1", "1-2"}
    up = replicated(4)
    starts = [
        e.replica for e in plan([up], running, CPU_ONLY).effects if isinstance(e, StartWorker)
    ]
    assert starts == [3]


def test_zero_fixed_replicas_keeps_the_model_and_runs_nothing() -> None:
    m = replicated(0)
    result = plan([m], [replica(m, 0)], CPU_ONLY)
    assert [type(e) for e in result.effects] == [StopWorker]
    state = result.states[m.key]
    assert state.phase == "Pending" and state.conditions.ready.reason == "ScaledToZero"
    assert not result.routes[0].ready and not result.routes[0].wakes


def test_a_rolling_update_replaces_replicas_one_at_a_time_without_losing_capacity() -> None:
    old = replicated(3)
    new = dataclasses.replace(replicated(3, threads=2), generation=2)
    workers = [replica(old, i) for i in range(3)]
    for step in range(8):
        result = plan([new], workers, CPU_ONLY)
        state = result.states[new.key]
        serving = len(state.serving)
        assert serving >= 3, (step, state)  # never below the ready count it had
        starts = [e for e in result.effects if isinstance(e, StartWorker)]
        assert len(starts) <= 1  # a surge of one
        stopped = {e.worker_id for e in result.effects if isinstance(e, StopWorker)}
        workers = [w for w in workers if w.id not in stopped]
        # The started replica loads, and serves on the next pass.
        workers = [dataclasses.replace(w, state="ready") for w in workers]
        workers += [replica(new, s.replica, "ready") for s in starts]
    assert {w.generation for w in workers} == {2} and len(workers) == 3


def test_a_rolling_update_with_a_new_signature_switches_whole() -> None:
    old = replicated(2)
    new = dataclasses.replace(replicated(2, threads=2), generation=2)
    other = Signature((TensorSpec("y", "FP32", (1,)),), ())
    workers = [replica(old, 0), replica(old, 1), replica(new, 0, signature=other)]
    serving = plan([new], workers, CPU_ONLY).states[new.key].serving
    assert {w.generation for w in serving} == {1}  # the new one may not share traffic
    workers.append(replica(new, 1, signature=other))
    serving = plan([new], workers, CPU_ONLY).states[new.key].serving
    assert {w.generation for w in serving} == {2} and len(serving) == 2


def test_replicas_spread_over_distinct_nodes() -> None:
    from modelloader.placement import Node

    nodes = [Node(n, {"CPU": 2.0}) for n in ("a", "b", "c")]
    m = replicated(3)
    result = plan([m], [], CPU_ONLY, nodes=nodes)
    assert sorted(e.node or "" for e in result.effects if isinstance(e, StartWorker)) == [
        "a",
        "b",
        "c",
    ]
    # A replacement goes where its siblings are not.
    running = [replica(m, 0, node="a"), replica(m, 1, node="b")]
    (start,) = [
        e for e in plan([m], running, CPU_ONLY, nodes=nodes).effects if isinstance(e, StartWorker)
    ]
    assert start.node == "c"


def test_one_dead_replica_is_replaced_while_the_others_serve() -> None:
    m = replicated(2)
    dead = replica(m, 1, "dead", address=None)
    result = plan([m], [replica(m, 0), dead], CPU_ONLY)
    assert {type(e) for e in result.effects} == {StopWorker, StartWorker}
    state = result.states[m.key]
    assert state.phase == "Ready" and [w.id for w in state.serving] == ["1-0"]
    assert state.conditions.degraded[:2] == (True, "WorkerDied")


def test_quota_caps_replicas_and_says_so() -> None:
    from modelloader.policy import Quota

    capped = policies(OriginPolicy(""), [OriginPolicy("default", quota=Quota(max_workers=2))])
    m = replicated(4)
    result = plan([m], [], CPU_ONLY, policies=capped)
    assert [e.replica for e in result.effects if isinstance(e, StartWorker)] == [0, 1]
    state = result.states[m.key]
    assert state.conditions.quota_exceeded[:2] == (True, "maxWorkers")
    assert "runs 2 of 4 replicas" in state.conditions.quota_exceeded.message
    # Never more: the running two keep their place, no third starts.
    running = [replica(m, 0), replica(m, 1)]
    assert plan([m], running, CPU_ONLY, policies=capped).effects == ()


def test_an_autoscaled_model_at_zero_is_ready_and_its_route_wakes() -> None:
    from modelloader.resource import Autoscaling

    m = replicated(1)
    m = dataclasses.replace(
        m, spec=dataclasses.replace(m.spec, autoscaling=Autoscaling(max_replicas=3, min_replicas=0))
    )
    known = Signature((TensorSpec("x", "FP32", (1,)),), ())
    result = plan(
        [m], [replica(m, 0)], CPU_ONLY, scale={m.key: 0}, signatures={(m.key, m.fingerprint): known}
    )
    assert [type(e) for e in result.effects] == [StopWorker]
    state, route_ = result.states[m.key], result.routes[0]
    assert state.phase == "Ready" and state.conditions.ready.reason == "ScaledToZero"
    assert route_.wakes and not route_.endpoints and route_.signature == known
    # The autoscaler wakes it: a replica starts and the route still holds requests meanwhile.
    waking = plan([m], [], CPU_ONLY, scale={m.key: 1})
    assert [type(e) for e in waking.effects] == [StartWorker]
    starting = plan([m], [replica(m, 0, "starting")], CPU_ONLY, scale={m.key: 1})
    assert starting.routes[0].wakes
