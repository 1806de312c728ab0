"""The model process: a fresh interpreter that holds one tenant model and its data-path
listener, and nothing else.

The worker (the Ray actor, `worker`) is the supervisor: it fetches the model, makes the
listener, and has one model process per model it hosts. The child is never a fork of the Ray
worker: it is a fresh `python -m modelloader_workers.model_process` (`ModelProcess.start`), or
a fork of the worker's spawner, itself such a fresh interpreter that never sees a model
(`spawner`: one interpreter's start per worker instead of per model). Either way it has a clean
environment (no Ray token, no service-account token, nothing of the worker's but where programs
and libraries are) and no descriptors but its control socket. It has imported LiteRT when it
waits for its one load (so a warm worker keeps a warm model process). The load arrives on the
control socket with the listener's descriptor; before it parses the model the child:

1. limits itself (`process_limits`: no core dumps, not dumpable, open files, address space);
2. restricts the file system (`landlock`): its model, Python and the system's libraries;
3. installs the seccomp filter on every thread (`sandbox.confine_process`): no exec, no fork,
   no ptrace, no new sockets, no connect;

then loads the model, answers what it loaded (JSON: the supervisor never unpickles what a
process that parsed a tenant's file says), and serves the data path on the listener until the
control socket closes (the model unloaded, or the supervisor gone: it also dies with its
parent). The gateway talks to it directly: one hop, as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from modelloader_workers import c_library, landlock, process_limits, sandbox
from modelloader_workers.batching import BatchPolicy
from modelloader_workers.loading import ExternalDelegate, ModelLoadError
from modelloader_workers.wire.signature import Signature

MODULE = "modelloader_workers.model_process"
# What the child keeps of the worker's environment: where programs and libraries are, and
# what selects an accelerator (Ray sets CUDA_VISIBLE_DEVICES for a GPU actor).
KEPT_ENVIRONMENT = (
    "PATH",
    "LANG",
    "LC_ALL",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
    "VK_ICD_FILENAMES",
    "MODELLOADER_SANDBOX",
)
# Landlock binds the thread that applies it and the threads it starts, not threads already
# running: numpy's BLAS would start a pool at import. The model process must be one thread
# when it restricts itself (checked: `enter_sandbox`).
SINGLE_THREADED = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# A control message: the load's settings, or the reply with a model's signature. A reply goes
# in chunks (a SEQPACKET message is bounded by the socket's buffer, about 200 KiB).
MESSAGE_BYTES = 1 << 20
CHUNK_BYTES = 1 << 16
_LENGTH = struct.Struct("<Q")
STOP_SECONDS = 5.0
# A parse that spins (a hostile file, a runtime that hangs) must not hold its LoadedModel in
# Loading for ever; compiling a large model for an accelerator takes minutes at most.
LOAD_SECONDS = 600.0
WARM_IMPORTS = (
    "modelloader_workers.accelerated_runner",
    "modelloader_workers.batch_runner",
    "modelloader_workers.worker_server",
)
_PR_SET_PDEATHSIG = 1
PROCESS_NAME = "ml-model"  # its comm, as `ps` shows it (a fork's argv is its spawner's)


@dataclass(frozen=True)
class ProcessLoad:
    """What the model process is told to load, as the supervisor decided it."""

    model: str  # the file's path in the node's cache
    threads: int = 1
    accelerator: str = "cpu"
    delegation: str = "partitioned"
    delegate: ExternalDelegate | None = None
    memory_limit: int = 0  # bytes the model may add to the process; 0: unlimited
    batching: BatchPolicy | None = None
    precision: str = "fp32"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> ProcessLoad:
        delegate = data.get("delegate")
        batching = data.get("batching")
        return ProcessLoad(
            model=str(data["model"]),
            threads=int(data["threads"]),
            accelerator=str(data["accelerator"]),
            delegation=str(data["delegation"]),
            delegate=(
                ExternalDelegate(
                    str(delegate["path"]), tuple((str(k), str(v)) for k, v in delegate["options"])
                )
                if delegate
                else None
            ),
            memory_limit=int(data["memory_limit"]),
            batching=(
                BatchPolicy(
                    int(batching["max_batch_size"]),
                    float(batching["max_queue_delay_seconds"]),
                    tuple(int(n) for n in batching["preferred_batch_sizes"]),
                )
                if batching
                else None
            ),
            precision=str(data["precision"]),
        )


@dataclass(frozen=True)
class ProcessLoaded:
    """What a model process says it loaded. Read from an untrusted process: plain data."""

    signature: Signature
    accelerator: str
    delegate: str
    delegated_ops_share: float | None
    note: str
    precision: str
    load_seconds: float
    sandbox: str  # what confines it ("": nothing could)


class ChildProcess(Protocol):
    """What the supervisor needs of a model process's process: a `subprocess.Popen`, or an
    `AdoptedProcess` (forked by the spawner, then adopted)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class AdoptedProcess:
    """A process this one did not start but became the parent of: a model process forked by
    the spawner, adopted by the supervisor as the child subreaper it made itself
    (`spawner`). Waited for like a child it started (its exit status, as Popen's returncode),
    through a pidfd, so a signal never reaches a process that reused its number."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._pidfd = os.pidfd_open(pid)
        self._closer = weakref.finalize(self, os.close, self._pidfd)
        self._code: int | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self._pid

    def poll(self) -> int | None:
        with self._lock:
            if self._code is None:
                try:
                    done, status = os.waitpid(self._pid, os.WNOHANG)
                except ChildProcessError:  # not ours after all: gone is all we can say
                    done, status = self._pid, 0
                if done:
                    self._code = os.waitstatus_to_exitcode(status)
            return self._code

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                raise subprocess.TimeoutExpired(str(self._pid), timeout or 0.0)
            # Readable once it has exited; the wait above then reaps it. poll, not select:
            # a supervisor of hundreds of models has descriptors past select's 1024.
            watcher = select.poll()
            watcher.register(self._pidfd, select.POLLIN)
            watcher.poll(None if left is None else max(1, math.ceil(left * 1000)))
        return code

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)


class ModelProcess:
    """The supervisor's handle on one model process."""

    def __init__(self, process: ChildProcess, control: socket.socket) -> None:
        self._process = process
        self._control = control
        self._stopping = False
        self._loaded = False

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    @staticmethod
    def start(
        entry: str = MODULE, args: Sequence[str] = (), python_path: Sequence[str] = ()
    ) -> ModelProcess:
        """A new model process, importing LiteRT while it waits for its load. Tests start a
        probe instead (`entry`, `args`, and where it is imported from: `python_path`) that
        sandboxes itself the same way."""
        process, control = start_clean(entry, args, python_path)
        return ModelProcess(process, control)

    @property
    def control(self) -> socket.socket:
        """The supervisor's end of the control socket (tests talk to a probe on it)."""
        return self._control

    def load(self, request: ProcessLoad, listener: socket.socket) -> ProcessLoaded:
        """Hand over the listener and load; raises ModelLoadError with the child's reason, or
        how it died. Whatever fails, the process is stopped unless it loaded."""
        try:
            loaded = self._load(request, listener)
        except BaseException:
            self.stop()
            raise
        self._loaded = True
        return loaded

    def _load(self, request: ProcessLoad, listener: socket.socket) -> ProcessLoaded:
        message = json.dumps({"load": request.to_json()}).encode()
        self._control.settimeout(LOAD_SECONDS)
        try:
            socket.send_fds(self._control, [message], [listener.fileno()])
            answer = receive_message(self._control)
        except TimeoutError:
            raise ModelLoadError(
                f"the model did not load within {LOAD_SECONDS:g} s (its process was stopped)"
            ) from None
        except OSError:
            answer = None
        except ValueError as error:
            raise ModelLoadError(f"the model process answered nonsense: {error}") from None
        finally:
            with contextlib.suppress(OSError):
                self._control.settimeout(None)
        if answer is None:
            raise ModelLoadError(self._death())
        try:
            reply = json.loads(answer)
            if "error" in reply:
                raise ModelLoadError(str(reply["error"])[:2000])
            share = reply["delegated_ops_share"]
            return ProcessLoaded(
                signature=Signature.from_dict(reply["signature"]),
                accelerator=str(reply["accelerator"])[:100],
                delegate=str(reply["delegate"])[:200],
                delegated_ops_share=None if share is None else float(share),
                note=str(reply["note"])[:2000],
                precision=str(reply["precision"])[:100],
                load_seconds=float(reply["load_seconds"]),
                sandbox=str(reply["sandbox"])[:500],
            )
        except ModelLoadError:
            raise
        except Exception as error:  # anything an untrusted process can make a parser raise
            raise ModelLoadError(
                f"the model process answered nonsense: {type(error).__name__}"
            ) from None

    def wait(self, timeout: float) -> int:
        """Its exit status, once it ends (a signal's as its negative number)."""
        return self._process.wait(timeout)

    def watch(self, on_death: Callable[[str], None]) -> None:
        """Call `on_death(how)` from a thread of its own if the process ends while serving
        (not after `stop`)."""

        def wait() -> None:
            self._process.wait()
            if not self._stopping:
                try:
                    how = self._death()
                except Exception as error:  # still a death
                    how = f"the model process ended ({type(error).__name__})"
                on_death(how)

        threading.Thread(target=wait, name=f"model-process-{self.pid}", daemon=True).start()

    def stop(self) -> None:
        """End it: the control socket closes, the child stops serving and exits; killed if it
        does not within STOP_SECONDS."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._control.close()
        try:
            self._process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _death(self) -> str:
        try:
            code = self._process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            return "the model process stopped answering and was killed"
        when = "while serving" if self._loaded else "while loading the model"
        if code >= 0:
            return f"the model process died {when} (exit status {code})"
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if -code == signal.SIGSYS:
            return (
                f"the model process died {when}: its sandbox killed it (SIGSYS) for a "
                "forbidden system call (exec, fork or ptrace)"
            )
        return f"the model process died {when} (killed by {name})"


def start_clean(
    entry: str, args: Sequence[str] = (), python_path: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """`python -m entry FD *args`: a fresh interpreter with a clean environment and no
    descriptors but its end of the control socket (FD); returns it and our end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    environment = {k: os.environ[k] for k in KEPT_ENVIRONMENT if k in os.environ}
    package_root = str(Path(__file__).resolve().parent.parent)
    try:
        process = subprocess.Popen(
            [sys.executable, "-s", "-P", "-m", entry, str(theirs.fileno()), *args],
            env=environment
            | SINGLE_THREADED
            | {"PYTHONPATH": ":".join([package_root, *python_path])},
            stdin=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            close_fds=True,
            cwd="/",
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return process, ours


def send_message(control: socket.socket, data: bytes) -> None:
    """A message of any size on the SEQPACKET control socket: its length, then chunks."""
    control.send(_LENGTH.pack(len(data)))
    for start in range(0, len(data), CHUNK_BYTES):
        control.send(data[start : start + CHUNK_BYTES])


def receive_message(control: socket.socket, limit: int = MESSAGE_BYTES) -> bytes | None:
    """What `send_message` sent; None at the end of the socket; ValueError past `limit`."""
    head = control.recv(_LENGTH.size)
    if len(head) != _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(head)
    if length > limit:
        raise ValueError(f"a message of {length} bytes, over the limit of {limit}")
    parts, got = [], 0
    while got < length:
        part = control.recv(CHUNK_BYTES)
        if not part:
            return None
        parts.append(part)
        got += len(part)
    return b"".join(parts)


# The child's side.


def die_with_parent(parent: int | None = None) -> None:
    """SIGKILL when the parent ends; exits now if it already has (its parent is no longer
    `parent`, or is init)."""
    libc = c_library.handle()
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    now = os.getppid()
    if now == 1 or (parent is not None and now != parent):  # it died before the line above
        os._exit(0)


def enter_sandbox(request: ProcessLoad) -> tuple[str, bool]:
    """Everything a model process does to itself before it parses a tenant's model. Returns
    what confines it and whether its memory is limited; raises OSError if it cannot."""
    from modelloader_workers.worker_server import serve_at_default_priority

    process_limits.harden()
    limited = False
    budget = process_limits.model_budget(request.memory_limit, request.threads)
    if budget:
        baseline = process_limits.address_space()
        limited = process_limits.limit_memory(process_limits.MemoryBudget(baseline, budget))
    serve_at_default_priority()  # before the filter, which allows it only on the process
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threads != 1:  # Landlock would leave the others unbound
        raise OSError(f"{threads} threads before the sandbox: the model process needs one")
    delegate = request.delegate.path if request.delegate else ""
    libraries = [str(Path(delegate).parent)] if os.path.isabs(delegate) else []
    rules = landlock.rules(
        request.model,
        landlock.python_paths(),
        libraries,
        request.accelerator,
        landlock.accelerator_devices() if request.accelerator != "cpu" else (),
    )
    confined = [landlock.restrict(rules)]
    if not confined[0]:
        print("models run without Landlock: the kernel has none", file=sys.stderr)
    if sandbox.confine_process():
        confined.insert(0, sandbox.describe())
    elif (reason := sandbox.supported()) is not None and "turned off" not in reason:
        print(f"models run without a seccomp sandbox: {reason}", file=sys.stderr)
    return "; ".join(c for c in confined if c), limited


def _load(request: ProcessLoad, listener: socket.socket) -> tuple[Any, dict[str, Any]]:
    from modelloader_workers.accelerated_runner import load_runner
    from modelloader_workers.batch_runner import check_batchable
    from modelloader_workers.wire.address import Address
    from modelloader_workers.worker_server import WorkerServer

    try:
        confinement, limited = enter_sandbox(request)
    except OSError as error:
        return None, {"error": f"the model process could not sandbox itself: {error}"}
    try:
        runner, execution = load_runner(
            request.model,
            request.threads,
            request.accelerator,
            request.delegation,
            request.delegate,
            request.precision,
        )
        if request.batching is not None:
            check_batchable(runner, request.batching.max_batch_size)
        # Where it answers is the supervisor's to say: the listener is all the child needs.
        server = WorkerServer(runner, (listener, Address("tcp", "", 0)), request.batching)
    except (ModelLoadError, MemoryError, OSError) as error:
        text = str(error).strip() or type(error).__name__
        if limited:
            mib = request.memory_limit // process_limits.MiB
            text += (
                f" (the model may use up to {mib} MiB of memory: "
                "raise spec.resources.memory if it needs more)"
            )
        return None, {"error": text}
    return server, {
        "signature": server.signature.to_dict(),
        "accelerator": execution.accelerator,
        "delegate": execution.delegate,
        "delegated_ops_share": execution.delegated_ops_share,
        "note": execution.note,
        "precision": execution.precision,
        "load_seconds": runner.load_seconds,
        "sandbox": confinement,
    }


def receive_load(control: socket.socket) -> tuple[ProcessLoad, socket.socket] | None:
    """The one load this process gets, with its listener; None if the supervisor went away."""
    message, fds, _flags, _address = socket.recv_fds(control, MESSAGE_BYTES, 1)
    if not message or not fds:
        return None
    listener = socket.socket(fileno=fds[0])
    return ProcessLoad.from_json(json.loads(message)["load"]), listener


def warm_up() -> None:
    """What a model process imports before its load (a warm one has paid for them). Not at
    this module's import: the supervisor imports it too, and needs neither numpy nor LiteRT."""
    from modelloader_workers import litert_runner

    for module in WARM_IMPORTS:
        importlib.import_module(module)
    litert_runner.preload()


def name_process(name: str) -> None:
    """What `ps` and `top` show for this process (its comm, 15 bytes at most)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(name[:15])


def main(argv: list[str]) -> int:
    die_with_parent()
    name_process(PROCESS_NAME)
    control = socket.socket(fileno=int(argv[1]))
    warm_up()  # while waiting for the load
    return serve(control)


def serve(control: socket.socket, supervisor: int | None = None) -> int:
    """Wait for the load, load, serve until the control socket closes. A forked model
    process (`spawner`) is told its `supervisor`, which has adopted it by the time the load
    arrives: from then on it dies with it."""
    from modelloader_workers.gc_pauses import freeze_long_lived

    received = receive_load(control)
    if received is None:
        return 0
    if supervisor is not None:
        die_with_parent(supervisor)
    request, listener = received
    server, reply = _load(request, listener)
    send_message(control, json.dumps(reply).encode())
    if server is None:
        return 0
    freeze_long_lived(collect=True)
    while control.recv(16):  # nothing is sent after the load: this waits for the close
        pass
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
