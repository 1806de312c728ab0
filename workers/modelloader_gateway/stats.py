"""Per-model inference statistics, for Triton's statistics extension (`GET
/v2/models/NAME/stats`, gRPC `ModelStatistics`): counts and cumulative times of the requests
the data plane answered, whichever transport carried them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

Key = tuple[str, str]  # (origin, model name)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ModelStats:
    success: Duration = field(default_factory=Duration)  # the whole request, in the gateway
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)  # waiting for the interpreter
    infer: Duration = field(default_factory=Duration)  # the interpreter's invoke
    last_inference_ms: int = 0  # when the last success finished, ms since the epoch
    inferences: int = 0  # items inferred: a batched model's requests carry several
    executions: int = 0  # invokes: with batching, one for several requests

    def as_triton(self, name: str, version: str) -> dict[str, object]:
        """Triton's JSON shape (its gRPC message has the same fields). Input and output
        handling are not timed apart from the request: counted, with no time."""
        untimed = {"count": self.success.count, "ns": 0}
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inferences,
            "execution_count": self.executions,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": untimed,
                "compute_infer": self.infer.as_dict(),
                "compute_output": untimed,
            },
        }


class Statistics:
    def __init__(self) -> None:
        self._models: dict[Key, ModelStats] = {}

    def of(self, key: Key) -> ModelStats:
        found = self._models.get(key)
        if found is None:
            found = self._models[key] = ModelStats()
        return found

    def succeeded(
        self,
        key: Key,
        seconds: float,
        queue: float,
        infer: float,
        items: int = 1,
        executed: bool = True,
    ) -> None:
        """`executed`: the request is the one of its invoke that counts it."""
        stats = self.of(key)
        stats.success.add(seconds)
        stats.inferences += items
        stats.executions += executed
        stats.queue.add(queue)
        stats.infer.add(infer)
        stats.last_inference_ms = int(time.time() * 1000)

    def failed(self, key: Key, seconds: float) -> None:
        self.of(key).fail.add(seconds)

    def forget_except(self, keys: set[Key]) -> None:
        """Models that are gone lose their statistics."""
        for gone in set(self._models) - keys:
            del self._models[gone]
