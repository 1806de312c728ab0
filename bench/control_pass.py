"""What one control-loop pass decides, and what that costs: the planner and the statuses for
N LoadedModels over M origins, two thirds of them serving and the rest loading, as
`ControlLoop._pass` runs them (without Ray, the gateways or the status sink):

    .venv/bin/python bench/control_pass.py [--models 500] [--origins 50] [--passes 30]

Prints the fastest and the median pass in ms. While 500 models start, a pass runs after
each load that finishes, on the cores those loads use: its cost is taken from theirs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import UTC, datetime
from typing import Any

from modelloader import status
from modelloader.placement import Node, PlacementConfig
from modelloader.planner import WorkerView, plan
from modelloader.policy import Policies
from modelloader.resource import LoadedModel, LoadedModelSpec, Source
from modelloader_workers.wire.address import Address
from modelloader_workers.wire.identity import ModelKey
from modelloader_workers.wire.placement import Placement
from modelloader_workers.wire.signature import Signature


def fleet(models: int, origins: int) -> tuple[list[LoadedModel], list[WorkerView]]:
    loaded: list[LoadedModel] = []
    views: list[WorkerView] = []
    for i in range(models):
        origin = f"o{i % origins}"
        model = LoadedModel(origin, f"m{i}", LoadedModelSpec(origin, Source("file:///m.tflite")))
        ready = i % 3 != 0
        loaded.append(model)
        views.append(
            WorkerView(
                id=f"w{i}",
                key=model.key,
                fingerprint=model.fingerprint,
                generation=model.generation,
                state="ready" if ready else "starting",
                signature=Signature((), ()) if ready else None,
                placement=Placement("node", "n1", "cpu", "", 1000 + i) if ready else None,
                address=Address("unix", f"/w{i}") if ready else None,
                origin=origin,
            )
        )
    return loaded, views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--origins", type=int, default=50)
    parser.add_argument("--passes", type=int, default=30)
    args = parser.parse_args()
    models, views = fleet(args.models, args.origins)
    capacity = {"CPU": 2.0, "memory": 24e9}
    nodes = [Node("n1", dict(capacity))]
    previous: dict[ModelKey, dict[str, Any]] = {}
    spent: list[float] = []
    for _ in range(args.passes + 1):  # the first renders every status for the first time
        started = time.perf_counter()
        policies = Policies()  # as each read of the desired state makes them
        result = plan(models, views, capacity, PlacementConfig(), policies, nodes=nodes)
        now = datetime.now(UTC)
        previous = {
            m.key: status.render(m, result.states[m.key], previous.get(m.key), now) for m in models
        }
        spent.append(time.perf_counter() - started)
    passes = spent[1:]
    print(
        f"machine: {platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.node()}"
    )
    print(
        f"{args.models} models over {args.origins} origins: pass min "
        f"{min(passes) * 1000:.1f} ms, median {statistics.median(passes) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
