"""Dynamic batching in the worker: the real interpreter, the worker's serving thread, and the
gateway's own links to it. Each answer is checked against an unbatched run of its input."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from modelloader_gateway.errors import BadRequest, DataPlaneError
from modelloader_gateway.worker_client import WorkerClients, WorkerReply
from modelloader_workers import worker_server
from modelloader_workers.batch_runner import check_batchable
from modelloader_workers.batching import BatchPolicy
from modelloader_workers.litert_runner import LiteRTRunner, ModelLoadError
from modelloader_workers.wire.address import Address
from modelloader_workers.worker_server import WorkerServer

from tests.support.calls import infer_worker

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "examples" / "01-digits" / "digits.tflite"
SCALE = REPO / "tests" / "models" / "scale.tflite"
SAMPLES = json.loads((REPO / "examples" / "01-digits" / "samples.json").read_text())["samples"]


@pytest.fixture
def address(tmp_path: Path) -> Iterator[Address]:
    yield Address("unix", str(tmp_path / "w.sock"))


def serve(path: Path, policy: BatchPolicy, address: Address) -> WorkerServer:
    runner = LiteRTRunner(str(path), threads=1)
    check_batchable(runner, policy.max_batch_size)
    return WorkerServer(runner, address, batching=policy)


def burst(
    address: Address, requests: Sequence[Mapping[str, np.ndarray[Any, Any]]]
) -> list[WorkerReply | DataPlaneError]:
    """All the requests at once, each on a link of its own, as a busy gateway sends them."""

    async def go() -> list[WorkerReply | DataPlaneError]:
        clients = WorkerClients()
        try:
            got = await asyncio.gather(
                *(infer_worker(clients, address, r) for r in requests), return_exceptions=True
            )
        finally:
            clients.close()
        out: list[WorkerReply | DataPlaneError] = []
        for each in got:
            if not isinstance(each, WorkerReply | DataPlaneError):
                raise AssertionError(f"unexpected: {each!r}")
            out.append(each)
        return out

    return asyncio.run(go())


def replies(got: list[WorkerReply | DataPlaneError]) -> list[WorkerReply]:
    assert all(isinstance(g, WorkerReply) for g in got), got
    return [g for g in got if isinstance(g, WorkerReply)]


def test_concurrent_requests_share_invokes_and_each_answer_is_its_own(address: Address) -> None:
    server = serve(DIGITS, BatchPolicy(8, max_queue_delay_seconds=0.05), address)
    pixels = [np.array([s["pixels"]], np.float32) for s in SAMPLES[:8]]
    try:
        got = replies(burst(address, [{"pixels": p} for p in pixels]))
    finally:
        server.close()
    alone = LiteRTRunner(str(DIGITS), threads=1)
    for reply, x, sample in zip(got, pixels, SAMPLES, strict=False):
        expected = alone.run({"pixels": x})["probabilities"]
        np.testing.assert_allclose(reply.outputs["probabilities"], expected, rtol=1e-5, atol=1e-7)
        assert int(np.argmax(reply.outputs["probabilities"])) == sample["label"]
    invokes = [r.batch for r in got if r.batch]
    assert sum(invokes) == 8  # every item counted, once
    assert len(invokes) < 8  # and fewer invokes than requests


def test_requests_of_other_widths_wait_for_batches_of_their_own(address: Address) -> None:
    server = serve(SCALE, BatchPolicy(16, max_queue_delay_seconds=0.05), address)
    rng = np.random.default_rng(1)
    shapes = [(1, 3), (2, 3), (1, 5), (1, 3), (3, 5)]
    inputs = [rng.uniform(-1, 1, s).astype(np.float32) for s in shapes]
    try:
        got = replies(burst(address, [{"x": x} for x in inputs]))
    finally:
        server.close()
    for reply, x in zip(got, inputs, strict=True):
        np.testing.assert_array_equal(reply.outputs["y"], 2 * x)
    # Width 3: 1 + 2 + 1 items; width 5: 1 + 3. Two invokes, if both batches formed whole.
    assert sum(r.batch for r in got) == 8
    assert sorted(r.batch for r in got if r.batch) in ([4, 4], [1, 3, 4], [1, 1, 2, 4])


def test_a_malformed_request_fails_alone_and_the_rest_are_answered(address: Address) -> None:
    server = serve(SCALE, BatchPolicy(8, max_queue_delay_seconds=0.05), address)
    good = [np.full((1, 4), i, np.float32) for i in range(3)]
    bad = {"x": np.ones((1, 4), np.int32)}  # the wrong type: the worker's own check says so
    too_big = {"x": np.ones((9, 4), np.float32)}  # over maxBatchSize
    try:
        got = burst(address, [{"x": good[0]}, bad, {"x": good[1]}, too_big, {"x": good[2]}])
    finally:
        server.close()
    assert isinstance(got[1], BadRequest) and "datatype INT32" in got[1].message
    assert isinstance(got[3], BadRequest) and "1 to 8 per request" in got[3].message
    answered = replies([got[0], got[2], got[4]])
    for reply, x in zip(answered, good, strict=True):
        np.testing.assert_array_equal(reply.outputs["y"], 2 * x)
    assert sum(r.batch for r in answered) == 3


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ("memory_hog.tflite", "output 'total' has shape []"),
        ("dtypes.tflite", "has shape [2, 3]"),
    ],
)
def test_a_model_without_a_batch_dimension_refuses_batching(model: str, needle: str) -> None:
    runner = LiteRTRunner(str(REPO / "tests" / "models" / model), threads=1)
    with pytest.raises(ModelLoadError, match=r"spec\.batching") as caught:
        check_batchable(runner, 4)
    assert needle in str(caught.value)


def test_without_a_delay_a_lone_request_and_a_burst_are_answered_alike(address: Address) -> None:
    # No delay: a lone request takes the unbatched path (straight into the interpreter), a
    # burst is batched as it queues behind the invoke under way. Both count their items.
    server = serve(SCALE, BatchPolicy(8), address)
    inputs = [np.full((1 + i % 3, 2), i, np.float32) for i in range(12)]
    try:
        (lone,) = replies(burst(address, [{"x": inputs[0]}]))
        got = replies(burst(address, [{"x": x} for x in inputs]))
    finally:
        server.close()
    np.testing.assert_array_equal(lone.outputs["y"], 2 * inputs[0])
    assert lone.batch == 1
    for reply, x in zip(got, inputs, strict=True):
        np.testing.assert_array_equal(reply.outputs["y"], 2 * x)
    assert sum(r.batch for r in got) == sum(x.shape[0] for x in inputs)


def test_with_a_delay_the_serving_thread_tightens_its_timer_slack(
    address: Address, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Linux may fire a timer up to 50 us late by default; a queue delay is one or two timed
    # waits of the serving thread, so that thread asks for its timers on time.
    tightened: list[tuple[str, bool]] = []
    real = worker_server.tighten_timer_slack

    def recorded() -> bool:
        done = real()
        tightened.append((threading.current_thread().name, done))
        return done

    monkeypatch.setattr(worker_server, "tighten_timer_slack", recorded)
    x = np.full((1, 2), 3, np.float32)
    for policy in (BatchPolicy(4), BatchPolicy(4, max_queue_delay_seconds=0.002)):
        server = serve(SCALE, policy, address)
        try:
            (reply,) = replies(burst(address, [{"x": x}]))
        finally:
            server.close()
        np.testing.assert_array_equal(reply.outputs["y"], 2 * x)
    assert tightened == [("ipc-serve", True)]  # the delayed one only
