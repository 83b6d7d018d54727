"""What a crashed or wedged run left behind, and clearing it (`tierswap down --force`, and `up`
before it starts over a crashed run).

Decisions are per shard. A shard that still answers its control socket can save its pages:
its device is swapped off first, as in a normal stop, and only then is the shard told to stop
(if that swapoff fails, the shard is left serving it and the state file is kept for a retry:
never stop a shard under its swap device). A shard that does not answer (dead, or wedged) is
killed, its FUSE connection aborted so that nothing waits forever on it (those pages are lost;
their owners get SIGBUS), and its device swapped off and detached. One silent shard therefore
never costs another shard's pages.

Every process is signalled only after its identity is checked (`tierswap.procs`): the pid and
start time recorded in state.json and the pid file, or, for a process no file names, a command
line of one of our daemons for this config. A reused pid is never signalled.

Limits: synchronous (it runs in the CLI, or in `up` before trio starts); one shard at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierswap import commands, system
from tierswap.config import Config
from tierswap.control import call
from tierswap.errors import CommandError, ControlError
from tierswap.layout import Layout
from tierswap.procs import Pidfd, ProcessId, cmdline, looks_like_ours

log = logging.getLogger("tierswap.cleanup")

PING_TIMEOUT = 2.0
STOP_WAIT = 30.0
SWAPOFF_TIMEOUT = 600.0


def config_path(config: Config) -> str | None:
    return None if config.source.startswith("<") else config.source


def read_state(config: Config) -> dict[str, Any]:
    """state.json, or {} when missing or unreadable."""
    try:
        st = json.loads(Layout.of(config).state_file.read_text())
    except (OSError, ValueError):
        return {}
    return st if isinstance(st, dict) else {}


def write_private(path: Path, text: str) -> None:
    """Replace `path` atomically with a 0600 file."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def running_supervisor(config: Config) -> ProcessId | None:
    """The supervisor named by the pid file, if it is alive and still that process."""
    try:
        ident = ProcessId.parse(Layout.of(config).pid_file.read_text())
    except OSError:
        return None
    if ident is None:
        return None
    p = Pidfd.open(ident, config_path=config_path(config))
    if p is None:
        return None
    p.close()
    return ident


# ---------------------------------------------------------------------------- what is left


@dataclass
class ShardLeft:
    """One shard's leftovers: its process (if ours and alive), its loop devices, its mount."""

    index: int
    procs: list[Pidfd] = field(default_factory=list)
    loops: dict[str, str | None] = field(default_factory=dict)  # loop -> backing major:minor
    mounted: bool = False


@dataclass
class Leftovers:
    supervisor: list[Pidfd] = field(default_factory=list)
    shards: dict[int, ShardLeft] = field(default_factory=dict)
    stray_loops: dict[str, str | None] = field(default_factory=dict)  # ours, shard unknown
    stray_mounts: list[str] = field(default_factory=list)

    def shard(self, k: int) -> ShardLeft:
        return self.shards.setdefault(k, ShardLeft(k))

    def describe(self) -> list[str]:
        out = []
        for p in self.supervisor:
            out.append(f"process {p.ident.pid}")
        for sh in sorted(self.shards.values(), key=lambda s: s.index):
            out += [f"swap/loop {d}" for d in sh.loops]
            if sh.mounted:
                out.append(f"mount shard{sh.index}")
            out += [f"process {p.ident.pid}" for p in sh.procs]
        out += [f"swap/loop {d}" for d in self.stray_loops]
        out += [f"mount {m}" for m in self.stray_mounts]
        return out

    def close(self) -> None:
        for p in self.supervisor:
            p.close()
        for sh in self.shards.values():
            for p in sh.procs:
                p.close()


def _shard_arg(args: list[str]) -> int | None:
    try:
        return int(args[args.index("--shard") + 1])
    except (ValueError, IndexError):
        return None


def find_leftovers(config: Config, *, scan: bool = True) -> Leftovers:
    """Everything of this config's that is still there, each process pinned by a pidfd.

    `scan=False`: only the processes the files name (pid and start time, from /proc/PID/stat),
    no command line of every process. Reading another process's command line reads its memory,
    which may be swapped out to one of our devices: while no shard serves it (a restore from
    systemd's fd store) that read would wait forever."""
    lay = Layout.of(config)
    cpath = config_path(config)
    st = read_state(config)
    left = Leftovers()
    seen: set[int] = {os.getpid(), os.getppid()}

    def pin(ident: ProcessId | None) -> Pidfd | None:
        if ident is None or ident.pid in seen:
            return None
        p = Pidfd.open(ident, config_path=cpath)
        if p is not None:
            seen.add(ident.pid)
        return p

    sup = pin(ProcessId.from_record(st))
    if sup is not None:
        left.supervisor.append(sup)
    known: dict[str, tuple[int, str | None]] = {}
    for rec in st.get("shards", []) if isinstance(st.get("shards"), list) else []:
        k = rec.get("shard") if isinstance(rec, dict) else None
        if not isinstance(k, int) or not 0 <= k < 4096:
            continue
        p = pin(ProcessId.from_record(rec))
        if p is not None:
            left.shard(k).procs.append(p)
        if isinstance(rec.get("loop"), str):
            known[rec["loop"]] = (k, rec.get("backing"))
    # processes no file names (a crash before state.json was written): by command line
    for d in Path("/proc").iterdir() if scan else []:
        if not d.name.isdigit() or int(d.name) in seen:
            continue
        args = cmdline(int(d.name))
        if not args or not looks_like_ours(args, cpath):
            continue
        p = pin(ProcessId(int(d.name), None))  # re-checks the command line after the open
        if p is None:
            continue
        k = _shard_arg(args)
        if "up" in args and k is None:
            left.supervisor.append(p)
        elif k is not None:
            left.shard(k).procs.append(p)
        else:
            p.close()
    # loop devices: by backing file (a live mount), else by the recorded device number (after
    # a lazy unmount the path no longer shows the mount, the device number still does)
    for dev in system.loop_list():
        name, majmin = dev.get("name") or "", dev.get("back-maj:min")
        back = dev.get("back-file") or ""
        k = lay.shard_of_file(back)
        if k is None and name in known and known[name][1] == majmin:
            k = known[name][0]
        if k is not None:
            left.shard(k).loops[name] = majmin
        elif back.startswith(str(lay.run_dir).rstrip("/") + "/"):
            left.stray_loops[name] = majmin
    for mnt in system.fuse_mounts_under(lay.run_dir):
        k = next((s.index for s in lay.all_shards() if str(s.mountpoint) == mnt), None)
        if k is not None:
            left.shard(k).mounted = True
        else:
            left.stray_mounts.append(mnt)
    return left


def stale_state(config: Config) -> list[str]:
    """What a crashed run left behind (empty when clean)."""
    left = find_leftovers(config)
    try:
        return left.describe()
    finally:
        left.close()


# ---------------------------------------------------------------------------- clearing


def _answers(sock: Path, attempts: int = 2) -> bool:
    """Whether a shard answers a ping (twice PING_TIMEOUT: a control server that a fault
    restarted is back within that)."""
    for _ in range(attempts):
        try:
            call(sock, commands.Ping().to_wire(), timeout=PING_TIMEOUT)
            return True
        except ControlError:
            continue
    return False


def _kill(p: Pidfd, done: list[str], what: str) -> None:
    if p.send_signal(signal.SIGKILL):
        p.wait(STOP_WAIT)
        done.append(f"killed {what} process {p.ident.pid}")


def _swapoff_detach(loops: dict[str, str | None], done: list[str]) -> list[str]:
    """swapoff and detach each; returns the devices still in swap (left attached)."""
    still = []
    for dev in loops:
        try:
            system.swapoff(dev, timeout=SWAPOFF_TIMEOUT)
            done.append(f"swapoff {dev}")
        except CommandError as e:
            done.append(f"swapoff {dev} failed: {e}")
            still.append(dev)
            continue
        system.loop_detach(dev)
        done.append(f"detached {dev}")
    return still


def _clear_shard(lay: Layout, sh: ShardLeft, done: list[str]) -> bool:
    """One shard, as described in the module docstring; False if its swap stays active."""
    paths = lay.shard(sh.index)
    live = [p for p in sh.procs if p.alive()]
    if live and _answers(paths.control_socket):
        # it serves: its pages can be saved, so swapoff first and stop it only after that
        if _swapoff_detach(sh.loops, done):
            done.append(f"shard {sh.index} left serving: its swap is still active")
            return False
        with contextlib.suppress(ControlError):
            call(paths.control_socket, commands.Shutdown().to_wire(), timeout=PING_TIMEOUT)
        for p in live:
            if not p.wait(STOP_WAIT) and p.send_signal(signal.SIGTERM) and not p.wait(STOP_WAIT):
                _kill(p, done, f"shard {sh.index}")
            else:
                done.append(f"stopped shard {sh.index} process {p.ident.pid}")
    else:
        # dead or wedged: nobody will serve its pages; make sure nothing waits on it forever
        for p in live:
            _kill(p, done, f"shard {sh.index}")
        if sh.mounted and system.abort_fuse(mountpoint=str(paths.mountpoint)):
            done.append(f"aborted FUSE connection of {paths.mountpoint}")
        for dev, majmin in sh.loops.items():
            if system.abort_fuse(majmin=majmin or system.loop_backing_dev(dev)):
                done.append(f"aborted FUSE connection behind {dev}")
        if _swapoff_detach(sh.loops, done):
            return False
    if sh.mounted or str(paths.mountpoint) in system.fuse_mounts_under(lay.run_dir):
        system.lazy_unmount(str(paths.mountpoint))
        done.append(f"unmounted {paths.mountpoint}")
    return True


def adoptable_shards(config: Config, *, takeover: bool = False, scan: bool = True) -> list[int]:
    """Shards a dead supervisor left serving (recorded, alive, answering): a new supervisor
    takes them over instead of clearing them (issue 10). Empty while a supervisor lives,
    unless this is a `takeover` (`tierswap restart`: the old one hands them over)."""
    left = find_leftovers(config, scan=scan)
    try:
        if left.supervisor and not takeover:
            return []
        lay = Layout.of(config)
        st = read_state(config)
        recorded = {r.get("shard") for r in st.get("shards", []) if isinstance(r, dict)}
        return sorted(k for k, sh in left.shards.items()
                      if k in recorded and k < config.shards and any(p.alive() for p in sh.procs)
                      and _answers(lay.shard(k).control_socket))
    finally:
        left.close()


def clear_shards(config: Config, keep: set[int], *, scan: bool = True) -> list[str]:
    """Clear what a crashed run left of every shard but `keep` (those are taken over)."""
    lay = Layout.of(config)
    left = find_leftovers(config, scan=scan)
    done: list[str] = []
    try:
        for k, sh in sorted(left.shards.items()):
            if k not in keep:
                _clear_shard(lay, sh, done)
        for p in left.supervisor:
            _kill(p, done, "supervisor")
    finally:
        left.close()
    for line in done:
        log.warning("%s", line)
    return done


def force_cleanup(config: Config) -> list[str]:
    """Clear whatever a crashed run left, shard by shard, in an order that cannot hang; one
    line per action. The state, pid and socket files go only when no swap of ours is left."""
    lay = Layout.of(config)
    done: list[str] = []
    left = find_leftovers(config)
    try:
        for p in left.supervisor:  # it did not answer (or `down` would not be here)
            _kill(p, done, "supervisor")
        clean = True
        for sh in sorted(left.shards.values(), key=lambda s: s.index):
            clean = _clear_shard(lay, sh, done) and clean
        for dev, majmin in left.stray_loops.items():
            if system.abort_fuse(majmin=majmin):
                done.append(f"aborted FUSE connection behind {dev}")
        clean = not _swapoff_detach(left.stray_loops, done) and clean
        for mnt in left.stray_mounts:
            system.lazy_unmount(mnt)
            done.append(f"unmounted {mnt}")
    finally:
        left.close()
    if clean:  # the run is over (session_file: it did not end with the boot)
        # the summary and the metrics textfile describe a running tierswap: a crash left them
        extra = [lay.summary_file] + ([config.metrics.textfile] if config.metrics.textfile
                                      else [])
        for f in (lay.state_file, lay.pid_file, lay.control_socket, lay.session_file, *extra):
            f.unlink(missing_ok=True)
    return done
