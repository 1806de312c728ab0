"""Harness for operator tests: the Kubernetes API emulator in a thread of its own, a kubeconfig
pointing at it, and `modelloader operator` running in another thread (the real kopf operator,
configured the standard way: KUBECONFIG)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
from modelloader.operator_main import OperatorConfig, run_operator

from tests.support.kube_emulator import RealisticEmulator, register_modelloader_resources

LM_PATH = "/apis/modelloader.dev/v1alpha1/namespaces/{namespace}/loadedmodels"


class EmulatorThread(threading.Thread):
    def __init__(self, namespaces: tuple[str, ...] = ("default",)) -> None:
        super().__init__(daemon=True, name="kube-emulator")
        self.url = ""
        self.ready = threading.Event()
        self._namespaces = namespaces

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        self.emulator = RealisticEmulator()
        register_modelloader_resources(self.emulator, namespaces=self._namespaces)
        async with self.emulator, kmock.Server(self.emulator) as server:
            self.url = str(server.url).rstrip("/")
            self.ready.set()
            await self.stop_event.wait()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.join(10)

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "emulator",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "tester", "user": {"token": "test-token"}}],
                    "contexts": [
                        {"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}
                    ],
                }
            )
        )
        return path

    # What kubectl would do.

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        namespace = manifest["metadata"].get("namespace", "default")
        base = LM_PATH.format(namespace=namespace)
        code, _ = self.request("GET", f"{base}/{manifest['metadata']['name']}")
        if code == 404:
            code, body = self.request("POST", base, manifest)
        else:
            code, body = self.request(
                "PATCH",
                f"{base}/{manifest['metadata']['name']}",
                {"spec": manifest["spec"]},
                "application/merge-patch+json",
            )
        assert code in (200, 201), body
        return body

    def get(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        code, body = self.request("GET", f"{LM_PATH.format(namespace=namespace)}/{name}")
        return body if code == 200 else None

    def delete(self, name: str, namespace: str = "default") -> None:
        self.request("DELETE", f"{LM_PATH.format(namespace=namespace)}/{name}")


class OperatorThread(threading.Thread):
    def __init__(self, config: OperatorConfig) -> None:
        super().__init__(daemon=True, name="operator")
        self.config = config
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        try:
            with asyncio.Runner() as runner:
                self.loop = runner.get_loop()
                runner.run(run_operator(self.config, self.stop_flag, self.ready_flag))  # type: ignore[arg-type]
        except BaseException as error:  # surfaced by the test
            self.error = error

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(30)
        if not self.is_alive():
            return
        # Say where it hangs, then cancel what it still runs, so that a stuck operator's
        # control loop (unless blocked in a call that never returns) cannot go on removing
        # the workers of the tests after this one.
        try:
            report = self._where()
        except Exception as error:  # the loop runs on meanwhile: report what can be had
            report = f"(no report: {error!r})"
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # it closed since: nothing to cancel
                self.loop.call_soon_threadsafe(_cancel_everything, self.loop)
        self.join(15)
        raise AssertionError(f"the operator did not stop within 30 s:\n{report}")

    def _where(self) -> str:
        lines = []
        frames = sys._current_frames()
        for thread in threading.enumerate():
            frame = frames.get(thread.ident or -1)
            if frame is not None and thread is not threading.current_thread():
                stack = "".join(traceback.format_stack(frame, limit=12))
                lines.append(f"--- thread {thread.name}\n{stack}")
        if self.loop is not None:
            for _ in range(3):  # the set may change under us: the loop runs in its thread
                try:
                    tasks = list(asyncio.all_tasks(self.loop))
                    break
                except RuntimeError:
                    tasks = []
            for task in tasks:
                out = io.StringIO()
                task.print_stack(limit=8, file=out)
                lines.append(f"--- task {task.get_name()}\n{out.getvalue()}")
        return "\n".join(lines)


def _cancel_everything(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        task.cancel()


def wait_until(
    check: Callable[[], Any], timeout: float = 60, what: str | Callable[[], str] = ""
) -> Any:
    """`check()`'s first true value within `timeout` seconds. `what` names what is awaited
    in the failure; a callable is asked then (e.g. for a log as it is at the end)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    named = what() if callable(what) else what
    raise AssertionError(f"timed out waiting for {named or check}: last {last!r}")
