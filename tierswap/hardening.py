"""Make the daemon safe to serve swap: it must never need memory that only swapping can free.

Called before serving, in the supervisor and in every shard worker:
* Leave a memory-limited cgroup (`cgroup.escape_memory_limit`): reclaim in a full group would
  swap that group's pages to us while we are the ones reclaiming.
* ``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)``: no page of ours is ever reclaimed into
  our own device (the classic user-space swap deadlock). MCL_ONFAULT locks pages as they are
  touched instead of populating every reserved mapping at once, so the fixed-size LMDB map and
  thread stacks cost only what they use; what must be resident up front (the RAM tier arena,
  bounce buffers) is mapped with MAP_POPULATE or touched before serving.
* ``prctl(PR_SET_IO_FLUSHER, 1)``: the kernel treats us as part of the I/O path: our own
  allocations never recurse into I/O, and we are not throttled by dirty-page balancing.
* ``oom_score_adj = -1000``: the OOM killer takes anything but us; killing the daemon would
  lose every swapped page at once.
* No core dumps: ``prctl(PR_SET_DUMPABLE, 0)`` and ``RLIMIT_CORE = 0``. A core file would hold
  the RAM arena (swapped pages of every process), bounce buffers and the AES keys of sealed
  tiers, and would outlive swap. Mappings that hold such data are also marked MADV_DONTDUMP
  (`dontdump`), so that they stay out of a core even where a dump is forced (e.g.
  fs.suid_dumpable = 2). Both settings are per process and reset by exec, so the supervisor
  and every shard apply them.
* glibc malloc tuning (set in the environment by the supervisor before exec, see
  `malloc_env`): no heap trimming and no per-thread arenas, so memory freed after a request is
  reused for the next one instead of being given back and faulted in again under pressure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import resource

log = logging.getLogger(__name__)

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
PR_SET_IO_FLUSHER = 57
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4


class HardeningError(Exception):
    """A protection the daemon must not serve without failed; one line for the operator."""


def malloc_env() -> dict[str, str]:
    return {
        "MALLOC_ARENA_MAX": "2",
        "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
        "MALLOC_TOP_PAD_": str(64 << 20),
        "MALLOC_MMAP_THRESHOLD_": str(4 << 20),
    }


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def no_core_dumps() -> list[str]:
    """Make this process non-dumpable with a core limit of 0; returns what failed."""
    failed = []
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as e:
        failed.append(f"RLIMIT_CORE: {e}")
    libc = _libc()
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        failed.append(f"PR_SET_DUMPABLE: {os.strerror(ctypes.get_errno())}")
    return failed


def dumpable() -> bool:
    return bool(_libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))


def dontdump(m: mmap.mmap) -> None:
    """Keep a mapping that holds pages, keys or tags out of any core dump."""
    advice = getattr(mmap, "MADV_DONTDUMP", None)
    if advice is not None and len(m):
        m.madvise(advice)


def harden(*, lock: bool = True, allow_unlocked: bool = False) -> list[str]:
    """Apply every protection; returns the ones that failed (also logged).

    Raises HardeningError when mlockall fails, unless `allow_unlocked` (the config's
    daemon.allow_unlocked_memory) says the operator accepts that: unlocked, the daemon's own
    pages can be swapped out to the device it serves, and the first fault on one of them
    under memory pressure can deadlock the host."""
    failed: list[str] = no_core_dumps()
    from tierswap.cgroup import CgroupError, escape_memory_limit

    try:
        moved = escape_memory_limit()
        if moved:
            log.warning("%s: a swap daemon must not be charged to the memory it frees", moved)
    except (CgroupError, OSError) as e:
        failed.append(f"memory cgroup: {e}")
    libc = _libc()
    if lock and libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        why = os.strerror(ctypes.get_errno())
        if not allow_unlocked:
            raise HardeningError(
                f"mlockall failed ({why}): refusing to serve swap from memory that can itself "
                f"be swapped out (give the daemon CAP_IPC_LOCK or LimitMEMLOCK=infinity, or set "
                f"daemon.allow_unlocked_memory = true)")
        failed.append(f"mlockall: {why}")
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        failed.append(f"PR_SET_IO_FLUSHER: {os.strerror(ctypes.get_errno())}")
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError as e:
        failed.append(f"oom_score_adj: {e.strerror}")
    for msg in failed:
        log.warning("hardening failed: %s", msg)
    return failed


def prefault_heap(nbytes: int = 32 << 20, chunk: int = 1 << 20) -> None:
    """Grow the malloc heap once and keep it (trim is off), so requests reuse locked memory.

    Chunks stay below MALLOC_MMAP_THRESHOLD_ so they come from the heap, not from mmap
    (which would be unmapped again on free)."""
    bufs = [bytearray(chunk) for _ in range(nbytes // chunk)]  # zero-filled: touched, locked
    del bufs


def hardening_state(pid: int | str = "self") -> dict[str, object]:
    """What the kernel reports for a process, for status and tests."""
    out: dict[str, object] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmLck:", "VmRSS:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    with open(f"/proc/{pid}/oom_score_adj") as f:
        out["oom_score_adj"] = int(f.read())
    if pid == "self":
        out["dumpable"] = dumpable()
        out["core_limit"] = resource.getrlimit(resource.RLIMIT_CORE)[1]
    return out
