"""The spawner: a clean interpreter that has imported LiteRT, and forks model processes.

A model process started as a fresh interpreter spends about 0.2 s of CPU on Python's start and
its imports (numpy, LiteRT) before it sees its model: 500 models on a 2-core node spent more
than a minute of the node's time on that alone (bench/RESULTS.md). A supervisor's spawner pays
it once. The spawner is started the way a model process is (`model_process.start_clean`: a
fresh `python -m`, a clean environment, no descriptors but its control socket), imports what a
model process imports, then only forks. It never receives a model or a listener, so what a
model process inherits from it is what a fresh one would have had: the clean environment and
the imports. Two things are shared by the model processes of one spawner, that is of one
worker (one origin's models on one node): the address-space layout and Python's hash seed.

Each model process is forked twice: the middle process exits at once, so the model process
is adopted by the supervisor, which made itself a child subreaper (`prctl`) before it started
the spawner. The supervisor then waits for it like a child of its own (`AdoptedProcess`) and
learns how it died (a SIGSYS from its sandbox) as before. The model process closes every
descriptor but its control socket, and sandboxes itself when its load arrives, exactly as a
fresh one does (`model_process.serve`).

`python -m modelloader_workers.spawner FD` is the spawner's side.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback

from modelloader_workers import c_library, model_process
from modelloader_workers.model_process import AdoptedProcess, ModelProcess

MODULE = "modelloader_workers.spawner"
PROCESS_NAME = "ml-spawner"  # its comm, as `ps` shows it
_PR_SET_CHILD_SUBREAPER = 36
# A spawner still importing (a node starting many at once) answers its first fork late.
SPAWN_SECONDS = 120.0
_REPLY_BYTES = 256


def become_subreaper() -> bool:
    """Orphaned descendants of this process become its children (Linux 3.4+)."""
    try:
        libc = c_library.handle()
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class Spawner:
    """The supervisor's handle on its spawner."""

    def __init__(self, process: subprocess.Popen[bytes], control: socket.socket) -> None:
        self._process = process
        self._control = control
        self._lock = threading.Lock()
        self._broken = False

    @staticmethod
    def start() -> Spawner | None:
        """A spawner, or None where this process cannot adopt what it forks (or wait for it
        through a pidfd: Linux 5.3+) or cannot start one."""
        try:
            os.close(os.pidfd_open(os.getpid()))
        except (OSError, AttributeError):
            return None
        if not become_subreaper():
            return None
        try:
            process, control = model_process.start_clean(MODULE)
        except OSError:
            return None
        return Spawner(process, control)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.poll() is None and not self._broken

    def spawn(self) -> ModelProcess:
        """A new model process, waiting for its load. OSError if the spawner cannot fork;
        after a failure of the channel itself (a timeout, the spawner gone) it is stopped
        and refuses every later call (a late answer would be taken for the next one's)."""
        if self._broken:
            raise OSError("the spawner was stopped after a failure")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self._lock:
                self._control.settimeout(SPAWN_SECONDS)
                socket.send_fds(self._control, [b"spawn"], [theirs.fileno()])
                reply = self._control.recv(_REPLY_BYTES)
        except BaseException:
            ours.close()
            self.stop()
            raise
        finally:
            theirs.close()
        if not reply.startswith(b"pid "):
            ours.close()
            if not reply:
                self.stop()
            why = reply.decode(errors="replace") if reply else "the spawner ended"
            raise OSError(f"no model process: {why}")
        try:
            pid = int(reply[4:])
        except ValueError:
            ours.close()
            self.stop()
            raise OSError(f"the spawner answered nonsense: {reply[:40]!r}") from None
        try:
            return ModelProcess(AdoptedProcess(pid), ours)
        except OSError:
            ours.close()
            _reap(pid)
            raise

    def stop(self) -> None:
        self._broken = True
        with contextlib.suppress(OSError):
            self._control.close()
        try:
            self._process.wait(model_process.STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _reap(pid: int) -> None:
    """A forked model process that could not be handed over: ours (adopted), so killed and
    waited for here rather than left a zombie."""
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# The spawner's side.


def _become_model_process(fd: int, supervisor: int) -> None:
    """In the forked model process: keep only the control socket (and the standard streams),
    then be a model process. Never returns into the spawner's loop."""
    code = 1
    try:
        os.closerange(3, fd)
        os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
        model_process.name_process(model_process.PROCESS_NAME)
        code = model_process.serve(socket.socket(fileno=fd), supervisor)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def fork_model_process(fd: int, supervisor: int) -> int:
    """Fork a model process serving the control socket `fd`, through a middle process that
    exits at once (so the supervisor, a subreaper, adopts it); returns its pid."""
    read, write = os.pipe()
    try:
        middle = os.fork()
    except OSError:
        os.close(read)
        os.close(write)
        raise
    if middle == 0:
        try:
            os.close(read)
            child = os.fork()
            if child == 0:
                os.close(write)
                _become_model_process(fd, supervisor)
            os.write(write, str(child).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        told = pipe.read()
    os.waitpid(middle, 0)  # gone: its child is the supervisor's now
    if not told:
        raise OSError("the middle process could not fork")
    return int(told)


def main(argv: list[str]) -> int:
    model_process.die_with_parent()
    model_process.name_process(PROCESS_NAME)
    supervisor = os.getppid()
    control = socket.socket(fileno=int(argv[1]))
    model_process.warm_up()
    gc.collect()
    gc.freeze()  # the collector would write to pages the forks share with the spawner
    while True:
        message, fds, _flags, _address = socket.recv_fds(control, 64, 1)
        if not message:
            return 0
        if not fds:
            continue
        sys.stdout.flush()  # else each fork would write what is buffered again
        sys.stderr.flush()
        try:
            reply = f"pid {fork_model_process(fds[0], supervisor)}"
        except OSError as error:
            reply = f"the spawner could not fork: {error.strerror or error}"
        finally:
            os.close(fds[0])
        control.send(reply.encode())


if __name__ == "__main__":
    sys.exit(main(sys.argv))
