"""systemd's file descriptor store for the shards' kits (issue 10): what lets `systemctl restart`
and a crash of the whole unit (Restart=on-failure after systemd killed every process of its
cgroup) keep swap on with every page.

A kit (tierswap/kit.py) is every fd whose loss would cost pages. The supervisor already keeps a
copy of each shard's kit, which covers a shard's death; it does not cover its own death
together with the shards', which is what systemd does on a restart or after the main process
crashed (KillMode=control-group). So the supervisor also hands every kit fd to systemd
(sd_notify "FDSTORE=1", one datagram per fd name, fds by SCM_RIGHTS), and systemd passes them
back to the next main process (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID: sd_listen_fds(3)), which
rebuilds the kits from them and starts every shard from its kit.

Names (LISTEN_FDNAMES allows at most 255 characters and no ':'; we keep to [A-Za-z0-9_.-]):

    tierswap.<shard>.k.<kit name>        one kit fd ("fuse", "fuse.0", "map", "arena.0", ...)
    tierswap.<shard>.manifest.<seq>      a sealed memfd: JSON {"manifest": ..., "names": [...]}

The manifest memfd is what makes a kit reconstructible from the named fds alone: the kit's
manifest (boot id, geometry) and the list of its fd names, so that a kit with a missing fd is
refused rather than served with, say, an empty arena. A kit only grows within a run (a
replacement may add memfds), so its fds keep their names; a new manifest is pushed under a
higher sequence number first and the older one removed after (FDSTOREREMOVE), so that the
store holds a complete kit at every moment. On restore the highest complete sequence wins.

Limits (systemd 252, Debian 12): systemd ignores an fd that refers to an open file it already
stores (same_fd), so a name can never be re-pointed without FDSTOREREMOVE first, and a name
that gets a *different* open file must be removed and pushed again (`push_kit` does, for kit
names whose file identity changed). FDPOLL=0 keeps systemd from dropping an fd on POLLERR/HUP.
systemd closes fds over FileDescriptorStoreMax= with only a log line: the supervisor records how
many fds it stored (state.json "fdstore") and `tierswap down --unless-restarting` compares.
FileDescriptorStorePreserve= (keeping the store after a stop) needs systemd 254 and is not used:
a stop is a swapoff anyway. Everything here is synchronous and cheap (a datagram per fd).
"""

from __future__ import annotations

import array
import json
import logging
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tierswap.kit import MFD_FLAGS, Kit, KitError

log = logging.getLogger("tierswap.fdstore")

PREFIX = "tierswap"
SD_LISTEN_FDS_START = 3
FDNAME_MAX = 255
_SAFE = re.compile(r"[A-Za-z0-9_.-]+")
_NAME = re.compile(r"^tierswap\.(\d{1,4})\.(k|manifest)\.(.+)$")
MAX_MANIFEST = 1 << 20


class FdStoreError(Exception):
    """The store could not be told (no such socket, a refused datagram)."""


# ---------------------------------------------------------------------------- names


def kit_name(shard: int, name: str) -> str:
    """The store name of kit fd `name` of `shard` (KitError if it cannot be one)."""
    full = f"{PREFIX}.{shard}.k.{name}"
    if not _SAFE.fullmatch(name) or len(full) > FDNAME_MAX:
        raise KitError(f"kit fd name {name!r} cannot be an fd store name")
    return full


def manifest_name(shard: int, seq: int) -> str:
    return f"{PREFIX}.{shard}.manifest.{seq}"


def parse_name(name: str) -> tuple[int, str, str] | None:
    """(shard, "k" or "manifest", rest) of one of our names; None for anything else."""
    m = _NAME.match(name)
    if m is None:
        return None
    return int(m.group(1)), m.group(2), m.group(3)


# ---------------------------------------------------------------------------- sd_notify


def notify_address() -> str | bytes | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr[0] not in "/@":
        return None  # vsock and other addresses: not for a system service
    return "\0" + addr[1:] if addr.startswith("@") else addr


def notify(msg: str, fds: Iterable[int] = ()) -> None:
    """One sd_notify(3) datagram, with `fds` attached by SCM_RIGHTS (FdStoreError if it could
    not be sent; a no-op without NOTIFY_SOCKET)."""
    addr = notify_address()
    if addr is None:
        return
    fd_list = list(fds)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fd_list))] if fd_list else []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendmsg([msg.encode()], anc)
    except OSError as e:
        raise FdStoreError(f"sd_notify: {e.strerror or e}") from None


def sd_notify(msg: str) -> None:
    """The supervisor's own notifications (READY=1, STATUS=, MAINPID=, ...): `notify`, with a
    failure logged as the supervisor's line, never raised; a no-op outside systemd. Beside
    `notify`, so that supervisor.py and handover.py both reach it."""
    try:
        notify(msg)
    except FdStoreError as e:
        logging.getLogger("tierswap.supervisor").warning("sd_notify failed: %s", e)


def store_message(name: str) -> str:
    return f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0"


def remove_message(name: str) -> str:
    return f"FDSTOREREMOVE=1\nFDNAME={name}"


def enabled() -> bool:
    """Whether there is a service manager to hand fds to."""
    return notify_address() is not None


# ---------------------------------------------------------------------------- the manifest memfd


def manifest_memfd(kit: Kit) -> int:
    """A sealed memfd holding the kit's manifest and fd names (the caller closes it)."""
    data = json.dumps({"manifest": kit.manifest, "names": kit.names()}).encode()
    fd = os.memfd_create("tierswap:manifest", MFD_FLAGS | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, data)
        import fcntl

        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    except OSError:
        os.close(fd)
        raise
    return fd


def read_manifest(fd: int) -> dict[str, Any]:
    size = os.fstat(fd).st_size
    if size > MAX_MANIFEST:
        raise KitError("stored manifest is too large")
    data = os.pread(fd, size, 0)
    try:
        d = json.loads(data)
        return {"manifest": dict(d["manifest"]), "names": [str(n) for n in d["names"]]}
    except (ValueError, KeyError, TypeError):
        raise KitError("stored manifest is not a kit manifest") from None


# ---------------------------------------------------------------------------- pushing


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


@dataclass
class FdStore:
    """What this supervisor has put in the store, per shard (names and file identities), so
    that a changed kit is pushed as a difference and a tear-down removes exactly that."""

    pushed: dict[int, dict[str, tuple[int, int]]] = field(default_factory=dict)
    manifests: dict[int, str] = field(default_factory=dict)
    seq: int = 0

    def adopt(self, restored: Restored) -> None:
        """Continue from what a previous supervisor stored (so that a new manifest replaces
        the one each kit came from), and remove the names nothing will use."""
        for shard, kit in restored.kits.items():
            self.pushed[shard] = {n: _identity(fd) for n, fd in kit.fds.items()}
            self.manifests[shard] = restored.manifests[shard]
        self.seq = max(self.seq, restored.seq)
        self.forget_names(restored.stale)
        restored.stale = []

    def count(self) -> int:
        return sum(len(v) for v in self.pushed.values()) + len(self.manifests)

    def push_kit(self, shard: int, kit: Kit) -> None:
        """Store every fd of `kit`, then its manifest, then remove what it replaced."""
        if not enabled():
            return
        had = self.pushed.get(shard, {})
        now: dict[str, tuple[int, int]] = {}
        for name in kit.names():
            fd = kit.fds[name]
            full = kit_name(shard, name)
            ident = _identity(fd)
            if name in had and had[name] != ident:
                notify(remove_message(full))  # another open file under this name
            notify(store_message(full), [fd])  # systemd ignores an fd it already holds
            now[name] = ident
        for name in set(had) - set(now):
            notify(remove_message(kit_name(shard, name)))
        self.pushed[shard] = now
        # above any sequence an earlier supervisor used (a takeover does not know them)
        self.seq = max(self.seq + 1, time.time_ns() // 1000)
        mfd = manifest_memfd(kit)
        try:
            notify(store_message(manifest_name(shard, self.seq)), [mfd])
        finally:
            os.close(mfd)
        old = self.manifests.get(shard)
        self.manifests[shard] = manifest_name(shard, self.seq)
        if old is not None:
            notify(remove_message(old))

    def remove_shard(self, shard: int) -> None:
        """Take one shard's fds out of the store (its device is out of swap for good)."""
        names = [kit_name(shard, n) for n in self.pushed.pop(shard, {})]
        m = self.manifests.pop(shard, None)
        if m is not None:
            names.insert(0, m)  # the manifest first: a half-removed kit is never complete
        for full in names:
            try:
                notify(remove_message(full))
            except FdStoreError as e:
                log.warning("fd store: %s", e)

    def remove_all(self) -> None:
        for shard in list(set(self.pushed) | set(self.manifests)):
            self.remove_shard(shard)

    def forget_names(self, names: Iterable[str]) -> None:
        """Remove stored names this run does not use (stale manifests, unrestorable shards)."""
        for full in names:
            try:
                notify(remove_message(full))
            except FdStoreError as e:
                log.warning("fd store: %s", e)


# ---------------------------------------------------------------------------- receiving


def listen_fds(environ: dict[str, str] | None = None, *, unset: bool = True
               ) -> dict[int, str] | None:
    """sd_listen_fds(3) with names: {fd: name} passed to this process, None if none were.

    LISTEN_PID must be this process (a variable inherited by a child is not for the child);
    the variables are removed so that the shards do not see them. Every fd is made close-on-
    exec, as sd_listen_fds does.
    """
    env = os.environ if environ is None else environ
    pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES")
    if unset:
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(k, None)
    if not pid or not count:
        return None
    try:
        if int(pid) != os.getpid():
            return None
        n = int(count)
    except ValueError:
        return None
    if n <= 0:
        return None
    name_list = names.split(":") if names else []
    if len(name_list) != n:
        name_list = (name_list + ["unknown"] * n)[:n]  # as systemd: a missing name is unknown
    out = {}
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue  # not open: nothing to take
        out[fd] = name_list[i]
    return out


@dataclass
class Restored:
    """Kits rebuilt from the store, per shard, and what could not be used (with why)."""

    kits: dict[int, Kit] = field(default_factory=dict)
    problems: dict[int, str] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)  # names to remove from the store
    manifests: dict[int, str] = field(default_factory=dict)  # the name each kit came from
    seq: int = 0

    def drop(self, shard: int, why: str) -> None:
        """Give up on one shard's kit: closed here, and its names to be removed from the store."""
        kit = self.kits.pop(shard, None)
        if kit is not None:
            self.stale += [kit_name(shard, n) for n in kit.names()]
            kit.close()
        m = self.manifests.pop(shard, None)
        if m is not None:
            self.stale.append(m)
        self.problems[shard] = why

    def close(self) -> None:
        for shard in list(self.kits):
            self.drop(shard, "not used")


def rebuild(fds: dict[int, str]) -> Restored:
    """The kits of every shard in `fds` ({fd: name}). Fds that are not ours are closed. A
    shard's kit is complete or absent: every name its newest manifest lists must be there."""
    out = Restored()
    kitfds: dict[int, dict[str, int]] = {}
    manifests: dict[int, list[tuple[int, int, str]]] = {}
    for fd, name in fds.items():
        parsed = parse_name(name)
        if parsed is None:
            log.warning("fd store: closing fd %d named %r (not ours)", fd, name)
            os.close(fd)
            continue
        shard, role, rest = parsed
        if role == "manifest" and rest.isdigit():
            manifests.setdefault(shard, []).append((int(rest), fd, name))
            out.seq = max(out.seq, int(rest))
        elif role == "k" and rest not in kitfds.setdefault(shard, {}):
            kitfds[shard][rest] = fd
        else:
            os.close(fd)  # a duplicate name: the first one is the one pushed first
    for shard in sorted(set(kitfds) | set(manifests)):
        mine = kitfds.get(shard, {})
        found = sorted(manifests.get(shard, []), reverse=True)
        for _seq, fd, name in found[1:]:
            out.stale.append(name)
            os.close(fd)
        if not found:
            out.problems[shard] = "its stored kit has no manifest"
            out.stale += [kit_name(shard, n) for n in mine]
            for fd in mine.values():
                os.close(fd)
            continue
        _seq, mfd, _name = found[0]
        try:
            desc = read_manifest(mfd)
        except (KitError, OSError) as e:
            desc = {"error": str(e)}
        finally:
            os.close(mfd)
        missing = sorted(set(desc.get("names", [])) - set(mine)) if "error" not in desc else []
        if "error" in desc or missing:
            out.problems[shard] = desc.get("error") or (
                f"its stored kit lacks {', '.join(missing)}")
            out.stale += [kit_name(shard, n) for n in mine] + [_name]
            for fd in mine.values():
                os.close(fd)
            continue
        wanted = set(desc["names"])
        for n in sorted(set(mine) - wanted):  # stored earlier, no longer in the kit
            out.stale.append(kit_name(shard, n))
            os.close(mine.pop(n))
        out.kits[shard] = Kit(fds=mine, manifest=desc["manifest"], fresh=False)
        out.manifests[shard] = _name
    return out


# ---------------------------------------------------------------------------- asking systemd


SYSTEMCTL_TIMEOUT = 10.0


def own_unit(cgroup_text: str | None = None) -> str | None:
    """The service unit this process runs in, from /proc/self/cgroup (as sd_pid_get_unit):
    the innermost ".service" component of the systemd hierarchy's path."""
    if cgroup_text is None:
        try:
            with open("/proc/self/cgroup") as f:
                cgroup_text = f.read()
        except OSError:
            return None
    paths = []
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[1] == "name=systemd" or parts[0] == "0"):
            paths.append(parts[2])
    for path in paths:
        units = [c for c in path.split("/") if c.endswith(".service")]
        if units:
            return units[-1]
    return None


def _systemctl(*args: str) -> str:
    p = subprocess.run(["systemctl", "--no-pager", *args], capture_output=True, text=True,
                       timeout=SYSTEMCTL_TIMEOUT)
    if p.returncode != 0:
        raise FdStoreError(p.stderr.strip().splitlines()[-1] if p.stderr.strip()
                           else f"systemctl {args[0]} failed ({p.returncode})")
    return p.stdout


def job_type(unit: str, listing: str | None = None) -> str | None:
    """The type of the job running or queued for `unit` ("stop", "restart", "start", ...), or
    None. A restart job keeps the type "restart" while its stop half runs (ExecStop=,
    ExecStopPost=) and becomes "start" after (systemd's job_finish_and_invalidate)."""
    if listing is None:
        listing = _systemctl("list-jobs", "--no-legend", "--full", unit)
    for line in listing.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[1] == unit:
            return cols[2]
    return None


def stored_count(unit: str) -> int:
    out = _systemctl("show", "-p", "NFileDescriptorStore", "--value", unit).strip()
    try:
        return int(out or "0")
    except ValueError:
        raise FdStoreError(f"systemctl show: unexpected NFileDescriptorStore {out!r}") from None


def keep_for_restart(unit: str, job: str | None, stored: int, expected: int | None,
                     result: str | None = None) -> tuple[bool, str]:
    """Whether `tierswap down --unless-restarting` leaves swap on, and why (one line).

    Kept only when the store holds the kits (at least as many fds as the supervisor stored)
    and no stop job runs: a restart job (ExecStop=, ExecStopPost= of `systemctl restart`), the
    start that follows it (ExecStartPre=), or no job at all (ExecStopPost= after a crash,
    before Restart= starts the unit again, i.e. $SERVICE_RESULT is not "success": a main
    process that ended cleanly is not restarted by Restart=on-failure, and the store would
    close with the devices in swap). Anything else is a normal down: swapoff."""
    if job == "stop":
        return False, f"{unit}: a stop job: swapoff"
    if job is None and result == "success":
        return False, f"{unit}: no job and the service ended cleanly (no restart follows): swapoff"
    if stored <= 0:
        return False, f"{unit}: the fd store holds no kit: swapoff (nothing could keep pages)"
    if expected is not None and stored < expected:
        return False, (f"{unit}: the fd store holds {stored} of the {expected} fds stored "
                       "(FileDescriptorStoreMax= too small?): swapoff")
    return True, (f"{unit}: {job or 'no'} job, {stored} fds in the fd store: swap stays on "
                  "for the next start")


# ---------------------------------------------------------------------------- restoring


def check_restorable(restored: Restored, config: Any) -> None:
    """Keep only the kits whose device is still in swap, served by their connection (the loop
    device named in state.json, backed by that shard's FUSE file); drop the others. A kit that
    does not fit this configuration raises KitError: its pages are live, so nothing may be
    cleared, and the operator must go back to the configuration they were stored with."""
    from tierswap import system
    from tierswap.cleanup import read_state
    from tierswap.kit import check_manifest

    for shard, kit in restored.kits.items():
        if shard >= config.shards:
            raise KitError(f"the fd store holds shard {shard}; this configuration has "
                           f"{config.shards} (change it only with a stop)")
        try:
            check_manifest(kit.manifest, config, shard)
        except KitError as e:
            raise KitError(f"stored kit of shard {shard}: {e}") from None
    st = read_state(config)
    recs = {r.get("shard"): r for r in st.get("shards", []) if isinstance(r, dict)}
    swaps = system.active_swaps()
    for shard in list(restored.kits):
        rec = recs.get(shard) or {}
        dev = rec.get("loop")
        if not isinstance(dev, str) or dev not in swaps:
            restored.drop(shard, f"its device ({dev or 'none recorded'}) is not in swap")
        elif system.loop_backing_dev(dev) != rec.get("backing"):
            restored.drop(shard, f"{dev} is no longer backed by its FUSE file")


def stop_leftovers(config: Any, shards: Iterable[int]) -> list[str]:
    """SIGKILL whatever still runs of these shards (systemd kills the unit's cgroup before a
    start; a process left outside it would serve the same connection twice)."""
    import signal

    from tierswap.cleanup import find_leftovers

    done = []
    keep = set(shards)
    left = find_leftovers(config, scan=False)  # no /proc scan: see cleanup.find_leftovers
    try:
        for k, sh in left.shards.items():
            for p in sh.procs if k in keep else []:
                if p.alive() and p.send_signal(signal.SIGKILL):
                    p.wait(30.0)
                    done.append(f"killed shard {k} process {p.ident.pid}")
    finally:
        left.close()
    return done


# ---------------------------------------------------------------------------- ExecStop=


def restart_decision(config: Any) -> tuple[bool, str] | None:
    """For `tierswap down --unless-restarting`: (keep swap on?, why), or None when this does
    not run in a systemd service (an operator's shell: a normal down)."""
    from tierswap.cleanup import read_state

    unit = own_unit()
    if unit is None:
        return None
    try:
        job = job_type(unit)
        stored = stored_count(unit)
    except (FdStoreError, OSError, subprocess.TimeoutExpired) as e:
        return False, f"{unit}: cannot ask systemd ({e}): swapoff"
    expected = read_state(config).get("fdstore")
    return keep_for_restart(unit, job, stored, expected if isinstance(expected, int) else None,
                            os.environ.get("SERVICE_RESULT"))
