"""The supervisor: brings shards up, puts them into swap, serves the control socket, and takes
everything down again in the one safe order (swapoff, detach, unmount, stop).

`tierswap up --foreground` runs this in the calling process (systemd's main process);
`tierswap up` starts it detached and returns once swap is active. Any failure on the way up
undoes what was done so far: nothing stays mounted, attached or half-started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from tierswap import hardening, system
from tierswap.config import Config, format_size
from tierswap.control import ControlError, acall, first_error, serve_control
from tierswap.fs import FILE_NAME

log = logging.getLogger("tierswap.supervisor")

MOUNT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class StartError(Exception):
    """Bringing tierswap up failed; one line for the operator."""


# ---------------------------------------------------------------------------- sd_notify


def sd_notify(msg: str) -> None:
    """The sd_notify(3) datagram, without a dependency; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(msg.encode())
    except OSError as e:
        log.warning("sd_notify failed: %s", e)


# ---------------------------------------------------------------------------- state on disk


def state_path(config: Config) -> Path:
    return config.run_dir / "state.json"


def read_state(config: Config) -> dict[str, Any] | None:
    try:
        return json.loads(state_path(config).read_text())
    except (OSError, ValueError):
        return None


def write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def running_pid(config: Config) -> int | None:
    try:
        pid = int(config.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if system.pid_alive(pid) else None


def _known_loops(st: dict[str, Any]) -> dict[str, str]:
    return {sh["loop"]: sh["backing"] for sh in st.get("shards", [])
            if sh.get("loop") and sh.get("backing")}


def stale_state(config: Config) -> list[str]:
    """What a crashed run left behind (empty when clean)."""
    st = read_state(config) or {}
    left = [f"swap/loop {d}" for d in system.loops_backed_by(config.run_dir, _known_loops(st))]
    left += [f"mount {m}" for m in system.fuse_mounts_under(config.run_dir)]
    left += [f"process {pid}" for pid in _our_pids(config, st)]
    return left


def _config_path(config: Config) -> str | None:
    return None if config.source.startswith("<") else config.source


def _our_pids(config: Config, st: dict[str, Any]) -> list[int]:
    pids = {p for p in [st.get("pid")] + [sh.get("pid") for sh in st.get("shards", [])] if p}
    pids |= set(system.daemon_pids(_config_path(config)))
    return sorted(p for p in pids if p != os.getpid() and system.pid_alive(p))


def _shards_answer(config: Config, st: dict[str, Any]) -> bool:
    from tierswap.control import call

    shards = st.get("shards", [])
    try:
        for sh in shards:
            call(config.shard_dir(sh["shard"]) / "control.sock", {"cmd": "ping"}, timeout=2)
    except ControlError:
        return False
    return bool(shards)


def force_cleanup(config: Config) -> list[str]:
    """Clear whatever a crashed run left, in an order that cannot hang.

    If the shards still answer, their pages can be saved: swapoff first, as in a normal stop.
    Otherwise the kernel would wait forever on I/O nobody serves, so the FUSE connections are
    aborted first (pending and future I/O fails; those pages died with the daemon), then
    swapoff, detach, unmount, and leftover processes are killed.
    """
    done: list[str] = []
    st = read_state(config) or {}
    known = _known_loops(st)
    loops = system.loops_backed_by(config.run_dir, known)
    graceful = _shards_answer(config, st)
    if not graceful:
        for pid in _our_pids(config, st):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                done.append(f"killed process {pid}")
        for mnt in system.fuse_mounts_under(config.run_dir):
            if system.abort_fuse(mountpoint=mnt):
                done.append(f"aborted FUSE connection of {mnt}")
        for dev in loops:
            if system.abort_fuse(majmin=known.get(dev) or system.loop_backing_dev(dev)):
                done.append(f"aborted FUSE connection behind {dev}")
    for dev in loops:
        try:
            system.swapoff(dev, timeout=600)
            done.append(f"swapoff {dev}")
        except system.SystemError_ as e:
            done.append(f"swapoff {dev} failed: {e}")
        system.loop_detach(dev)
        done.append(f"detached {dev}")
    for sh in st.get("shards", []):
        pid = sh.get("pid")
        if pid and system.pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if graceful else signal.SIGKILL)
            system.wait_for(lambda pid=pid: not system.pid_alive(pid), timeout=30)
            done.append(f"stopped shard process {pid}")
    for mnt in system.fuse_mounts_under(config.run_dir):
        system.lazy_unmount(mnt)
        done.append(f"unmounted {mnt}")
    for p in (state_path(config), config.pid_file, config.control_socket):
        p.unlink(missing_ok=True)
    return done


# ---------------------------------------------------------------------------- supervisor


class Supervisor:
    def __init__(self, config: Config, config_path: str | None) -> None:
        self.config = config
        self.config_path = config_path
        self.procs: list[trio.Process] = []
        self.loops: list[str] = []
        self.backing: list[str] = []  # major:minor of each loop's backing FUSE file
        self.shutdown = trio.Event()
        self.active = False
        self.started = time.time()
        self._bring_up_scope: trio.CancelScope | None = None  # cancelled by a signal

    # -------------------------------------------------------------- bring-up

    def preflight(self) -> None:
        """Checks and preparation that touch nothing the kernel holds."""
        cfg = self.config
        if os.geteuid() != 0:
            raise StartError("must run as root (swapon, losetup and FUSE mounts need it)")
        if not os.path.exists("/dev/fuse"):
            raise StartError("/dev/fuse is missing (load the fuse module)")
        pid = running_pid(cfg)
        if pid is not None:
            raise StartError(f"already running (pid {pid}); use 'tierswap down' first")
        left = stale_state(cfg)
        if left:
            log.warning("clearing state left by a crashed run: %s", "; ".join(left))
            force_cleanup(cfg)
        for d in (cfg.run_dir, cfg.state_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        from tierswap.tiers.file import prepare_file

        for t in cfg.tiers:
            if t.kind == "file":
                assert t.path is not None
                try:
                    prepare_file(t.path, t.capacity)
                except OSError as e:
                    msg = f"tier {t.name}: cannot prepare {t.path}: {e.strerror}"
                    raise StartError(msg) from None

    async def _spawn(self, shard: int) -> trio.Process:
        argv = [sys.executable, "-m", "tierswap.daemon", "--shard", str(shard)]
        if self.config_path:
            argv += ["--config", self.config_path]
        env = dict(os.environ) | hardening.malloc_env()
        env.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
        return await trio.lowlevel.open_process(argv, env=env, stdin=subprocess.DEVNULL)

    async def _wait_mounted(self, shard: int, proc: trio.Process) -> Path:
        mnt = self.config.shard_dir(shard) / "mnt"
        sock = self.config.shard_dir(shard) / "control.sock"
        with trio.move_on_after(MOUNT_TIMEOUT):
            while True:
                if proc.poll() is not None:
                    raise StartError(f"shard {shard} exited with status {proc.returncode} "
                                     "while starting (see its log)")
                if os.path.ismount(mnt) and sock.exists():
                    return mnt / FILE_NAME.decode()
                await trio.sleep(0.02)
        raise StartError(f"shard {shard} did not mount within {MOUNT_TIMEOUT:.0f}s")

    async def bring_up(self) -> None:
        cfg = self.config
        for k in range(cfg.shards):
            self.procs.append(await self._spawn(k))
        self._write_state()
        files = [await self._wait_mounted(k, p) for k, p in enumerate(self.procs)]
        for f in files:
            dev = await trio.to_thread.run_sync(system.loop_attach, f)
            self.loops.append(dev)
            st_dev = os.stat(f).st_dev
            self.backing.append(f"{os.major(st_dev)}:{os.minor(st_dev)}")
            self._write_state()
            await trio.to_thread.run_sync(system.mkswap, dev)
            await trio.to_thread.run_sync(system.swapon, dev, cfg.priority)
        self.active = True
        self._write_state()

    def _write_state(self) -> None:
        st = {
            "pid": os.getpid(),
            "config": self.config_path,
            "shards": [
                {"shard": k, "pid": p.pid, "mnt": str(self.config.shard_dir(k) / "mnt"),
                 "loop": self.loops[k] if k < len(self.loops) else None,
                 "backing": self.backing[k] if k < len(self.backing) else None}
                for k, p in enumerate(self.procs)
            ],
            "active": self.active,
        }
        write_private(state_path(self.config), json.dumps(st))

    # -------------------------------------------------------------- tear-down

    async def swapoff_all(self) -> list[str]:
        """swapoff and detach every device; returns the failures (those stay active)."""
        failed = []
        for dev in list(self.loops):
            try:
                await trio.to_thread.run_sync(system.swapoff, dev, abandon_on_cancel=False)
            except system.SystemError_ as e:
                failed.append(str(e))
                continue
            await trio.to_thread.run_sync(system.loop_detach, dev)
            self.loops.remove(dev)
        self.active = not failed and bool(self.loops)
        return failed

    async def tear_down(self) -> None:
        """swapoff, detach, stop shards (they unmount), in that order, whatever happened.

        If swapoff fails (say, not enough memory to take the pages back), the shards are left
        serving: stopping them would lose every page still on the device. The state file stays,
        so `tierswap down --force` finds them and retries the swapoff.
        """
        sd_notify("STOPPING=1")
        failed = await self.swapoff_all()
        if failed:
            log.error("swap still active, shards left serving it (retry with "
                      "'tierswap down --force'): %s", "; ".join(failed))
            return
        for k, proc in enumerate(self.procs):
            if proc.poll() is None:
                try:
                    await acall(self.config.shard_dir(k) / "control.sock", {"cmd": "shutdown"},
                                timeout=5)
                except ControlError:
                    proc.send_signal(signal.SIGTERM)
        for k, proc in enumerate(self.procs):
            with trio.move_on_after(STOP_TIMEOUT):
                await proc.wait()
            if proc.poll() is None:
                log.error("shard %d did not stop; killing it", k)
                proc.kill()
                await proc.wait()
        for mnt in system.fuse_mounts_under(self.config.run_dir):
            system.lazy_unmount(mnt)
        self.procs.clear()
        state_path(self.config).unlink(missing_ok=True)

    # -------------------------------------------------------------- control

    async def fanout(self, req: dict[str, Any], timeout: float = 30.0) -> list[Any]:
        results: list[Any] = [None] * len(self.procs)

        async def one(k: int) -> None:
            results[k] = await acall(self.config.shard_dir(k) / "control.sock", req,
                                     timeout=timeout)

        try:
            async with trio.open_nursery() as n:
                for k in range(len(self.procs)):
                    n.start_soon(one, k)
        except BaseExceptionGroup as eg:
            err = first_error(eg)
            if isinstance(err, ControlError):
                raise err from None
            raise
        return results

    async def handle(self, req: dict[str, Any], progress=None) -> Any:
        from tierswap.status import combine_status

        cmd = req["cmd"]
        if cmd == "status":
            shards = await self.fanout({"cmd": "stats"})
            return combine_status(self.config, self.loops, shards, active=self.active)
        if cmd == "ping":
            return {"pid": os.getpid(), "active": self.active}
        if cmd == "down":
            # swapoff here, so that a failure reaches the operator and nothing is stopped
            failed = await self.swapoff_all()
            if failed:
                raise ControlError(f"swapoff failed, swap stays active: {failed[0]}")
            self.shutdown.set()
            return {"stopping": True}
        from tierswap.status import combine_command

        if cmd in ("migrate", "drain", "undrain", "compact", "policy", "inspect"):
            return await combine_command(self, req, progress)
        raise ControlError(f"unknown command {cmd!r}")

    async def watchdog(self) -> None:
        """Ping systemd only while every shard answers: a wedged shard stops the pings."""
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if not usec:
            return
        interval = usec / 1e6 / 3
        while True:
            try:
                await self.fanout({"cmd": "ping"}, timeout=interval)
                sd_notify("WATCHDOG=1")
            except Exception as e:  # a missed ping only withholds WATCHDOG=1
                log.error("watchdog: a shard does not answer: %s", first_error(e))
            await trio.sleep(interval)

    async def status_line(self) -> None:
        from tierswap.status import one_line

        while True:
            try:
                shards = await self.fanout({"cmd": "stats"})
                from tierswap.status import combine_status

                st = combine_status(self.config, self.loops, shards, active=self.active)
                sd_notify("STATUS=" + one_line(st))
                if self.config.metrics.textfile is not None:
                    from tierswap.metrics import write_textfile

                    await trio.to_thread.run_sync(write_textfile, self.config.metrics.textfile, st)
            except Exception as e:  # a status summary is never worth stopping swap for
                log.warning("status: %s", first_error(e))
            await trio.sleep(self.config.metrics.interval)

    # -------------------------------------------------------------- main

    async def run(self, ready_fd: int | None) -> None:
        self.config.pid_file.write_text(f"{os.getpid()}\n")
        os.chmod(self.config.pid_file, 0o600)
        try:
            async with trio.open_nursery() as nursery:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    nursery.start_soon(self._signals, sigs)
                    try:
                        with trio.CancelScope() as bring_up_scope:
                            self._bring_up_scope = bring_up_scope
                            await self.bring_up()
                    except (StartError, system.SystemError_) as e:
                        _report(ready_fd, f"ERROR {e}")
                        raise
                    if bring_up_scope.cancelled_caught:
                        raise StartError("interrupted while starting")
                    await nursery.start(serve_control, self.config.control_socket, self.handle)
                    msg = f"READY {' '.join(self.loops)}"
                    log.info("swap active on %s (%s virtual, %d shard(s))", ", ".join(self.loops),
                             format_size(self.config.size), self.config.shards)
                    _report(ready_fd, msg)
                    sd_notify("READY=1")
                    nursery.start_soon(self.watchdog)
                    nursery.start_soon(self.status_line)
                    if self.config.metrics.listen:
                        from tierswap.metrics import serve_metrics

                        nursery.start_soon(serve_metrics, self)
                    await self.shutdown.wait()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.tear_down()
            self.config.pid_file.unlink(missing_ok=True)
            log.info("stopped")

    async def _signals(self, sigs) -> None:
        async for _ in sigs:
            log.info("signal received: stopping")
            self.shutdown.set()
            if not self.active and self._bring_up_scope is not None:
                self._bring_up_scope.cancel()


def _report(fd: int | None, msg: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (msg.replace("\n", " ") + "\n").encode())
        os.close(fd)
    except OSError:
        pass


def supervise(config: Config, config_path: str | None, ready_fd: int | None = None) -> int:
    sup = Supervisor(config, config_path)
    try:
        sup.preflight()
    except StartError as e:
        _report(ready_fd, f"ERROR {e}")
        raise
    failed = hardening.harden()
    for msg in failed:
        log.warning("running without full protection: %s", msg)
    try:
        trio.run(sup.run, ready_fd)
    except (StartError, system.SystemError_) as e:
        raise StartError(str(e)) from None
    return 0
