"""Processes named by pid, checked for identity before anything is sent to them.

A pid read from a file (the pid file, state.json) may by now belong to an unrelated process:
pids are reused. So tierswap records each daemon process as a `ProcessId`, its pid together
with its start time (field 22 of /proc/PID/stat, clock ticks since boot), and signals it only
through a pidfd opened and then checked against that record:

* `pidfd_open` pins the process that had the pid at that moment; a signal sent through the fd
  reaches that process or nobody, never a successor.
* The check runs after the open: if /proc/PID still shows the recorded start time, the pinned
  process is the recorded one (a pid cannot be reused while its process exists, and a process
  started later cannot carry an earlier start time).

Where no start time was recorded (a crash before state.json was written), a process is
accepted as ours only by its command line (`looks_like_ours`), checked the same way after the
open. A pidfd also works for processes that are not our children, which a supervisor adopting
shards it did not start needs; `wait_exit` waits on one from trio.

Limits: Linux >= 5.3 (pidfd_open), which tierswap needs anyway (FUSE notify, fallocate).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from dataclasses import dataclass
from typing import Any

import trio


def start_time(pid: int) -> int | None:
    """The start time of `pid` (clock ticks since boot), or None when there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may itself contain ") "
    fields = stat.rsplit(b")", 1)[1].split()
    return int(fields[19])  # field 22 overall; fields[0] is field 3 (state)


def cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def looks_like_ours(args: list[str], config_path: str | None) -> bool:
    """A supervisor (`tierswap up --foreground`) or shard (`-m tierswap.shard`) of this config.

    `tierswap.daemon` is the shard module's name before it was renamed (an older install)."""
    mods = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-m"]
    shard = "--shard" in args and any(m in ("tierswap.shard", "tierswap.daemon") for m in mods)
    supervisor = "up" in args and "--foreground" in args and (
        "tierswap" in args or any(a.endswith("/tierswap") for a in args))
    if not (shard or supervisor):
        return False  # other CLI commands (our own caller among them) are not daemons
    cfg = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    want = os.path.realpath(config_path) if config_path else None
    return (os.path.realpath(cfg) if cfg else None) == want


@dataclass(frozen=True)
class ProcessId:
    """A process as recorded: pid and start time (None: unknown, check the command line)."""

    pid: int
    start: int | None

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        """The process that has `pid` now, or None."""
        st = start_time(pid)
        return None if st is None else cls(pid, st)

    @classmethod
    def of_self(cls) -> ProcessId:
        me = cls.of(os.getpid())
        assert me is not None
        return me

    @classmethod
    def from_record(cls, d: Any) -> ProcessId | None:
        """From a state-file record ({"pid": N, "start": T}); None when malformed."""
        if not isinstance(d, dict):
            return None
        pid, st = d.get("pid"), d.get("start")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
            return None
        if st is not None and (isinstance(st, bool) or not isinstance(st, int)):
            return None
        return cls(pid, st)

    def record(self) -> dict[str, Any]:
        return {"pid": self.pid, "start": self.start}

    def format(self) -> str:
        """The pid file's one line."""
        return f"{self.pid} {self.start}\n"

    @classmethod
    def parse(cls, text: str) -> ProcessId | None:
        """From the pid file ("PID START"; a bare "PID" from an older version)."""
        parts = text.split()
        try:
            pid = int(parts[0])
            st = int(parts[1]) if len(parts) > 1 else None
        except (IndexError, ValueError):
            return None
        return cls(pid, st) if pid > 1 else None


class Pidfd:
    """An open pidfd on a process that passed the identity check; close it when done."""

    def __init__(self, fd: int, ident: ProcessId) -> None:
        self.fd = fd
        self.ident = ident

    @classmethod
    def open(cls, ident: ProcessId, *, config_path: str | None = None) -> Pidfd | None:
        """A pidfd on `ident` if that process is alive and is the one recorded, else None.

        With a recorded start time, that is the test; without one, the command line must be
        one of our daemons for `config_path`."""
        if ident.pid == os.getpid():
            return None
        try:
            fd = os.pidfd_open(ident.pid)
        except OSError:  # ESRCH: gone
            return None
        ok = False
        try:
            now = start_time(ident.pid)
            if ident.start is not None:
                ok = now == ident.start
            else:
                args = cmdline(ident.pid)
                ok = now is not None and args is not None and looks_like_ours(args, config_path)
            pinned = cls(fd, ProcessId(ident.pid, now))
            ok = ok and pinned.alive()
        finally:
            if not ok:
                os.close(fd)
        return pinned if ok else None

    def alive(self) -> bool:
        """False once the process has exited (a zombie counts as exited)."""
        return not select.select([self.fd], [], [], 0)[0]

    def send_signal(self, sig: int) -> bool:
        """Signal the pinned process; False if it is gone."""
        try:
            signal.pidfd_send_signal(self.fd, sig)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float) -> bool:
        """Block until the process exits; True if it did within `timeout` seconds."""
        return bool(select.select([self.fd], [], [], timeout)[0])

    async def wait_exit(self) -> None:
        """Wait from trio until the process exits (child or not)."""
        await trio.lowlevel.wait_readable(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Pidfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_running(ident: ProcessId | None, config_path: str | None = None) -> bool:
    """Whether the recorded process is alive and still the one recorded."""
    if ident is None:
        return False
    p = Pidfd.open(ident, config_path=config_path)
    if p is None:
        return False
    p.close()
    return True


def signal_checked(ident: ProcessId, sig: int, *, config_path: str | None = None,
                   wait: float = 0.0) -> bool:
    """Send `sig` to the recorded process only if it still is that process; with `wait`, wait
    up to that long for it to exit. True if the signal was sent."""
    p = Pidfd.open(ident, config_path=config_path)
    if p is None:
        return False
    with p:
        sent = p.send_signal(sig)
        if sent and wait > 0:
            p.wait(wait)
    return sent
