"""`modelloader local`: the embedded default. Manifests from files, a private local Ray, the
gateway on localhost, metrics, and the control channel for `modelloader status`; one process.

The control loop is the operator's (`control_loop`); only the desired-state source (files), the
status sink (memory, shown by `modelloader status`) and the route channel (the gateway in this
process) are local. If the private Ray dies (its raylet or GCS exits), the gateway stops saying
it is ready, status says why, and a fresh Ray is started and the models loaded again; Ray lost
too often in a row ends `modelloader local` with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloader_gateway.load import Key, Load
from modelloader_gateway.routes import RouteTable
from modelloader_gateway.server import Gateway, GatewayConfig
from prometheus_client import CollectorRegistry

from modelloader import control_channel
from modelloader.control_loop import ControlLoop, Desired, LoopSettings, Outcome
from modelloader.control_metrics import ControlMetrics
from modelloader.manifests import ManifestReader
from modelloader.policy import OriginPolicy, Policies, policies
from modelloader.ray_workers import (
    RayWorkers,
    WorkerHandle,
    local_ray_problem,
    start_local_ray,
    stop_ray,
)
from modelloader.resource import LoadedModel
from modelloader.sources import ModelSources, SourcePolicy

log = logging.getLogger(__name__)

# Ray lost this many times within the window ends `modelloader local` (with the reason) rather
# than restarting it again: something on the machine keeps killing it.
RAY_LOSSES = 3
RAY_LOSS_WINDOW_SECONDS = 600.0


@dataclass(frozen=True)
class LocalConfig:
    paths: tuple[Path, ...]
    state_dir: Path
    sources: SourcePolicy
    gateway: GatewayConfig = dataclasses.field(default_factory=GatewayConfig)
    loop: LoopSettings = dataclasses.field(default_factory=LoopSettings)
    num_cpus: int | None = None
    warm_workers: int = 2  # idle worker processes kept started: apply -> Ready skips a start
    # Origins without an OriginPolicy manifest; the `default` origin (namespace `default`)
    # also takes anonymous calls unless a manifest says otherwise: the embedded default
    # works without tokens out of the box.
    default_policy: OriginPolicy = dataclasses.field(default_factory=lambda: OriginPolicy(""))


def local_policies(default: OriginPolicy, found: tuple[OriginPolicy, ...]) -> Policies:
    """The manifests' policies; the `default` origin takes anonymous calls unless one of
    them is about it."""
    if not any(p.origin == "default" for p in found):
        found = (*found, dataclasses.replace(default, origin="default", allow_anonymous=True))
    return policies(default, found)


class Generations:
    """Kubernetes bumps metadata.generation on each spec change; files have none, so count."""

    def __init__(self) -> None:
        self._seen: dict[Any, tuple[str, int]] = {}
        self._stamped: dict[Any, tuple[LoadedModel, LoadedModel]] = {}  # as read -> stamped

    def stamp(self, models: tuple[LoadedModel, ...]) -> list[LoadedModel]:
        stamped = []
        for model in models:
            fingerprint, generation = self._seen.get(model.key, (model.fingerprint, 0))
            if fingerprint != model.fingerprint or generation == 0:
                generation += 1
            self._seen[model.key] = (model.fingerprint, generation)
            # The same object while nothing changes: its fingerprint is computed once.
            read, made = self._stamped.get(model.key, (None, None))
            if read is not model or made is None or made.generation != generation:
                made = dataclasses.replace(model, generation=generation)
                self._stamped[model.key] = (model, made)
            stamped.append(made)
        for gone in set(self._seen) - {m.key for m in models}:
            del self._seen[gone]
            self._stamped.pop(gone, None)
        return stamped


class FileSource:
    """The desired state from manifest files (`DesiredSource`)."""

    def __init__(self, paths: tuple[Path, ...], default_policy: OriginPolicy) -> None:
        self._reader = ManifestReader(list(paths))
        self._default_policy = default_policy
        self._generations = Generations()
        self._secret_data: Mapping[tuple[str, str], Mapping[str, str]] = {}

    async def credentials(self, namespace: str, name: str) -> Mapping[str, str] | None:
        """A Secret of the files last read (`sources.CredentialLookup`)."""
        return self._secret_data.get((namespace, name))

    async def read(self) -> Desired:
        manifests = await asyncio.to_thread(self._reader.read)
        self._secret_data = manifests.secret_data
        return Desired(
            models=self._generations.stamp(manifests.models),
            rejected=manifests.rejected,
            policies=local_policies(self._default_policy, manifests.policies),
            secrets=manifests.secrets,
            anonymous_origin="default",
            problems=manifests.file_errors,
        )


class MemorySink:
    """Statuses kept for `modelloader status` (`StatusSink`)."""

    def __init__(self) -> None:
        self.listing: list[dict[str, Any]] = []
        self.origins: dict[str, dict[str, Any]] = {}
        self.problems: tuple[str, ...] = ()
        self.ray_problem: str | None = None

    async def publish(self, outcome: Outcome, desired: Desired) -> None:
        self.listing = outcome.listing
        self.origins = dict(outcome.origins)
        self.problems = outcome.problems

    def report(self) -> dict[str, Any]:
        errors = list(self.problems)
        if self.ray_problem is not None:
            errors.insert(0, self.ray_problem)
        return {"items": self.listing, "errors": errors, "origins": self.origins}


class GatewayChannel:
    """Routes handed to the gateway in this process (`RouteChannel`)."""

    def __init__(self, gateway: Gateway, sink: MemorySink) -> None:
        self._gateway = gateway
        self._sink = sink

    async def publish(self, table: RouteTable) -> None:
        self._gateway.publish(table)
        if self._sink.ray_problem is not None:  # the first routes of a new Ray's workers
            self._sink.ray_problem = None
            self._gateway.unready(None)

    async def load(self) -> dict[Key, Load]:
        return self._gateway.dataplane.load.report()


class LocalRuntime:
    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = ControlMetrics(self.registry)
        # A request held for a model scaled to zero wakes the loop: its autoscaler decides now.
        self.gateway = Gateway(config.gateway, self.registry, on_hold=self._wake_loop)
        self.sink = MemorySink()
        self.source = FileSource(config.paths, config.default_policy)
        self.sources = ModelSources(self.source.credentials)
        self.loop: ControlLoop[WorkerHandle] | None = None
        self._stop = asyncio.Event()
        self._control: control_channel.ControlServer | None = None
        self._ray_temp: str | None = None
        self._losses: list[float] = []

    # Lifecycle

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self.start()
            # After start: ray.init installs a SIGTERM handler of its own, which would exit
            # without unloading anything.
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_restart)
            await self._serve_until_stopped()
        finally:
            await self.shutdown()

    def _wake_loop(self) -> None:
        if self.loop is not None:
            self.loop.wake()

    def request_stop(self) -> None:
        self._stop.set()

    def request_restart(self) -> None:
        """SIGHUP: start the control loop afresh, as after a crash (the gateway and the
        workers keep serving; the new loop adopts the workers that run)."""
        if self.loop is not None:
            self.loop.request_restart()

    async def start(self) -> None:
        config = self.config
        control_channel.prepare_state_dir(config.state_dir)
        if control_channel.is_running(config.state_dir):
            raise RuntimeError(
                f"another modelloader local is running with state dir {config.state_dir}"
            )
        # On this thread: Ray wants the main thread for its signal handling. Nothing else is
        # being served yet, so blocking the loop for a few seconds costs nothing.
        self._start_ray(start_local_ray(self.config.num_cpus))
        await self.gateway.start()
        self._control = control_channel.ControlServer(config.state_dir, self.sink.report)

    def _start_ray(self, ray_temp: str) -> None:
        """A control loop with no workers yet, on the private Ray just started."""
        self._ray_temp = ray_temp
        workers = RayWorkers(
            self.config.state_dir / "w", warm=self.config.warm_workers, sources=self.config.sources
        )
        self.loop = ControlLoop(
            self.source,
            self.sink,
            GatewayChannel(self.gateway, self.sink),
            workers,
            self.sources,
            self.metrics,
            self.config.loop,
            health=local_ray_problem,
        )

    async def _serve_until_stopped(self) -> None:
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                assert self.loop is not None
                running = asyncio.ensure_future(self.loop.run(adopt=False))
                await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not running.done():
                    running.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await running
                    return
                lost = running.result()
                if lost is not None:
                    await self._restart_ray(lost)
        finally:
            stopped.cancel()

    async def _restart_ray(self, problem: str) -> None:
        """Ray is gone, and every worker with it: say so, start a fresh one, load again."""
        now = time.monotonic()
        self._losses = [t for t in self._losses if now - t < RAY_LOSS_WINDOW_SECONDS] + [now]
        reason = f"{problem}; starting a new Ray and loading the models again"
        self.gateway.unready(reason)
        self.sink.ray_problem = reason
        assert self.loop is not None
        await self.loop.close(stop_workers=False)  # they died with Ray
        self.gateway.clients.close()
        await asyncio.to_thread(stop_ray)
        self._remove_ray_temp()
        if len(self._losses) >= RAY_LOSSES:
            raise RuntimeError(
                f"Ray was lost {len(self._losses)} times within "
                f"{RAY_LOSS_WINDOW_SECONDS:.0f} s, most recently: {problem}"
            )
        try:
            # Off the event loop: the gateway answers (503, not ready) meanwhile, and Ray,
            # off the main thread, leaves our SIGTERM handler in place.
            ray_temp = await asyncio.to_thread(start_local_ray, self.config.num_cpus)
            self._start_ray(ray_temp)  # ready again once its loop publishes routes
        except Exception as error:
            raise RuntimeError(f"{problem}, and a new Ray could not be started: {error}") from None

    def _remove_ray_temp(self) -> None:
        if self._ray_temp is not None:
            shutil.rmtree(self._ray_temp, ignore_errors=True)
            self._ray_temp = None

    async def shutdown(self) -> None:
        await self.gateway.close()
        if self._control is not None:
            await asyncio.to_thread(self._control.close)
            self._control = None
        if self.loop is not None:
            await self.loop.close(stop_workers=True)
        await asyncio.to_thread(stop_ray)
        self._remove_ray_temp()
