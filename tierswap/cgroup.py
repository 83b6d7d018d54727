"""Memory cgroup helper for cgroup v1 and v2.

Tests and benchmarks confine a workload to a memory limit well below its size so the kernel
must swap most of it out to the device under test; the daemon asks how much it may still
charge to its own group before growing its RAM arena. Everything here is plain file I/O on
cgroupfs, so the same code serves both hierarchies and can be exercised on a fake directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

CgroupKind = Literal["v1", "v2"] | None

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")
# v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 with 4 KiB pages);
# anything from 1 EiB up cannot be a real limit.
UNLIMITED_THRESHOLD = 1 << 60


class CgroupError(RuntimeError):
    """A cgroup operation failed; the message is one line naming the file and the cause."""


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise CgroupError(f"cannot read {path}: {e.strerror or e}") from None


def _write(path: Path, value: str | int) -> None:
    try:
        path.write_text(f"{value}\n")
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror or e}") from None


def _keyed(text: str, key: str) -> int | None:
    """Value of ``key N`` lines as found in memory.stat, memory.events, memory.oom_control."""
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    return None


def parse_limit(text: str) -> int | None:
    """A limit file's value in bytes; None for "max" (v2) or v1's huge "unlimited" number."""
    t = text.strip()
    if t == "max":
        return None
    value = int(t)
    return None if value >= UNLIMITED_THRESHOLD else value


def parse_proc_cgroup(text: str) -> tuple[Literal["v1", "v2"], str] | None:
    """The memory cgroup in a /proc/<pid>/cgroup text: ("v1", path) or ("v2", path).

    A v1 ``N:...memory...:/path`` line wins: on hybrid systems the ``0::`` line belongs to a
    v2 hierarchy that does not have the memory controller.
    """
    v2: str | None = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if "memory" in controllers.split(","):
            return "v1", path
        if hid == "0" and controllers == "":
            v2 = path
    return ("v2", v2) if v2 is not None else None


def _v2_has_memory(v2_root: Path) -> bool:
    try:
        return "memory" in (v2_root / "cgroup.controllers").read_text().split()
    except OSError:
        return False


def detect(v1_root: Path = V1_ROOT, v2_root: Path = V2_ROOT) -> CgroupKind:
    """Which hierarchy has the memory controller: "v1", "v2", or None."""
    if (v1_root / "memory.limit_in_bytes").exists():
        return "v1"
    return "v2" if _v2_has_memory(v2_root) else None


class MemoryCgroup:
    """A child memory cgroup; use as a context manager so it is removed on every exit path."""

    def __init__(self, path: Path, kind: Literal["v1", "v2"]) -> None:
        self.path = path
        self.kind = kind

    def __repr__(self) -> str:
        return f"MemoryCgroup({str(self.path)!r}, {self.kind!r})"

    @classmethod
    def create(
        cls,
        name: str,
        limit_bytes: int,
        *,
        swap_ok: bool = True,
        root: Path | None = None,
    ) -> MemoryCgroup:
        """Create (or reuse, if empty) group ``name`` under the memory root with a RAM limit.

        ``swap_ok`` lets the group swap freely (v1: swappiness 100 so it swaps eagerly; v2:
        memory.swap.max=max); False forbids swap. ``root`` overrides the hierarchy root (tests).
        """
        if not name or "/" in name or name in (".", ".."):
            raise CgroupError(f"bad cgroup name {name!r}: must be one path component")
        if limit_bytes <= 0:
            raise CgroupError(f"memory limit must be > 0, got {limit_bytes}")
        kind = detect() if root is None else detect(root, root)
        if kind is None:
            where = root or f"{V1_ROOT} or {V2_ROOT}/cgroup.controllers"
            raise CgroupError(f"no memory cgroup controller found ({where})")
        base = root or (V1_ROOT if kind == "v1" else V2_ROOT)
        if kind == "v2":
            subtree = base / "cgroup.subtree_control"
            if "memory" not in _read(subtree).split():
                _write(subtree, "+memory")
        cg = cls(base / name, kind)
        try:
            cg.path.mkdir()
        except FileExistsError:
            if cg.pids():
                raise CgroupError(f"{cg.path} already exists and has processes") from None
        except OSError as e:
            raise CgroupError(f"cannot create {cg.path}: {e.strerror or e}") from None
        try:
            cg._configure(limit_bytes, swap_ok)
        except BaseException:
            cg.remove()
            raise
        return cg

    def _configure(self, limit_bytes: int, swap_ok: bool) -> None:
        if self.kind == "v1":
            _write(self.path / "memory.limit_in_bytes", limit_bytes)
            _write(self.path / "memory.swappiness", 100 if swap_ok else 0)
            memsw = self.path / "memory.memsw.limit_in_bytes"
            if not swap_ok and memsw.exists():
                _write(memsw, limit_bytes)  # RAM+swap == RAM: no swap at all
        else:
            _write(self.path / "memory.max", limit_bytes)
            try:
                _write(self.path / "memory.swap.max", "max" if swap_ok else 0)
            except CgroupError:
                if not swap_ok:  # without swap accounting, swap is unlimited by default
                    raise

    @property
    def name(self) -> str:
        return self.path.name

    def _file(self, v1: str, v2: str) -> Path:
        return self.path / (v1 if self.kind == "v1" else v2)

    def pids(self) -> list[int]:
        """Processes in the group (empty once the group is gone)."""
        try:
            text = (self.path / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise CgroupError(f"cannot read {self.path / 'cgroup.procs'}: {e.strerror}") from None
        return [int(p) for p in text.split()]

    def add_pid(self, pid: int) -> None:
        """Move process ``pid`` into the group (pages it already has stay charged elsewhere)."""
        _write(self.path / "cgroup.procs", pid)

    def usage_bytes(self) -> int:
        return int(_read(self._file("memory.usage_in_bytes", "memory.current")))

    def limit_bytes(self) -> int | None:
        return parse_limit(_read(self._file("memory.limit_in_bytes", "memory.max")))

    def swap_bytes(self) -> int:
        """Bytes of the group's memory currently in swap."""
        if self.kind == "v2":
            return int(_read(self.path / "memory.swap.current"))
        memsw = self.path / "memory.memsw.usage_in_bytes"
        if memsw.exists():
            return max(0, int(_read(memsw)) - self.usage_bytes())
        swap = _keyed(_read(self.path / "memory.stat"), "swap")
        if swap is None:
            raise CgroupError(f"no swap accounting in {self.path} (swapaccount=0?)")
        return swap

    def oom_kills(self) -> int:
        """How many processes the OOM killer has killed in this group."""
        f = self._file("memory.oom_control", "memory.events")
        n = _keyed(_read(f), "oom_kill")
        if n is None:
            raise CgroupError(f"no oom_kill counter in {f} (kernel too old?)")
        return n

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every process in the group until it is empty (also catches late forks)."""
        if os.getpid() in self.pids():
            raise CgroupError(f"refusing to kill {self.path}: it contains this process")
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise CgroupError(f"{self.path} still has processes {pids} after {timeout:g} s")
            time.sleep(0.02)

    def remove(self, timeout: float = 10.0) -> None:
        """Kill the group's processes and remove it; a group that is already gone is fine."""
        self.kill_all(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                # EBUSY: exiting tasks are still being uncharged; give them a moment.
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove {self.path}: {e.strerror}") from None
                time.sleep(0.02)

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def own_headroom_bytes(
    pid: int | None = None,
    *,
    v1_root: Path = V1_ROOT,
    v2_root: Path = V2_ROOT,
    proc_root: Path = Path("/proc"),
) -> int | None:
    """Bytes the memory cgroup of ``pid`` (default: this process) can still charge.

    The minimum of limit - usage over the group and its ancestors up to the hierarchy root,
    since a charge fails at whichever level runs out first. None when no level is limited or
    the process is in no memory cgroup. Usage includes reclaimable page cache, so this errs
    on the safe side.
    """
    proc = proc_root / ("self" if pid is None else str(pid)) / "cgroup"
    parsed = parse_proc_cgroup(_read(proc))
    if parsed is None:
        return None
    kind, rel = parsed
    if kind == "v1":
        base, limit_f, usage_f = v1_root, "memory.limit_in_bytes", "memory.usage_in_bytes"
    else:
        if not _v2_has_memory(v2_root):
            return None  # the unified hierarchy exists but does not control memory
        base, limit_f, usage_f = v2_root, "memory.max", "memory.current"
    group = base / rel.lstrip("/")
    if not group.is_dir():
        raise CgroupError(f"memory cgroup {rel!r} of {proc} is not visible under {base}")
    headroom: int | None = None
    d = group
    while True:
        if (d / limit_f).exists():  # the v2 root has no memory.max
            limit = parse_limit(_read(d / limit_f))
            if limit is not None:
                room = max(0, limit - int(_read(d / usage_f)))
                headroom = room if headroom is None else min(headroom, room)
        if d == base or d.parent == d:
            return headroom
        d = d.parent


def run_in_cgroup(
    cg: MemoryCgroup, argv: Sequence[str | os.PathLike[str]], **popen_kwargs: Any
) -> subprocess.Popen[Any]:
    """Start ``argv`` already inside ``cg``, so none of its pages are charged elsewhere.

    A tiny shell writes its own pid to cgroup.procs and then execs the program, which avoids
    preexec_fn (unsafe with threads) and the race of moving the process after it started.
    """
    if isinstance(argv, str | bytes) or not argv:
        raise TypeError("argv must be a non-empty sequence of arguments, not a string")
    procs = cg.path / "cgroup.procs"
    if not os.access(procs, os.W_OK):
        raise CgroupError(f"cannot write {procs}: not writable (needs root?)")
    script = f'echo $$ > {shlex.quote(str(procs))} && exec "$@"'
    args = [os.fspath(a) for a in argv]
    return subprocess.Popen(["/bin/sh", "-c", script, "sh", *args], **popen_kwargs)


DAEMON_GROUP = "tierswap"


def escape_memory_limit(*, v1_root: Path = V1_ROOT, v2_root: Path = V2_ROOT) -> str | None:
    """Move this process out of a memory-limited cgroup into an unlimited `tierswap` group.

    A swap daemon charged to a limited group is asked to reclaim when that group is full, and
    reclaim swaps the group's pages out to... the daemon, which is busy reclaiming: deadlock.
    PR_SET_IO_FLUSHER forbids our reclaim from doing I/O, but needs CAP_SYS_RESOURCE; leaving
    the limited group removes the case altogether (systemd's unit is unlimited: no move
    there). Returns a description of the move, or None when nothing was limited. Charges
    already made stay where they are (v1 does not move them).
    """
    if own_headroom_bytes(v1_root=v1_root, v2_root=v2_root) is None:
        return None
    parsed = parse_proc_cgroup(_read(Path("/proc/self/cgroup")))
    assert parsed is not None
    kind, rel = parsed
    base = v1_root if kind == "v1" else v2_root
    target = base / DAEMON_GROUP
    try:
        target.mkdir(exist_ok=True)
        _write(target / "cgroup.procs", os.getpid())
    except (OSError, CgroupError) as e:
        raise CgroupError(f"cannot leave memory-limited cgroup {rel}: {e}") from None
    if own_headroom_bytes(v1_root=v1_root, v2_root=v2_root) is not None:
        raise CgroupError(f"moved to {target}, but a memory limit still applies")
    return f"left memory-limited cgroup {rel} for {target}"
