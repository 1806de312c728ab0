"""Liveness of supervised models: one question per supervisor, whatever its models' number.
The actor is a stand-in here (its calls are what is counted); the real one is asked in
tests/integration/test_ray_workers.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from modelloader.ray_workers import RayWorkers, WorkerHandle


class _Method:
    def __init__(self, answer: Any) -> None:
        self.calls = 0
        self._answer = answer

    def remote(self, *args: Any) -> Any:
        self.calls += 1

        async def answer() -> Any:
            await asyncio.sleep(0.01)
            return self._answer(*args) if callable(self._answer) else self._answer

        return answer()


class _Supervisor:
    def __init__(self) -> None:
        self.hosting = _Method((["a", "b"], {"c": "the model process died (killed by SIGKILL)"}))


class _OldSupervisor:  # the release before: one `alive` call per model
    def __init__(self) -> None:
        self.alive = _Method(lambda model: None if model == "a" else "it died")


def handles(actor: Any, *models: str) -> list[WorkerHandle]:
    return [
        WorkerHandle(m, "ns", actor, Path(f"/nonexistent/{m}"), supervisor="lms.o") for m in models
    ]


def test_models_of_one_supervisor_checked_together_cost_one_call(tmp_path: Path) -> None:
    workers = RayWorkers(tmp_path)
    actor = _Supervisor()

    async def check() -> list[str | None]:
        return list(await asyncio.gather(*(workers.alive(h) for h in handles(actor, *"abcd"))))

    verdicts = asyncio.run(check())
    assert actor.hosting.calls == 1
    assert verdicts[:2] == [None, None]
    assert verdicts[2] == "the model process died (killed by SIGKILL)"
    assert verdicts[3] == "the worker does not host this model"
    asyncio.run(check())  # the next check asks again: nothing is remembered between checks
    assert actor.hosting.calls == 2


def test_a_supervisor_of_the_release_before_is_asked_per_model(tmp_path: Path) -> None:
    workers = RayWorkers(tmp_path)
    actor = _OldSupervisor()

    async def check(model: str) -> str | None:
        return await workers.alive(handles(actor, model)[0])

    assert asyncio.run(check("a")) is None
    assert asyncio.run(check("b")) == "it died"
