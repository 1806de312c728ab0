"""Workers as real Ray actors: load, serve over direct IPC, fail alone, die observably."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from modelloader.ray_workers import RayWorkers
from modelloader.resource import LoadedModel, LoadedModelSpec, Source
from modelloader.worker_pool import WorkerStartError
from modelloader_gateway.worker_client import WorkerClients
from modelloader_workers.litert_runner import LiteRTRunner
from modelloader_workers.precision import host_fp16_problem

from tests.broken_models import write_broken_models
from tests.support.calls import from_file, identity, infer_worker


def model(name: str, origin: str = "default") -> LoadedModel:
    return LoadedModel("default", name, LoadedModelSpec(origin, Source("file://unused")))


@pytest.fixture
def workers(local_ray: str, tmp_path: Path) -> RayWorkers:
    return RayWorkers(Path("/tmp") / f"mlw-{os.getpid()}-{tmp_path.name[-6:]}")


def test_worker_serves_over_its_socket_like_the_interpreter(
    workers: RayWorkers, dtypes_model: Path
) -> None:
    async def scenario() -> None:
        handle, info = await workers.start(
            identity(model("dtypes"), "w-dtypes"),
            model("dtypes"),
            from_file(dtypes_model),
            "cpu",
            {},
        )
        assert info.placement.pid != os.getpid()
        assert info.address.kind == "unix"
        assert {t.name for t in info.signature.inputs} >= {"f16", "flag", "dyn"}
        inputs = {
            "f32": np.ones((2, 3), np.float32),
            "f16": np.ones((2, 3), np.float16),
            "i8": np.array([-1, 0, 1, 2], np.int8),
            "u8": np.array([0, 99, 101, 255], np.uint8),
            "i32": np.arange(4, dtype=np.int32),
            "i64": np.arange(4, dtype=np.int64),
            "flag": np.array([True, True, False, False]),
            "dyn": np.ones((2, 9), np.float32),
        }
        clients = WorkerClients()
        reply = await infer_worker(clients, info.address, inputs, [])
        expected = LiteRTRunner(str(dtypes_model)).run(inputs)
        assert reply.outputs.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(reply.outputs[name], value)
            assert reply.outputs[name].dtype == value.dtype
        assert reply.invoke_seconds > 0
        clients.close()
        assert await workers.alive(handle) is None
        workers.stop(handle)

    asyncio.run(scenario())


def test_a_worker_over_tcp_for_gateways_on_other_nodes(local_ray: str, digits_model: Path) -> None:
    workers = RayWorkers(Path(f"/tmp/mlt-{os.getpid()}"), tcp=True)

    async def scenario() -> None:
        handle, info = await workers.start(
            identity(model("tcp"), "w-tcp"), model("tcp"), from_file(digits_model), "cpu", {}
        )
        assert info.address.kind == "tcp" and info.address.where != "0.0.0.0"
        clients = WorkerClients()
        pixels = np.zeros((3, 64), np.float32)
        reply = await infer_worker(clients, info.address, {"pixels": pixels}, ["probabilities"])
        expected = LiteRTRunner(str(digits_model)).run({"pixels": pixels})["probabilities"]
        np.testing.assert_array_equal(reply.outputs["probabilities"], expected)
        clients.close()
        workers.stop(handle)

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "not-a-model"])
def test_a_broken_file_fails_its_worker_with_a_message(
    workers: RayWorkers, digits_model: Path, tmp_path: Path, kind: str
) -> None:
    broken = write_broken_models(digits_model, tmp_path)[kind]

    async def scenario() -> str:
        with pytest.raises(WorkerStartError) as caught:
            await workers.start(
                identity(model(kind), f"w-{kind}"), model(kind), from_file(broken), "cpu", {}
            )
        return str(caught.value)

    message = asyncio.run(scenario())
    assert message and "Traceback" not in message
    if kind == "not-a-model":
        assert "lacks the TFL3 identifier" in message
    else:
        assert "LiteRT could not load the model" in message or "died while loading" in message


def test_a_killed_worker_is_observed_dead(workers: RayWorkers, digits_model: Path) -> None:
    async def scenario() -> str | None:
        handle, info = await workers.start(
            identity(model("victim"), "w-victim"),
            model("victim"),
            from_file(digits_model),
            "cpu",
            {},
        )
        os.kill(info.placement.pid, signal.SIGKILL)
        for _ in range(50):
            verdict = await workers.alive(handle)
            if verdict is not None:
                return verdict
            await asyncio.sleep(0.1)
        return None

    verdict = asyncio.run(scenario())
    # No node asked on a cluster of several: a worker of its own, which exits with its model.
    assert verdict is not None and "exited" in verdict


def test_fp16_runs_in_the_sandboxed_worker_and_status_says_so(
    workers: RayWorkers, digits_model: Path
) -> None:
    """precision fp16 through the real worker (its load runs under the seccomp filter)."""
    half = LoadedModel(
        "default", "half", LoadedModelSpec("default", Source("file://unused"), precision="fp16")
    )

    async def scenario() -> None:
        handle, info = await workers.start(
            identity(half, "w-half"), half, from_file(digits_model), "cpu", {}
        )
        clients = WorkerClients()
        pixels = np.eye(64, dtype=np.float32)[:4]
        reply = await infer_worker(clients, info.address, {"pixels": pixels}, ["probabilities"])
        fp32 = LiteRTRunner(str(digits_model)).run({"pixels": pixels})["probabilities"]
        clients.close()
        workers.stop(handle)
        if host_fp16_problem() is None:
            assert info.placement.precision == "fp16" and not info.note
            np.testing.assert_allclose(reply.outputs["probabilities"], fp32, atol=2e-3)
        else:
            assert info.placement.precision == "fp32" and info.note.startswith("precision fp16")

    asyncio.run(scenario())


def test_an_origins_models_share_its_supervisor_and_die_alone(
    workers: RayWorkers, digits_model: Path
) -> None:
    """Two perModel models of one origin on one node: one worker supervises both, each
    in a model process of its own. One's process killed: that model alone is reported dead,
    the other answers on, and a replacement loads into the same worker. The worker ends once
    it hosts nothing."""
    pixels = {"pixels": np.zeros((1, 64), np.float32)}

    async def scenario() -> None:
        node = (await workers.recent_nodes())[0].id
        started = {
            name: await workers.start(
                identity(model(name, "shared"), f"w-{name}"),
                model(name, "shared"),
                from_file(digits_model),
                "cpu",
                {},
                node=node,
            )
            for name in ("first", "second")
        }
        (first, first_info), (second, second_info) = started["first"], started["second"]
        assert first.supervisor and first.supervisor == second.supervisor
        assert first_info.placement.pid != second_info.placement.pid
        supervisor = await first.actor.ping.remote()
        assert supervisor not in (first_info.placement.pid, second_info.placement.pid)
        os.kill(first_info.placement.pid, signal.SIGKILL)
        for _ in range(50):
            verdict = await workers.alive(first)
            if verdict is not None:
                break
            await asyncio.sleep(0.1)
        assert verdict is not None and "killed by SIGKILL" in verdict
        assert await workers.alive(second) is None
        clients = WorkerClients()
        reply = await infer_worker(clients, second_info.address, pixels)
        assert reply.outputs["probabilities"].shape == (1, 10)
        workers.stop(first)  # the dead one unloaded
        again, again_info = await workers.start(
            identity(model("first", "shared"), "w-first.r1"),
            model("first", "shared"),
            from_file(digits_model),
            "cpu",
            {},
            node=node,
        )
        assert again.supervisor == first.supervisor
        assert await again.actor.ping.remote() == supervisor
        reply = await infer_worker(clients, again_info.address, pixels)
        assert reply.outputs["probabilities"].shape == (1, 10)
        clients.close()
        workers.stop(second)
        workers.stop(again)
        for _ in range(100):  # the last unload ends the worker
            try:
                await asyncio.wait_for(again.actor.ping.remote(), 1)
            except Exception:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the empty supervisor kept running")

    asyncio.run(scenario())
