"""OriginPolicy parsing, namespace binding and quota admission, without Ray."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
from modelloader.planner import ProcessSlot, StartWorker, WorkerView, plan
from modelloader.policy import (
    OriginPolicy,
    Quota,
    parse_origin_policy,
    parse_policy_spec,
    policies,
)
from modelloader.quota import DEFAULT_MODEL_MEMORY, Admitted, Waiting, admit
from modelloader.resource import LoadedModel, LoadedModelSpec, ManifestError, Resources, Source
from modelloader_workers.wire.address import Address
from modelloader_workers.wire.identity import ModelKey

from tests.support.crd_schema import crd_schema, crd_validator

SCHEMA = crd_schema("originpolicy.yaml")
CPU = {"CPU": 2.0}


def lm(
    name: str,
    origin: str = "a",
    namespace: str | None = None,
    *,
    memory: int | None = None,
    accelerator: str = "cpu",
) -> LoadedModel:
    spec = LoadedModelSpec(
        origin=origin,
        source=Source(f"file:///{name}.tflite"),
        accelerator=accelerator,  # type: ignore[arg-type]
        resources=Resources(memory_bytes=memory),
    )
    return LoadedModel(namespace or origin, name, spec)


def quota(**limits: Any) -> Any:
    """Origin "a"'s policy, limits named as in the CRD (maxModels=5, memory=...)."""
    names = {"maxModels": "max_models", "maxWorkers": "max_workers", "memory": "memory_bytes"}
    fields = {names.get(k, k): v for k, v in limits.items()}
    return policies(OriginPolicy(""), [OriginPolicy("a", quota=Quota(**fields))])


def doc(spec: dict[str, Any], name: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "modelloader.dev/v1alpha1",
        "kind": "OriginPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def test_a_policy_parses_with_every_field() -> None:
    policy = parse_origin_policy(
        doc(
            {
                "namespaces": ["shop", "shop-staging"],
                "quota": {
                    "maxModels": 5,
                    "maxWorkers": 2,
                    "memory": "2Gi",
                    "cpu": "1500m",
                    "gpus": 1,
                    "npus": 0,
                    "maxModelBytes": "50Mi",
                    "requestsPerSecond": 20.5,
                    "maxConcurrentRequests": 8,
                },
                "isolation": "perOrigin",
                "exposeAcceleratorDetails": True,
                "allowAnonymous": False,
            }
        )
    )
    assert policy.origin == "shop"
    assert policy.namespaces == ("shop", "shop-staging")
    assert policy.quota == Quota(5, 2, 2 << 30, 1.5, 1, 0, 50 << 20, 20.5, 8)
    assert policy.isolation == "perOrigin" and policy.expose_accelerator_details


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"quota": {"maxModels": -1}}, "spec.quota.maxModels"),
        ({"quota": {"memory": "-1Gi"}}, "spec.quota.memory"),
        ({"quota": {"maxModles": 3}}, "spec.quota.maxModles"),
        ({"isolation": "perTenant"}, "spec.isolation"),
        ({"namespaces": ["Bad_NS"]}, "spec.namespaces"),
        ({"allowAnonymous": "yes"}, "spec.allowAnonymous"),
        ({"quota": {"requestsPerSecond": -2}}, "spec.quota.requestsPerSecond"),
    ],
)
def test_bad_policies_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ManifestError, match=field.replace(".", r"\.")):
        parse_policy_spec(spec, "shop")
    # The CRD's schema rejects the same documents (except unknown fields: the API server
    # prunes those, the parser reports them).
    if "maxModles" not in str(spec):
        errors = list(crd_validator("originpolicy.yaml").iter_errors(doc(spec)))
        assert errors, spec


def test_the_crd_and_the_parser_know_the_same_quota_fields() -> None:
    from modelloader.policy import QUOTA_FIELDS

    crd_fields = SCHEMA["properties"]["spec"]["properties"]["quota"]["properties"]
    assert set(crd_fields) == set(QUOTA_FIELDS)


def test_binding_defaults_to_the_namesake_namespace() -> None:
    known = policies(OriginPolicy(""), [OriginPolicy("shop", namespaces=("retail", "web"))])
    assert known.binds("shop", "retail") and known.binds("shop", "web")
    assert not known.binds("shop", "shop")  # listed namespaces replace the default
    assert known.binds("other", "other") and not known.binds("other", "retail")
    assert known.origins_of("retail") == ("retail", "shop")
    assert known.of("other").explicit is False


def test_100_models_with_a_quota_of_5_admit_the_first_5_in_creation_order() -> None:
    models = [lm(f"m{i:03}") for i in range(100)]
    result = admit(models, [], quota(maxModels=5))
    admitted = [k for k, d in result.decisions.items() if isinstance(d, Admitted)]
    assert admitted == [m.key for m in models[:5]]
    waiting = [d for d in result.decisions.values() if isinstance(d, Waiting)]
    assert len(waiting) == 95 and all(w.limit == "maxModels" for w in waiting)
    assert "maxModels is 5, 5 in use" in waiting[0].message
    assert result.usage["a"].used["models"] == 5 and result.usage["a"].waiting == 95
    # One of the five is deleted: the sixth, oldest of those waiting, proceeds.
    rest = models[:2] + models[3:]
    after = admit(rest, [m.key for m in models[:5] if m is not models[2]], quota(maxModels=5))
    assert isinstance(after.decisions[models[5].key], Admitted)
    assert isinstance(after.decisions[models[6].key], Waiting)


def test_models_with_workers_keep_their_place_after_a_restart() -> None:
    """Admission is derived from what runs, so a restarted control plane agrees with the
    last one even if the oldest models were created after the running ones."""
    models = [lm(f"m{i}") for i in range(4)]
    running = [models[3].key, models[2].key]
    result = admit(models, running, quota(maxModels=2))
    assert {k for k, d in result.decisions.items() if isinstance(d, Admitted)} == set(running)


def test_lowering_a_quota_stops_nothing_that_runs() -> None:
    models = [lm(f"m{i}") for i in range(3)]
    result = admit(models, [m.key for m in models], quota(maxModels=1))
    assert all(isinstance(d, Admitted) for d in result.decisions.values())
    assert result.usage["a"].used["models"] == 3


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"memory": 600 << 20}, "memory"),
        ({"cpu": 2.0}, "cpu"),
        ({"maxWorkers": 2}, "maxWorkers"),
        ({"gpus": 0}, "gpus"),
    ],
)
def test_each_limit_binds(limits: dict[str, Any], field: str) -> None:
    models = [lm(f"m{i}", accelerator="gpu" if field == "gpus" else "cpu") for i in range(3)]
    result = admit(models, [], quota(**limits), schedulable=lambda _: True)
    waiting = [d for d in result.decisions.values() if isinstance(d, Waiting)]
    assert waiting and waiting[0].limit == field, result.decisions


def test_auto_stays_on_the_cpu_when_the_origin_has_no_accelerator_left() -> None:
    models = [lm("g1", accelerator="auto"), lm("g2", accelerator="auto")]
    result = admit(models, [], quota(gpus=1), schedulable=lambda _: True)
    assert [d for d in result.decisions.values()] == [Admitted("gpu"), Admitted("npu")]
    result = admit(models, [], quota(gpus=1, npus=0), schedulable=lambda _: True)
    assert [d for d in result.decisions.values()] == [Admitted("gpu"), Admitted("cpu")]


def test_origins_do_not_share_quota() -> None:
    two = policies(
        OriginPolicy(""),
        [OriginPolicy("a", quota=Quota(max_models=1)), OriginPolicy("b", quota=Quota())],
    )
    models = [lm("x", "a"), lm("y", "a"), lm("z", "b"), lm("w", "b")]
    result = admit(models, [], two)
    assert isinstance(result.decisions[ModelKey("a", "y")], Waiting)
    assert isinstance(result.decisions[ModelKey("b", "w")], Admitted)


def test_the_planner_marks_waiting_models_and_unbound_claims() -> None:
    models = [lm("m0"), lm("m1"), lm("intruder", origin="a", namespace="b")]
    result = plan(models, [], CPU, policies=quota(maxModels=1))
    assert [type(e) for e in result.effects] == [StartWorker]
    waiting = result.states[ModelKey("a", "m1")]
    assert waiting.phase == "Pending" and waiting.conditions.quota_exceeded[:2] == (
        True,
        "maxModels",
    )
    unbound = result.states[ModelKey("b", "intruder")]
    assert unbound.phase == "Failed" and "may not act for origin 'a'" in unbound.message


def test_per_origin_models_share_at_most_max_workers_processes() -> None:
    shared = policies(
        OriginPolicy(""),
        [OriginPolicy("a", quota=Quota(max_workers=3), isolation="perOrigin")],
    )
    models = [lm(f"m{i:02}") for i in range(20)]
    result = plan(models, [], CPU, policies=shared)
    starts = [e for e in result.effects if isinstance(e, StartWorker)]
    assert len(starts) == 20
    processes = [s.process for s in starts]
    assert set(processes) == {ProcessSlot("a", i) for i in range(3)}
    assert max(processes.count(p) for p in set(processes)) == 7  # spread evenly
    # Models already hosted count: a new model goes to the least used process.
    views = [
        WorkerView(f"w{i}", s.model.key, s.model.fingerprint, 1, "ready", process=s.process)
        for i, s in enumerate(starts)
    ]
    newcomer = lm("m99")
    again = plan([*models, newcomer], views, CPU, policies=shared)
    (start,) = [e for e in again.effects if isinstance(e, StartWorker)]
    assert start.process == ProcessSlot("a", 2)  # hosting 7, 7 and 6
    assert start.memory_limit == DEFAULT_MODEL_MEMORY


def test_two_origins_never_share_a_process() -> None:
    shared = policies(
        OriginPolicy("", isolation="perOrigin"),
        [],
    )
    result = plan([lm("x", "a"), lm("x", "b")], [], CPU, policies=shared)
    processes = {
        e.model.spec.origin: e.process for e in result.effects if isinstance(e, StartWorker)
    }
    assert processes["a"] != processes["b"]


@pytest.mark.parametrize(
    ("running", "limit"), list(itertools.product(range(4), (None, 0, 1, 2, 5)))
)
def test_admission_never_exceeds_a_limit_it_started_under(running: int, limit: int | None) -> None:
    models = [lm(f"m{i}") for i in range(6)]
    result = admit(models, [m.key for m in models[:running]], quota(maxModels=limit))
    admitted = sum(isinstance(d, Admitted) for d in result.decisions.values())
    expected = 6 if limit is None else max(running, min(limit, 6))
    assert admitted == expected
    assert dataclasses.asdict(result.usage["a"])["used"]["models"] == expected


def test_an_edit_is_admitted_again_and_the_old_generation_serves_meanwhile() -> None:
    running = lm("big", memory=256 << 20)
    old = WorkerView(
        "w0", running.key, running.fingerprint, 1, "ready", address=Address("unix", "/w0")
    )
    edited = dataclasses.replace(
        lm("big", memory=64 << 30), generation=2
    )  # asks 64Gi under a 1Gi quota
    result = plan([edited], [old], CPU, policies=quota(memory=1 << 30))
    assert not any(isinstance(e, StartWorker) for e in result.effects)
    state = result.states[edited.key]
    assert state.conditions.quota_exceeded[:2] == (True, "memory") and state.serving == (old,)
    assert state.phase == "Ready" and "generation 1 keeps serving" in state.message


def test_per_origin_with_no_workers_admits_nothing() -> None:
    none = policies(
        OriginPolicy(""), [OriginPolicy("a", quota=Quota(max_workers=0), isolation="perOrigin")]
    )
    result = admit([lm("m")], [], none)
    assert isinstance(result.decisions[ModelKey("a", "m")], Waiting)


def test_a_rate_of_zero_refuses_even_the_first_request() -> None:
    from modelloader_gateway.access import OriginAccess, OriginLimiter, TooManyRequests

    with pytest.raises(TooManyRequests):
        OriginLimiter().enter("a", OriginAccess(requests_per_second=0))


def test_an_origin_without_a_policy_gets_the_default_made_once_as_its_own() -> None:
    default = OriginPolicy("", quota=Quota(max_workers=3), explicit=False)
    known = policies(default, [OriginPolicy("a", quota=Quota(max_workers=1))])
    b = known.of("b")
    assert (b.origin, b.quota.max_workers, b.namespaces) == ("b", 3, ())
    assert known.of("b") is b  # made once per Policies: a pass asks thousands of times
    assert known.of("a").quota.max_workers == 1
    assert known == policies(default, [OriginPolicy("a", quota=Quota(max_workers=1))])
