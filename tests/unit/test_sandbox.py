"""The seccomp filter, installed for real in a child process (it cannot be undone): what it
refuses, what it kills, and that it binds only the thread that installs it and its children."""

from __future__ import annotations

import platform
import signal
import subprocess
import sys
import textwrap

import pytest
from modelloader_workers import sandbox

pytestmark = pytest.mark.skipif(
    sandbox.supported() is not None, reason=f"no seccomp here: {sandbox.supported()}"
)

PRELUDE = textwrap.dedent(
    """
    import os, socket, threading
    from modelloader_workers import sandbox
    go = threading.Event()
    earlier = []
    def unconfined():
        go.wait()
        socket.socket(socket.AF_INET).close()
        earlier.append("ok")
    before = threading.Thread(target=unconfined)
    before.start()
    assert sandbox.confine_thread()
    """
)


def run(body: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_network_sockets_are_refused_unix_sockets_and_compute_allowed() -> None:
    done = run(
        """
        socket.socket(socket.AF_UNIX).close()
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                socket.socket(family)
                raise SystemExit("a network socket was allowed")
            except PermissionError:
                pass
        later = []
        def child():
            try:
                socket.socket(socket.AF_INET)
                later.append("allowed")
            except PermissionError:
                later.append("refused")
        t = threading.Thread(target=child); t.start(); t.join()
        assert later == ["refused"], later  # threads started from now on inherit it
        go.set(); before.join()
        assert earlier == ["ok"], earlier  # threads started before are not bound
        import numpy
        print(float(numpy.arange(10).sum()))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "45.0"


@pytest.mark.parametrize(
    "attempt",
    [
        "os.fork()",
        "os.execv('/bin/true', ['true'])",
        "import subprocess; subprocess.run(['/bin/true'])",
        "import ctypes; ctypes.CDLL(None).ptrace(0, 0, 0, 0)",
    ],
)
def test_exec_fork_and_ptrace_kill_the_process(attempt: str) -> None:
    done = run(attempt + "\nprint('survived')")
    assert done.returncode == -signal.SIGSYS, (done.returncode, done.stdout, done.stderr)
    assert "survived" not in done.stdout


@pytest.mark.parametrize("whole_process", [False, True])
@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_every_jump_lands_inside_the_program(machine: str, whole_process: bool) -> None:
    insns = sandbox.program(machine, whole_process, own_pid=4242)
    for index, insn in enumerate(insns):
        if insn.code & 0x07 == 0x05:  # a jump
            assert index + 1 + max(insn.jt, insn.jf) < len(insns)
    assert insns[-1].code == 0x06  # ends in a return
    assert len(sandbox.packed(machine, whole_process, 4242)) == 8 * len(insns)


def test_the_process_wide_filter_binds_threads_started_before_it() -> None:
    """A model process's filter (TSYNC): threads a library started at import are bound too; no
    socket of any family may be made; another process may not be signalled, reprioritised,
    pinned or limited, while the process may do all of that to itself."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import socket, threading
                from modelloader_workers import sandbox
                go, seen = threading.Event(), []
                def earlier():
                    go.wait()
                    for family in (socket.AF_INET, socket.AF_UNIX):
                        try:
                            socket.socket(family).close()
                            seen.append("allowed")
                        except PermissionError:
                            seen.append("refused")
                thread = threading.Thread(target=earlier)
                thread.start()
                import os, signal, subprocess, sys
                sibling = subprocess.Popen(
                    ["sleep", "5"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                assert sandbox.confine_process()
                go.set(); thread.join()
                for attempt in (
                    lambda: os.kill(sibling.pid, signal.SIGTERM),
                    lambda: os.kill(0, 0),
                    lambda: os.setpriority(os.PRIO_PROCESS, sibling.pid, 19),
                    lambda: os.sched_setaffinity(sibling.pid, {0}),
                    lambda: __import__("resource").prlimit(sibling.pid, 7, (3, 3)),
                ):
                    try:
                        attempt()
                        seen.append("allowed")
                    except PermissionError:
                        seen.append("refused")
                os.setpriority(os.PRIO_PROCESS, 0, 0)  # on itself: allowed
                os.sched_setaffinity(0, os.sched_getaffinity(0))
                os.kill(os.getpid(), 0)
                print(seen)
                """
            ),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(["refused"] * 7)


def test_this_machine_is_covered() -> None:
    assert platform.machine() in ("x86_64", "aarch64")
