"""Landlock for a model process: what of the file system it may still read once it parses a
tenant's model.

The process reads its model file, the libraries and Python it runs on, and its own /proc
entry; everything else (another model's file in the node's cache, the Ray session's files and
token, a Kubernetes service-account token, /etc, home folders) is refused with EACCES. It
writes no file but /dev/null, and, on an accelerator, the device nodes the driver opens. Where
the kernel's Landlock is new enough it also refuses TCP bind and connect, abstract Unix
sockets and signals to processes outside the sandbox (ABI 4 and 6).

`rules` is the pure part (which paths, with which rights); `restrict` applies them,
irreversibly, to the calling thread and every thread it starts afterwards, not to threads
already running: the model process checks it is a single thread before it calls it
(`model_process.enter_sandbox`).
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import stat
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from modelloader_workers import c_library

# Filesystem rights (include/uapi/linux/landlock.h).
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
_ABI1_FS = (1 << 13) - 1  # execute .. make_sym: every right of ABI 1
TRUNCATE = 1 << 14  # ABI 3
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE  # what a rule on a file may hold
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_SYSCALLS = {"create_ruleset": 444, "add_rule": 445, "restrict_self": 446}  # every arch alike

READ = EXECUTE | READ_FILE | READ_DIR
READ_WRITE = READ | WRITE_FILE | TRUNCATE

# The system's libraries and what the loader and CPU detection (XNNPACK's cpuinfo) read.
SYSTEM_READS = (
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/proc/cpuinfo",
    "/sys/devices/system/cpu",
    "/dev/urandom",
)
# Where GPU and NPU runtimes look: their device nodes (not all of /dev: /dev/shm, ttys),
# Vulkan ICDs, PCI topology.
ACCELERATOR_DEVICES = ("/dev/nvidia*", "/dev/dri", "/dev/accel", "/dev/kfd", "/dev/apex_*")
ACCELERATOR_READS = (
    "/etc/vulkan",
    "/usr/share/vulkan",
    "/sys/bus/pci",
    "/sys/devices",
    "/sys/class",
)


@dataclass(frozen=True)
class Rule:
    path: str
    rights: int


def rules(
    model: str,
    python_paths: Iterable[str],
    libraries: Iterable[str] = (),
    accelerator: str = "cpu",
    devices: Iterable[str] = (),
    own_proc: str = "/proc/self",
) -> list[Rule]:
    """What a model process may reach: its model (read), Python and the packages it runs
    (`python_paths`: its prefixes and import path), extra `libraries` (a delegate's folder),
    the system's libraries, its own /proc entry, and on an accelerator its `devices` (see
    `accelerator_devices`). A path that is relative, or the root, grants nothing: either
    would open far more than it names."""
    out = [Rule(model, READ_FILE)]
    out += [Rule(p, READ) for p in dict.fromkeys([*python_paths, *libraries, *SYSTEM_READS])]
    out += [Rule(own_proc, READ), Rule("/dev/null", READ_FILE | WRITE_FILE)]
    if accelerator != "cpu":
        out += [Rule(p, READ) for p in ACCELERATOR_READS]
        out += [Rule(p, READ_WRITE) for p in devices]
    return [r for r in out if os.path.isabs(r.path) and os.path.normpath(r.path).strip("/")]


def accelerator_devices() -> list[str]:
    """The accelerators' device nodes present on this machine."""
    return sorted({p for pattern in ACCELERATOR_DEVICES for p in glob.glob(pattern)})


def python_paths() -> list[str]:
    """This interpreter's prefixes and the folders it imports from (`rules` drops the root,
    which a `python -m` without -P imports from when its working folder is "/")."""
    found = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    found += [p for p in sys.path if p and os.path.isdir(p)]
    return [os.path.realpath(p) for p in dict.fromkeys(found)]


def abi() -> int:
    """The kernel's Landlock ABI version; 0 where there is none."""
    if platform.system() != "Linux":
        return 0
    libc = c_library.handle()
    libc.syscall.restype = ctypes.c_long
    version = libc.syscall(
        ctypes.c_long(_SYSCALLS["create_ruleset"]),
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(_CREATE_RULESET_VERSION),
    )
    return max(0, int(version))


def handled(version: int) -> tuple[int, int, int]:
    """The filesystem rights, network rights and scopes this ABI can refuse."""
    fs = _ABI1_FS | (TRUNCATE if version >= 3 else 0)
    net = _NET_BIND_TCP | _NET_CONNECT_TCP if version >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL if version >= 6 else 0
    return fs, net, scoped


def restrict(chosen: Sequence[Rule]) -> str:
    """Apply `chosen` to this process. Returns what it did ("" where Landlock is missing);
    raises OSError if the kernel refuses. Paths that do not exist are skipped."""
    version = abi()
    if version <= 0:
        return ""
    fs, net, scoped = handled(version)
    libc = c_library.handle()
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    attr = struct.pack("=QQQ", fs, net, scoped)
    size = 8 if version < 4 else (16 if version < 6 else 24)
    buffer = ctypes.create_string_buffer(attr[:size], size)
    create = ctypes.c_long(_SYSCALLS["create_ruleset"])
    ruleset = syscall(create, buffer, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        for rule in chosen:
            _add(syscall, int(ruleset), rule, fs)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if syscall(ctypes.c_long(_SYSCALLS["restrict_self"]), ctypes.c_int(ruleset), 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
    return f"landlock (ABI {version}): reads only its model, Python and system libraries"


def _add(syscall: ctypes._NamedFuncPointer, ruleset: int, rule: Rule, fs: int) -> None:
    try:
        fd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # not on this machine: nothing to grant
    try:
        rights = rule.rights & fs
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS  # a rule on a file takes file rights only
        # struct landlock_path_beneath_attr { __u64 allowed_access; __s32 parent_fd; } packed
        attr = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)
        done = syscall(
            ctypes.c_long(_SYSCALLS["add_rule"]),
            ctypes.c_int(ruleset),
            ctypes.c_int(_RULE_PATH_BENEATH),
            attr,
            ctypes.c_uint32(0),
        )
        if done != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule({rule.path}) failed")
    finally:
        os.close(fd)
