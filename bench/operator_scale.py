"""Scale of the control plane: apply N LoadedModels over M origins (tiny models) to the real
kopf operator (against the KMock-based API emulator) on a local Ray, and report the time until
all are Ready, the peak RSS of the operator's process, and the workers' memory.

    .venv/bin/python bench/operator_scale.py --models 500 --origins 50

The operator runs in this process together with the API emulator, so the RSS reported is an
upper bound for the operator alone. Each model is a worker process today (isolation perModel);
sharing a process per origin is the multi-tenancy work, and what lets 500 models fit a 24 GiB
machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from modelloader.operator_main import OperatorConfig  # noqa: E402

from tests.support.cluster import EmulatorThread, OperatorThread  # noqa: E402

EXAMPLE = REPO / "examples" / "01-digits"


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--origins", type=int, default=50)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlscale-"))
    namespaces = tuple(f"origin-{i}" for i in range(args.origins))
    emulator = EmulatorThread(namespaces=("default", *namespaces))
    emulator.start()
    assert emulator.ready.wait(10)
    os.environ["KUBECONFIG"] = str(emulator.write_kubeconfig(work / "kubeconfig"))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    config = OperatorConfig(
        model_roots=(EXAMPLE,), cache_dir=work / "cache", state_dir=Path(f"/tmp/mlsc-{os.getpid()}")
    )
    operator = OperatorThread(config)
    operator.start()
    assert operator.ready_flag.wait(30)

    started = time.perf_counter()
    names = []
    for i in range(args.models):
        namespace = namespaces[i % args.origins]
        name = f"m{i}"
        names.append((namespace, name))
        emulator.apply(
            {
                "apiVersion": "modelloader.dev/v1alpha1",
                "kind": "LoadedModel",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "source": {"uri": f"file://{EXAMPLE / 'digits.tflite'}"},
                    "accelerator": "cpu",
                },
            }
        )
    applied = time.perf_counter() - started
    ready = 0
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        ready = sum(
            1
            for ns, n in names
            if ((emulator.get(n, ns) or {}).get("status") or {}).get("phase") == "Ready"
        )
        if ready == len(names):
            break
        time.sleep(1)
    elapsed = time.perf_counter() - started
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_pids = [
        int(p)
        for p in subprocess.run(
            ["pgrep", "-f", "ray::ModelWorker"], capture_output=True, text=True
        ).stdout.split()
    ]
    workers_rss = rss_mb(worker_pids)

    operator.stop()
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("lm."):
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]))
    ray.shutdown()
    emulator.stop()
    shutil.rmtree(work, ignore_errors=True)

    print(f"# Operator scale: {args.models} LoadedModels over {args.origins} origins\n")
    print(
        f"Machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"command: `.venv/bin/python bench/operator_scale.py --models {args.models} "
        f"--origins {args.origins}`\n"
    )
    print(f"- applied in {applied:.1f} s; {ready}/{len(names)} Ready after {elapsed:.1f} s")
    print(f"- peak RSS of the operator's process (with the API emulator): {peak_rss:.0f} MB")
    print(
        f"- {len(worker_pids)} worker processes, {workers_rss:.0f} MB RSS in all "
        f"({workers_rss / max(len(worker_pids), 1):.0f} MB each)"
    )


if __name__ == "__main__":
    main()
