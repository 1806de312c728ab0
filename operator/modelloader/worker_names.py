"""The names of Model Loader's Ray actors, built and parsed in this one place (after Ray
Serve's `ReplicaID`). The planner speaks of models, replicas and process slots; only the Ray
adapter and the pool that numbers restarts see these strings.

    lm.<namespace>.<name>.<fingerprint>[.i<replica>][.r<restarts>]   a model's own worker
    lmp.<origin>.<slot>[.r<epoch>]                                  an origin's shared process
    lmw.<16 hex>                                                    a warm, unassigned process
    lms.<origin>.<12 hex>                                           an origin's supervisor on a
                                                                    node (its perModel models)

A name derives from the LoadedModel and its spec, so a second start finds the first; a worker
started again after a death takes the next `.rN`: Ray may not yet have released the dead
actor's name.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, replace

from modelloader_workers.wire.identity import ModelKey

from modelloader.planner import ProcessSlot

WORKER_PREFIX = "lm."
PROCESS_PREFIX = "lmp."
WARM_PREFIX = "lmw."
SUPERVISOR_PREFIX = "lms."
_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")
_COUNTER = re.compile(r"^([ir])(\d+)$")


@dataclass(frozen=True, slots=True)
class WorkerName:
    key: ModelKey
    fingerprint: str
    replica: int = 0
    restarts: int = 0

    def format(self) -> str:
        text = f"{WORKER_PREFIX}{self.key.namespace}.{self.key.name}.{self.fingerprint}"
        if self.replica:
            text += f".i{self.replica}"
        if self.restarts:
            text += f".r{self.restarts}"
        return text

    def restarted(self, restarts: int) -> WorkerName:
        return replace(self, restarts=restarts)

    @staticmethod
    def parse(text: str) -> WorkerName | None:
        if not text.startswith(WORKER_PREFIX):
            return None
        parts = text[len(WORKER_PREFIX) :].split(".")
        counters = {"i": 0, "r": 0}
        # From the end: the counters, then the fingerprint; a name may hold dots itself.
        while parts and (found := _COUNTER.match(parts[-1])) and found.group(1) in counters:
            counters[found.group(1)] = int(found.group(2))
            parts.pop()
        if len(parts) < 3 or not _FINGERPRINT.match(parts[-1]):
            return None
        namespace, name = parts[0], ".".join(parts[1:-1])
        return WorkerName(ModelKey(namespace, name), parts[-1], counters["i"], counters["r"])


@dataclass(frozen=True, slots=True)
class ProcessName:
    slot: ProcessSlot
    epoch: int = 0  # how many processes for this slot were started before this one

    def format(self) -> str:
        text = f"{PROCESS_PREFIX}{self.slot.origin}.{self.slot.index}"
        return f"{text}.r{self.epoch}" if self.epoch else text

    @staticmethod
    def parse(text: str) -> ProcessName | None:
        if not text.startswith(PROCESS_PREFIX):
            return None
        parts = text[len(PROCESS_PREFIX) :].split(".")
        epoch = 0
        if len(parts) == 3 and parts[2].startswith("r") and parts[2][1:].isdigit():
            epoch = int(parts.pop()[1:])
        if len(parts) != 2 or not parts[1].isdigit():
            return None
        return ProcessName(ProcessSlot(parts[0], int(parts[1])), epoch)


def warm_name() -> str:
    return f"{WARM_PREFIX}{uuid.uuid4().hex[:16]}"


def supervisor_name(origin: str) -> str:
    """A new supervisor's name: unique, as a dead one's name may stay taken a while; a
    restarted control plane finds supervisors by listing them, not by their names."""
    return f"{SUPERVISOR_PREFIX}{origin}.{uuid.uuid4().hex[:12]}"


def is_supervisor(text: str) -> bool:
    return text.startswith(SUPERVISOR_PREFIX)


def is_warm(text: str) -> bool:
    return text.startswith(WARM_PREFIX)


def is_ours(text: str) -> bool:
    """A name of any of Model Loader's actors."""
    return text.startswith((WORKER_PREFIX, PROCESS_PREFIX, WARM_PREFIX, SUPERVISOR_PREFIX))
