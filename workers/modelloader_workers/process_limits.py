"""Limits a model process (`model_process`) puts on itself before it parses a tenant's model.

- Memory: RLIMIT_AS, the address space. An interpreter maps memory it never touches (thread
  stacks, libraries' reservations), so the limit is the process's size before it loads its
  model plus what the model may grow by (its LoadedModel's `resources.memory`). An allocation
  past it fails inside LiteRT, which then fails the load (or the request) of that model alone;
  if the process dies instead, it is that model's process and no one else's. The hard limit
  is set too: code run by the model cannot raise it.
- Core dumps off, and the process not dumpable: a crash writes no tenant data to disk, and no
  other process of the same user can attach to it.
- Open files bounded (hard).
- glibc's malloc arenas capped: each one reserves 64 MiB of address space per thread, which
  would spend the budget on nothing.

Where a platform lacks a call (macOS has no prctl), the limit is skipped and `applied` says so.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from modelloader_workers import c_library

MiB = 1 << 20
# Headroom beyond the models' own budget: the data path's serving thread and its connections'
# buffers, numpy's buffers, Python.
SLACK_BYTES = 384 * MiB
# Every interpreter thread reserves a stack; counted so that threads do not eat the budget.
THREAD_STACK_BYTES = 8 * MiB
OPEN_FILES = 4096
_PR_SET_DUMPABLE = 4
_M_ARENA_MAX = -8


@dataclass(frozen=True)
class MemoryBudget:
    baseline: int  # the process's address space before its first model
    models: int  # what the hosted models may grow by, together

    @property
    def limit(self) -> int:
        return self.baseline + self.models + SLACK_BYTES


def address_space() -> int:
    """The process's current virtual size, in bytes (Linux); 0 where unknown."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * resource.getpagesize()


def harden() -> list[str]:
    """Once per process, before any model is parsed. Returns what was applied."""
    applied: list[str] = []
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    applied.append("no core dumps")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    bound = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft == resource.RLIM_INFINITY or soft > bound or hard != bound:
        resource.setrlimit(resource.RLIMIT_NOFILE, (bound, bound))  # hard: it may not raise it
    applied.append(f"open files <= {bound}")
    if c_library.name():
        libc = c_library.handle()
        if hasattr(libc, "prctl") and libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
            applied.append("not dumpable")
        if hasattr(libc, "mallopt") and libc.mallopt(_M_ARENA_MAX, 2) == 1:
            applied.append("malloc arenas <= 2")
    return applied


def limit_memory(budget: MemoryBudget) -> bool:
    """Set the address-space limit, soft and hard (a model process hosts one model: nothing
    in it may raise the limit again); False where the platform has none to set."""
    if budget.baseline <= 0:
        return False
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = budget.limit if hard == resource.RLIM_INFINITY else min(budget.limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return True


def model_budget(memory_bytes: int, threads: int) -> int:
    return memory_bytes + threads * THREAD_STACK_BYTES if memory_bytes > 0 else 0
