"""Dynamic batching's decisions, without a worker: what runs together, and when."""

from __future__ import annotations

import itertools

import pytest
from modelloader_workers.batching import BatchPolicy, Run, Wait, Waiting, next_batch
from modelloader_workers.wire.signature import (
    InvalidRequest,
    Signature,
    TensorSpec,
    check_inputs,
)

A, B = "shapes-a", "shapes-b"


def waiting(*requests: tuple[str, int, float]) -> list[Waiting]:
    return [Waiting(key, items, arrived) for key, items, arrived in requests]


def test_nothing_waiting_decides_nothing() -> None:
    assert next_batch([], BatchPolicy(8, 0.01), now=5.0) is None


def test_without_a_delay_whatever_waits_runs_at_once() -> None:
    decision = next_batch(waiting((A, 1, 0.0), (A, 1, 0.0), (A, 2, 0.0)), BatchPolicy(8), 0.0)
    assert decision == Run((0, 1, 2))


def test_a_partial_batch_waits_out_the_oldest_requests_delay() -> None:
    policy = BatchPolicy(8, max_queue_delay_seconds=0.010)
    queue = waiting((A, 1, 1.000), (A, 1, 1.004))
    decision = next_batch(queue, policy, now=1.006)
    assert isinstance(decision, Wait) and decision.seconds == pytest.approx(0.004)
    assert next_batch(queue, policy, now=1.010) == Run((0, 1))


def test_a_full_batch_runs_before_the_delay_and_the_rest_waits() -> None:
    policy = BatchPolicy(4, max_queue_delay_seconds=1.0)
    queue = waiting(*[(A, 1, 0.0)] * 6)
    assert next_batch(queue, policy, now=0.0) == Run((0, 1, 2, 3))


def test_a_preferred_size_runs_at_once() -> None:
    policy = BatchPolicy(16, max_queue_delay_seconds=1.0, preferred_batch_sizes=(4, 8))
    assert next_batch(waiting(*[(A, 2, 0.0)] * 2), policy, now=0.0) == Run((0, 1))
    assert isinstance(next_batch(waiting(*[(A, 2, 0.0)] * 3), policy, now=0.0), Wait)


def test_items_count_not_requests_and_a_request_that_would_overflow_waits() -> None:
    policy = BatchPolicy(8, max_queue_delay_seconds=0.0)
    queue = waiting((A, 3, 0.0), (A, 4, 0.0), (A, 3, 0.0), (A, 1, 0.0))
    # In order: 3 + 4 fit, the next 3 would make 10; the batch stops there (order is kept)
    # and runs without waiting out the delay: nothing could join it.
    assert next_batch(queue, policy, now=0.0) == Run((0, 1))
    assert next_batch(queue, BatchPolicy(8, 1.0), now=0.0) == Run((0, 1))


def test_other_shapes_wait_for_a_batch_of_their_own() -> None:
    policy = BatchPolicy(8, max_queue_delay_seconds=0.0)
    queue = waiting((A, 1, 0.0), (B, 1, 0.0), (A, 1, 0.0), (B, 1, 0.0))
    assert next_batch(queue, policy, now=0.0) == Run((0, 2))
    assert next_batch(waiting((B, 1, 0.0), (B, 1, 0.0)), policy, now=0.0) == Run((0, 1))


def test_a_request_bigger_than_the_batch_runs_alone_rather_than_never() -> None:
    assert next_batch(waiting((A, 9, 0.0), (A, 1, 0.0)), BatchPolicy(8), 0.0) == Run((0,))


@pytest.mark.parametrize(
    ("sizes", "delay", "now"),
    list(itertools.product([(1,), (1, 1, 1), (2, 3, 4), (8,), (5, 5)], [0.0, 0.002], [0.0, 0.01])),
)
def test_every_decision_runs_the_oldest_first_and_never_more_than_fits(
    sizes: tuple[int, ...], delay: float, now: float
) -> None:
    policy = BatchPolicy(8, delay)
    queue = waiting(*[(A, n, 0.0) for n in sizes])
    decision = next_batch(queue, policy, now)
    if isinstance(decision, Wait):
        assert sum(sizes) < 8 and now < delay and decision.seconds > 0
        return
    if sum(sizes) < 8:
        assert now >= delay  # a batch that could still grow waits out its delay
    assert isinstance(decision, Run) and decision.take[0] == 0
    assert list(decision.take) == list(range(len(decision.take)))
    taken = sum(sizes[i] for i in decision.take)
    assert taken <= 8 or len(decision.take) == 1


SIGNATURE = Signature(
    (TensorSpec("a", "FP32", (1, 4)), TensorSpec("b", "INT32", (1,))),
    (TensorSpec("y", "FP32", (1, 2)),),
).batched(8)


def test_a_batched_signature_shows_the_batch_dimension_as_any_size() -> None:
    assert SIGNATURE.inputs[0].shape == (-1, 4) and SIGNATURE.outputs[0].shape == (-1, 2)
    assert Signature.from_dict(SIGNATURE.to_dict()) == SIGNATURE
    check_inputs(SIGNATURE, {"a": ("FP32", (8, 4)), "b": ("INT32", (8,))})


@pytest.mark.parametrize(
    ("given", "needle"),
    [
        ({"a": ("FP32", (9, 4)), "b": ("INT32", (9,))}, "1 to 8 per request"),
        ({"a": ("FP32", (0, 4)), "b": ("INT32", (0,))}, "a batch of 0 items"),
        ({"a": ("FP32", (2, 4)), "b": ("INT32", (3,))}, "first dimensions (the batch) differ"),
    ],
)
def test_a_batched_signature_refuses_batches_it_cannot_take(
    given: dict[str, tuple[str, tuple[int, ...]]], needle: str
) -> None:
    with pytest.raises(InvalidRequest, match=needle.replace("(", r"\(").replace(")", r"\)")):
        check_inputs(SIGNATURE, given)
