"""The seccomp filter of a model process (`model_process`): the process that parses and runs
tenants' models, and nothing else.

A model process installs it on every thread at once (`confine_process`, SECCOMP_FILTER_FLAG_TSYNC)
after it has its listener and before it parses a model, so no thread of the process is left
unfiltered. Under it:

- exec (`execve`, `execveat`), new processes (`fork`, `vfork`, `clone` without
  CLONE_THREAD) and reading or tracing other processes (`ptrace`, `process_vm_readv/writev`)
  kill the whole process: a model that tries them is hostile, and its process dies alone;
  the supervisor reports the death;
- no new sockets of any family (`socket`, `socketpair`), no `bind`, `listen` or `connect`
  (EPERM): the process only accepts on the listener it was handed; no io_uring, whose socket
  operations would bypass these rules;
- nothing aimed at another process of the same user: `kill`, `tgkill`, `prlimit64`,
  `sched_setaffinity` and `setpriority` only on itself; `tkill`, pidfds, `process_madvise`,
  `migrate_pages`, `move_pages`, the scheduler's and I/O priority's setters, `kcmp`: EPERM;
- kernel surfaces inference never needs (`bpf`, `perf_event_open`, `userfaultfd`, `mount`,
  `unshare`, `setns`, `keyctl`, `kexec_load`, a further `seccomp()`) fail with EPERM;
- `clone3` fails with ENOSYS, so glibc creates threads with `clone`, whose flags the filter
  can read;
- everything else is allowed (memory, files Landlock lets it read (`landlock`), futexes,
  the descriptors it was given).

`confine_thread` installs the thread flavour (AF_UNIX sockets allowed) on the calling thread
only: `bench/sandbox_cost.py` measures the filter's cost with it.

Linux on x86_64 and aarch64 only; elsewhere the calls return False and `supported` says why.
`MODELLOADER_SANDBOX=off` in the worker's environment turns it off (to measure its cost).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass

from modelloader_workers import c_library

_ARCH = {
    "x86_64": 0xC000003E,  # AUDIT_ARCH_X86_64
    "aarch64": 0xC00000B7,  # AUDIT_ARCH_AARCH64
}
_NUMBERS = {
    "x86_64": {
        "execve": 59,
        "execveat": 322,
        "fork": 57,
        "vfork": 58,
        "clone": 56,
        "clone3": 435,
        "ptrace": 101,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "socket": 41,
        "connect": 42,
        "bpf": 321,
        "perf_event_open": 298,
        "userfaultfd": 323,
        "mount": 165,
        "unshare": 272,
        "setns": 308,
        "keyctl": 250,
        "kexec_load": 246,
        "socketpair": 53,
        "bind": 49,
        "listen": 50,
        "seccomp": 317,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "pidfd_open": 434,
        "pidfd_getfd": 438,
        "process_madvise": 440,
        "process_mrelease": 448,
        "tkill": 200,
        "migrate_pages": 256,
        "move_pages": 279,
        "sched_setscheduler": 144,
        "sched_setparam": 142,
        "sched_setattr": 314,
        "ioprio_set": 251,
        "kcmp": 312,
        "kill": 62,
        "tgkill": 234,
        "prlimit64": 302,
        "sched_setaffinity": 203,
        "setpriority": 141,
    },
    "aarch64": {
        "execve": 221,
        "execveat": 281,
        "clone": 220,
        "clone3": 435,
        "ptrace": 117,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "socket": 198,
        "connect": 203,
        "bpf": 280,
        "perf_event_open": 241,
        "userfaultfd": 282,
        "mount": 40,
        "unshare": 97,
        "setns": 268,
        "keyctl": 219,
        "kexec_load": 104,
        "socketpair": 199,
        "bind": 200,
        "listen": 201,
        "seccomp": 277,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "pidfd_open": 434,
        "pidfd_getfd": 438,
        "process_madvise": 440,
        "process_mrelease": 448,
        "tkill": 130,
        "migrate_pages": 238,
        "move_pages": 239,
        "sched_setscheduler": 119,
        "sched_setparam": 118,
        "sched_setattr": 274,
        "ioprio_set": 30,
        "kcmp": 272,
        "kill": 129,
        "tgkill": 131,
        "prlimit64": 261,
        "sched_setaffinity": 122,
        "setpriority": 140,
    },
}
KILLED = ("execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev")
REFUSED = (
    "connect",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "mount",
    "unshare",
    "setns",
    "keyctl",
    "kexec_load",
)
# Refused as well in a model process: it makes no sockets; no io_uring (whose socket and connect
# operations seccomp never sees); nothing that reaches another process of the same user (its
# descriptors, memory, scheduling, priority); no further seccomp() call.
REFUSED_IN_PROCESS = (
    "socketpair",
    "bind",
    "listen",
    "seccomp",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "pidfd_open",
    "pidfd_getfd",
    "process_madvise",
    "process_mrelease",
    "tkill",
    "migrate_pages",
    "move_pages",
    "sched_setscheduler",
    "sched_setparam",
    "sched_setattr",
    "ioprio_set",
    "kcmp",
)
# Allowed in a model process only on itself: (syscall, the argument naming the target, whether
# 0 also means itself). abort() signals itself with tgkill; kill(0) would reach the group.
SELF_ONLY = (
    ("kill", 0, False),
    ("tgkill", 0, False),
    ("prlimit64", 0, True),
    ("sched_setaffinity", 0, True),
    ("setpriority", 1, True),
)

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JSET_K = 0x45
_JGE_K = 0x35
_RET_K = 0x06
_RET_KILL_PROCESS = 0x80000000
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_CLONE_THREAD = 0x00010000
_AF_UNIX = 1
_X32_BIT = 0x40000000
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6];
_NR, _ARCH_OFFSET, _ARG0 = 0, 4, 16


@dataclass(frozen=True)
class Insn:
    code: int
    jt: int
    jf: int
    k: int


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def program(machine: str, whole_process: bool = False, own_pid: int = 0) -> list[Insn]:
    """The filter as classic BPF. Each rule is `if nr == N: <body ending in a return>`, so a
    mismatch jumps over the body with the syscall number still in the accumulator.
    `whole_process`: a model process's (its pid `own_pid`), which refuses every new socket and
    every call on another process."""
    if whole_process and own_pid <= 0:
        raise ValueError("a model process's filter needs its own pid")
    numbers = _NUMBERS[machine]
    out = [
        Insn(_LD_W_ABS, 0, 0, _ARCH_OFFSET),
        Insn(_JEQ_K, 1, 0, _ARCH[machine]),
        Insn(_RET_K, 0, 0, _RET_KILL_PROCESS),  # another ABI: nothing here uses one
        Insn(_LD_W_ABS, 0, 0, _NR),
    ]
    if machine == "x86_64":  # the x32 ABI shares the architecture tag; refuse it whole
        out += [Insn(_JGE_K, 0, 1, _X32_BIT), Insn(_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS)]

    def rule(name: str, body: list[Insn]) -> None:
        if name in numbers:
            out.append(Insn(_JEQ_K, 0, len(body), numbers[name]))
            out.extend(body)

    for name in KILLED:
        rule(name, [Insn(_RET_K, 0, 0, _RET_KILL_PROCESS)])
    rule(
        "clone",
        [
            Insn(_LD_W_ABS, 0, 0, _ARG0),  # flags (low 32 bits)
            Insn(_JSET_K, 0, 1, _CLONE_THREAD),
            Insn(_RET_K, 0, 0, _RET_ALLOW),  # a thread
            Insn(_RET_K, 0, 0, _RET_KILL_PROCESS),  # a process
        ],
    )
    rule("clone3", [Insn(_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS)])
    if whole_process:
        rule("socket", [Insn(_RET_K, 0, 0, _RET_ERRNO | errno.EPERM)])
    else:
        rule(
            "socket",
            [
                Insn(_LD_W_ABS, 0, 0, _ARG0),  # domain
                Insn(_JEQ_K, 0, 1, _AF_UNIX),
                Insn(_RET_K, 0, 0, _RET_ALLOW),
                Insn(_RET_K, 0, 0, _RET_ERRNO | errno.EPERM),
            ],
        )
    for name in REFUSED + (REFUSED_IN_PROCESS if whole_process else ()):
        rule(name, [Insn(_RET_K, 0, 0, _RET_ERRNO | errno.EPERM)])
    if whole_process:
        for name, argument, zero_is_self in SELF_ONLY:
            selves = [own_pid, 0] if zero_is_self else [own_pid]
            body = [Insn(_LD_W_ABS, 0, 0, _ARG0 + 8 * argument)]  # its low 32 bits: a pid_t
            # Each match jumps over the checks after it and the refusal, to the allow.
            body += [Insn(_JEQ_K, len(selves) - i, 0, k) for i, k in enumerate(selves)]
            body += [
                Insn(_RET_K, 0, 0, _RET_ERRNO | errno.EPERM),
                Insn(_RET_K, 0, 0, _RET_ALLOW),
            ]
            rule(name, body)
    out.append(Insn(_RET_K, 0, 0, _RET_ALLOW))
    return out


def supported() -> str | None:
    """None when the filter can be installed here, else why not."""
    if os.environ.get("MODELLOADER_SANDBOX", "").lower() in ("off", "0", "false"):
        return "turned off by MODELLOADER_SANDBOX"
    if platform.system() != "Linux":
        return f"seccomp needs Linux, not {platform.system()}"
    if platform.machine() not in _NUMBERS:
        return f"no seccomp profile for {platform.machine()}"
    return None


def _fprog(whole_process: bool) -> tuple[_SockFprog, ctypes.Array[_SockFilter]]:
    insns = program(platform.machine(), whole_process, os.getpid() if whole_process else 0)
    array = (_SockFilter * len(insns))(*(_SockFilter(i.code, i.jt, i.jf, i.k) for i in insns))
    return _SockFprog(len(insns), ctypes.cast(array, ctypes.POINTER(_SockFilter))), array


def _no_new_privs(libc: ctypes.CDLL) -> None:
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if prctl(_PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


def confine_thread() -> bool:
    """Install the thread flavour on the calling thread (and the threads it starts from now
    on). Irreversible. False where unsupported; raises OSError if the kernel refuses."""
    if supported() is not None:
        return False
    fprog, _keep = _fprog(whole_process=False)
    libc = c_library.handle()
    _no_new_privs(libc)
    prctl = libc.prctl
    if prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
    return True


def confine_process() -> bool:
    """Install the model process's filter on every thread of the process at once (threads a
    library started at import included). Irreversible. False where unsupported; raises OSError
    if the kernel refuses (or a thread could not be synchronised)."""
    if supported() is not None:
        return False
    fprog, _keep = _fprog(whole_process=True)
    libc = c_library.handle()
    _no_new_privs(libc)  # TSYNC carries it to the other threads
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    number = _NUMBERS[platform.machine()]["seccomp"]
    done = syscall(
        ctypes.c_long(number),
        ctypes.c_ulong(_SECCOMP_SET_MODE_FILTER),
        ctypes.c_ulong(_SECCOMP_FILTER_FLAG_TSYNC),
        ctypes.c_void_p(ctypes.addressof(fprog)),
    )
    if done != 0:
        if done > 0:
            raise OSError(errno.EBUSY, f"seccomp: thread {done} could not take the filter")
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_SET_MODE_FILTER, TSYNC) failed")
    return True


def describe() -> str:
    return (
        "seccomp on every thread: exec, fork and ptrace kill the process; "
        "no new sockets, bind, listen or connect"
    )


def packed(machine: str, whole_process: bool = False, own_pid: int = 0) -> bytes:
    """The filter as the kernel reads it (for tests and inspection)."""
    insns = program(machine, whole_process, own_pid)
    return b"".join(struct.pack("<HBBI", i.code, i.jt, i.jf, i.k) for i in insns)
