"""The supervisor: brings shards up, puts them into swap, serves the control socket, and takes
everything down again in the one safe order (swapoff, detach, unmount, stop).

`tierswap up --foreground` runs this in the calling process (systemd's main process);
`tierswap up` starts it detached and returns once swap is active. Any failure on the way up
undoes what was done so far: nothing stays mounted, attached or half-started.

This module owns one supervisor's life: a fresh bring-up, a copy of every shard's kit (the
keeper, and systemd's fd store when there is one), watching each shard and replacing it from
its kit when it dies or hangs, the control fan-out, and tear-down. What passes from one
supervisor to the next (`restart`, `systemctl restart`, adopting the shards of a dead one,
restoring from the fd store) is tierswap/handover.py, reached from `preflight`, `_serve` and
`handle`; the record of one shard is tierswap/slot.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from tierswap import commands, fdstore, handover, hardening, summary, system
from tierswap.cleanup import force_cleanup, running_supervisor, stale_state, write_private
from tierswap.commands import ShardReply
from tierswap.config import Config, format_size, make_private_dir
from tierswap.control import Progress, acall, first_error, serve_control
from tierswap.errors import CommandError, ControlError, StartError
from tierswap.fdstore import sd_notify
from tierswap.keeper import SWEEP_EVERY, KitKeeper
from tierswap.kit import Kit, KitError, boot_id, check_manifest, fetch_kit
from tierswap.layout import Layout
from tierswap.procs import Pidfd, ProcessId
from tierswap.slot import FAILED, RESTARTING, RETRY_FIRST, SERVING, STOP_TIMEOUT, ShardSlot
from tierswap.tasks import STOP_SIGNALS, TaskBoard, keep_running, signal_name, started_at_once

log = logging.getLogger("tierswap.supervisor")

MOUNT_TIMEOUT = 60.0
CONTROL_RESTART = (0.2, 2.0)  # backoff of the public control server after a fault
PING_INTERVAL = 5.0  # seconds between the supervisor's pings of each shard
HUNG_AFTER = 60.0  # a shard silent this long while its process lives is hung
RESPAWN_TIMEOUT = 30.0  # a replacement must answer within this (issue 10: serving in 10 s)
RESPAWN_ATTEMPTS = 3  # replacements tried in a row before a shard is declared failed
RETRY_MAX = 300.0  # a failed shard with its kit is tried again, backing off up to this


# ---------------------------------------------------------------------------- supervisor


class Supervisor:
    def __init__(self, config: Config, config_path: str | None) -> None:
        self.config = config
        self.config_path = config_path
        self.layout = Layout.of(config)
        self.ident = ProcessId.of_self()
        self.slots = [ShardSlot(sh.index, sh) for sh in self.layout.all_shards()]
        self.shutdown = trio.Event()
        self.board = TaskBoard()  # health of the supervisor's own background tasks
        self._outer: trio.Nursery | None = None  # lives until tear-down is done
        self.active = False
        self.started = time.time()
        self._bring_up_scope: trio.CancelScope | None = None  # cancelled by a signal
        self.keeper = KitKeeper()  # a copy of every shard's kit: a shard's death loses nothing
        self.adopting: set[int] = set()  # shards of a dead supervisor to take over (preflight)
        self.handed_over = False  # a newer supervisor took over: exit without tear-down
        self.taking_over = False  # `restart`: a newer supervisor is taking the shards over
        # `tierswap restart`: the supervisor this one replaces (it hands its shards over)
        self.takeover = ProcessId.parse(os.environ.pop("TIERSWAP_TAKEOVER", ""))
        # Whether the devices, shards and pid file are this supervisor's to tear down. A
        # takeover owns nothing until it reports ready: if it fails before, the supervisor
        # it was to replace still serves every device and must find them as they were.
        self.owning = self.takeover is None
        self.replacing = False  # after a takeover: the shards are being replaced one by one
        # systemd's fd store (tierswap/fdstore.py): kits pushed there, and kits passed back
        self.fdstore = fdstore.FdStore()
        self._stored: dict[int, bool] = {}  # shard -> its whole current kit is in the fd store
        self.restoring: fdstore.Restored | None = None

    # -------------------------------------------------------------- bring-up

    def preflight(self) -> None:
        """Checks and preparation that touch nothing the kernel holds."""
        cfg = self.config
        if os.geteuid() != 0:
            raise StartError("must run as root (swapon, losetup and FUSE mounts need it)")
        if not os.path.exists("/dev/fuse"):
            raise StartError("/dev/fuse is missing (load the fuse module)")
        running = running_supervisor(cfg)
        if running is not None and running != self.takeover:
            raise StartError(f"already running (pid {running.pid}); use 'tierswap down' first")
        if self.takeover is not None:  # `tierswap restart`: the shards are handed over to us
            handover.check_takeover(self, running)
            return
        if not handover.inherit(self):  # no live shards, no kits passed back: a fresh start
            left = stale_state(cfg)
            if left:
                log.warning("clearing state left by a crashed run: %s", "; ".join(left))
                force_cleanup(cfg)
            self._previous_boot()
        for d in (cfg.run_dir, cfg.state_dir):
            make_private_dir(d)  # never chmod a directory we did not create
        from tierswap.tiers.file import prepare_file

        for t in cfg.tiers:
            if t.kind == "file":
                assert t.path is not None
                try:
                    done = prepare_file(t.path, t.capacity, overwrite=t.overwrite,
                                        block=t.block)
                except OSError as e:
                    msg = f"tier {t.name}: cannot prepare {t.path}: {e.strerror}"
                    raise StartError(msg) from None
                log.info("tier %s: %s%s", t.name, done, f" ({t.sizing})" if t.sizing else "")

    async def _spawn(self, slot: ShardSlot) -> None:
        """Start shard `slot.index` (with its kit, once there is one) and watch its process."""
        argv = [sys.executable, "-m", "tierswap.shard", "--shard", str(slot.index)]
        if self.config_path:
            argv += ["--config", self.config_path]
        env = dict(os.environ) | hardening.malloc_env()
        env.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
        env.pop("TIERSWAP_KIT", None)
        if slot.kit.fds:  # a replacement: the dead shard's connection, map and arenas
            env |= slot.kit.env()
        proc = await trio.lowlevel.open_process(argv, env=env, stdin=subprocess.DEVNULL,
                                                pass_fds=list(slot.kit.fds.values()))
        slot.proc = proc
        slot.ident = ProcessId.of(proc.pid)  # an unreaped child: its pid is still its own
        slot.pidfd = Pidfd(os.pidfd_open(proc.pid), slot.ident or ProcessId(proc.pid, None))
        slot.exited = trio.Event()
        assert self._outer is not None
        self._outer.start_soon(self._watch, slot, slot.pidfd, proc)

    async def _wait_mounted(self, shard: int, proc: trio.Process) -> Path:
        paths = self.layout.shard(shard)
        with trio.move_on_after(MOUNT_TIMEOUT):
            while True:
                if proc.poll() is not None:
                    raise StartError(f"shard {shard} exited with status {proc.returncode} "
                                     "while starting (see its log)")
                if os.path.ismount(paths.mountpoint) and paths.control_socket.exists():
                    return paths.swap_file
                await trio.sleep(0.02)
        raise StartError(f"shard {shard} did not mount within {MOUNT_TIMEOUT:.0f}s")

    @property
    def loops(self) -> list[str]:
        """The loop devices attached now, in shard order."""
        return [s.device for s in self.slots if s.device]

    async def bring_up(self) -> None:
        cfg = self.config
        for slot in self.slots:
            await self._spawn(slot)
        self._write_state()
        for slot in self.slots:
            assert slot.proc is not None
            await self._wait_mounted(slot.index, slot.proc)
            await self._deposit(slot)
            slot.state = SERVING
        for slot in self.slots:
            f = slot.paths.swap_file
            slot.device = await trio.to_thread.run_sync(system.loop_attach, f)
            slot.backing = system.mount_device(str(slot.paths.mountpoint))
            self._write_state()
            await trio.to_thread.run_sync(system.mkswap, slot.device)
            await trio.to_thread.run_sync(system.swapon, slot.device, cfg.priority,
                                        cfg.swapon_flags)
        self.active = True
        self._write_state()
        self._write_session()

    async def _deposit(self, slot: ShardSlot) -> None:
        """Take a copy of the shard's kit (its fds, over its control socket) and keep it."""
        try:
            kit = await trio.to_thread.run_sync(fetch_kit, slot.paths.control_socket)
        except KitError as e:
            raise StartError(f"shard {slot.index}: {e}") from None
        check_manifest(kit.manifest, self.config, slot.index)
        await trio.to_thread.run_sync(self.keeper.deposit, slot.index, kit)
        slot.kit = kit
        self._store(slot.index, kit)

    def _store(self, index: int, kit: Kit) -> None:
        """Under systemd, hand the kit to its fd store too: what survives this process dying
        with its shards (a restart or a crash of the unit; tierswap/fdstore.py). Failing to is
        logged, never fatal: the keeper's copy still covers a shard's death."""
        self._stored[index] = False  # until the whole kit is in: `park` relies on it
        try:
            self.fdstore.push_kit(index, kit)
            self._stored[index] = fdstore.enabled()
        except (fdstore.FdStoreError, KitError, OSError) as e:
            log.error("shard %d: could not hand its kit to systemd's fd store: %s", index, e)

    def _write_state(self) -> None:
        st = {
            **self.ident.record(),
            "config": self.config_path,
            "shards": [
                {"shard": s.index, **s.ident.record(), "mnt": str(s.paths.mountpoint),
                 "loop": s.device, "backing": s.backing, "state": s.state}
                for s in self.slots if s.ident is not None
            ],
            "active": self.active,
        }
        if fdstore.enabled():  # `down --unless-restarting` checks the store holds them all
            st["fdstore"] = self.fdstore.count()
        write_private(self.layout.state_file, json.dumps(st))

    # -------------------------------------------------------------- tear-down

    async def _revive_for_down(self) -> str | None:
        """Before `down` swapoffs anything: a shard whose device is in swap but that has no
        process (it died and its replacement did not come up) is tried once more, since
        nobody serves its connection and its swapoff would wait on its first page forever.
        The failure if it cannot come back (then nothing is swapped off). Not on the signal
        path: there every shard got the signal too and takes its own device out."""
        for slot in self.slots:
            async with slot.lock:  # a retry or a restore of this shard holds it meanwhile
                if (slot.kit.fds and slot.device is not None
                        and (slot.pidfd is None or slot.exited.is_set())
                        and slot.device in system.active_swaps()):
                    if not await self.respawn(slot, attempts=1):
                        return (f"{slot.device} (shard {slot.index}) has no process that can "
                                "serve it, so its swapoff would never end; its pages are kept "
                                "(status says why); 'tierswap down --force' gives them up")
                    self._served_again(slot)
        return None

    async def swapoff_all(self) -> list[str]:
        """swapoff and detach every device; returns the failures (those stay active)."""
        failed = []
        for slot in self.slots:
            err = await self._swapoff(slot)
            if err is not None:
                failed.append(err)
        self.active = not failed and bool(self.loops)
        return failed

    async def _swapoff(self, slot: ShardSlot) -> str | None:
        """swapoff and detach one shard's device; the error if it stays in swap."""
        async with slot.lock:
            if slot.device is None:
                return None
            log.info("swapoff %s (shard %d)", slot.device, slot.index)
            try:
                await trio.to_thread.run_sync(system.swapoff, slot.device,
                                              abandon_on_cancel=False)
            except CommandError as e:
                if slot.device in system.active_swaps():
                    return str(e)
                # out of swap all the same: the shard's own swapoff (on its stop signal) won
            await trio.to_thread.run_sync(system.loop_detach, slot.device)
            slot.device = None
            self._write_state()
            return None

    def _previous_boot(self) -> None:
        """Say so when the last run never stopped because the host went down under it: its
        pages went with that boot (nothing that could hold them survives one), so this run
        starts empty. Its tier files are reused from scratch (the map is new)."""
        try:
            prev = json.loads(self.layout.session_file.read_text())
        except (OSError, ValueError):
            return
        if isinstance(prev, dict) and prev.get("boot_id") != boot_id():
            started = prev.get("started")
            when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
                    if isinstance(started, (int, float)) else "at an unknown time")
            log.warning("the previous run (started %s) never stopped: the host crashed or "
                        "rebooted with swap on; its pages went with that boot; starting empty",
                        when)

    def _write_session(self) -> None:
        write_private(self.layout.session_file,
                      json.dumps({"boot_id": boot_id(), "started": self.started}))

    async def tear_down(self) -> None:
        """swapoff, detach, stop shards (they unmount), in that order, whatever happened.

        If swapoff fails (say, not enough memory to take the pages back), the shards are left
        serving: stopping them would lose every page still on the device. The state file stays,
        so `tierswap down --force` finds them and retries the swapoff.
        """
        sd_notify("STOPPING=1")
        try:
            await self._tear_down()
        finally:  # what describes a running tierswap goes with it, whatever happened
            summary.remove(self.layout.summary_file)
            if self.config.metrics.textfile is not None:
                summary.remove(self.config.metrics.textfile)

    async def _tear_down(self) -> None:
        failed = await self.swapoff_all()
        if failed:
            log.error("swap still active, shards left serving it (retry with "
                      "'tierswap down --force'): %s", "; ".join(failed))
            return
        live = [s for s in self.slots if s.pidfd is not None and not s.exited.is_set()]
        for s in live:
            try:
                await acall(s.paths.control_socket, commands.Shutdown().to_wire(), timeout=5)
            except ControlError:
                assert s.pidfd is not None
                s.pidfd.send_signal(signal.SIGTERM)
        for s in live:
            with trio.move_on_after(STOP_TIMEOUT):
                await s.exited.wait()
            if not s.exited.is_set() and s.pidfd is not None:
                log.error("shard %d did not stop; killing it", s.index)
                s.pidfd.send_signal(signal.SIGKILL)
                with trio.move_on_after(STOP_TIMEOUT):
                    await s.exited.wait()
        for mnt in system.fuse_mounts_under(self.config.run_dir):
            system.lazy_unmount(mnt)
        self.keeper.release_all()  # every device is out of swap: the connections may end
        self.fdstore.remove_all()
        for s in self.slots:
            s.kit = Kit()
        self.layout.state_file.unlink(missing_ok=True)
        self.layout.session_file.unlink(missing_ok=True)  # a clean stop: nothing was lost

    # -------------------------------------------------------------- per-shard watch

    async def _watch(self, slot: ShardSlot, pidfd: Pidfd, proc: trio.Process | None) -> None:
        """Wait for this process of the shard to exit (a pidfd works for any process, so an
        adopted shard, `proc` None, is watched the same way), reap it if it is our child,
        then decide what becomes of its device."""
        try:
            await pidfd.wait_exit()
            code = await proc.wait() if proc is not None else None
        finally:
            pidfd.close()
        if slot.pidfd is not pidfd:
            return  # a replacement runs by now
        slot.pidfd = None
        slot.exited.set()
        if slot.handing_off or self.taking_over:
            return  # it handed its kit over (restart): whoever asked brings the next one up
        if slot.state == RESTARTING:
            return  # a replacement that did not come up: `respawn` sees it and tries again
        if self.shutdown.is_set():
            slot.state, slot.reason = FAILED, "stopped"
            return  # tear-down is in charge of its device
        if not self.active:
            slot.state, slot.reason = FAILED, f"exited ({_status(code)}) while starting"
            return  # bring-up fails with this and undoes what it did
        await self._shard_died(slot, code)

    async def _shard_died(self, slot: ShardSlot, code: int | None) -> None:
        """One shard's process is gone while serving: its device is handled on its own, the
        other shards go on serving."""
        log.error("shard %d (pid %s) exited (%s) while serving %s", slot.index, slot.pid,
                  _status(code), slot.device or "no device")
        why = f"exited ({_status(code)})"
        slot.state, slot.reason = RESTARTING, f"{slot.reason}, {why}" if slot.reason else why
        self._write_state()
        try:
            respawned = await self.respawn(slot)
        except Exception:  # a failed restart must not take the supervisor with it
            log.exception("shard %d: restart failed", slot.index)
            respawned = False
        if respawned:
            slot.restarts += 1
            slot.state, slot.reason = SERVING, None
            self._write_state()
            log.info("shard %d serving again (pid %s)", slot.index, slot.pid)
            return
        if slot.kit.fds:
            self._failed_with_kit(slot, f"{slot.reason}; no replacement came up")
            return
        slot.state = FAILED
        await self.retire(slot)

    def _failed_with_kit(self, slot: ShardSlot, why: str) -> None:
        """No replacement came up, but its connection, map and arenas are all still here: keep
        them and the device in swap (processes that need one of its pages wait) and try again,
        backing off up to RETRY_MAX (`monitor`): the cause may pass (memory, a broken install,
        a config edit that no longer fits the kit). Retiring would lose every page at once."""
        slot.state = FAILED
        slot.retry_at = trio.current_time() + slot.retry_every
        slot.reason = (f"{why}: device kept in swap, its requests wait; trying again in "
                       f"{slot.retry_every:.0f}s")
        slot.retry_every = min(RETRY_MAX, slot.retry_every * 2)
        self._write_state()
        log.critical("shard %d: %s", slot.index, slot.reason)

    def _served_again(self, slot: ShardSlot) -> None:
        slot.restarts += 1
        slot.state, slot.reason, slot.retry_every = SERVING, None, RETRY_FIRST
        self._write_state()
        log.info("shard %d serving again (pid %s)", slot.index, slot.pid)

    async def _retry(self, slot: ShardSlot) -> None:
        """One more attempt at a failed shard that holds pages (see `_failed_with_kit`)."""
        try:
            async with slot.lock:
                respawned = await self.respawn(slot, attempts=1)
        except Exception:  # a failed restart must not take the supervisor with it
            log.exception("shard %d: restart failed", slot.index)
            respawned = False
        if respawned:
            self._served_again(slot)
        else:
            self._failed_with_kit(slot, "still no replacement")

    async def respawn(self, slot: ShardSlot, attempts: int = RESPAWN_ATTEMPTS) -> bool:
        """Start a replacement for a dead shard with its kit; True once it serves its device.

        The kit (a copy the keeper holds) is the dead shard's FUSE connection, map, arenas and
        secrets: the replacement opens them, rebuilds its spaces from the map, asks the kernel
        to resend what its predecessor had read but not answered (FUSE_NOTIFY_RESEND), and
        serves. Up to `attempts` replacements are tried in a row."""
        if not slot.kit.fds:
            return False  # died before it deposited a kit: nothing to restart with
        for attempt in range(1, attempts + 1):
            await self._spawn(slot)
            if await self._answers_soon(slot, RESPAWN_TIMEOUT):
                try:  # the replacement may have made memfds its predecessor had not
                    await self._deposit(slot)
                except (StartError, KitError) as e:
                    log.warning("shard %d: the replacement's kit: %s", slot.index, e)
                return True
            log.error("shard %d: replacement %d of %d did not come up", slot.index, attempt,
                      attempts)
            if slot.pidfd is not None and not slot.exited.is_set():
                slot.pidfd.send_signal(signal.SIGKILL)
                with trio.move_on_after(STOP_TIMEOUT):
                    await slot.exited.wait()
        return False

    async def _answers_soon(self, slot: ShardSlot, timeout: float) -> bool:
        """The shard's current process answers a ping within `timeout` (False if it exits)."""
        with trio.move_on_after(timeout):
            while not slot.exited.is_set():
                try:
                    await acall(slot.paths.control_socket, commands.Ping().to_wire(), timeout=2)
                    return True
                except ControlError:
                    await trio.sleep(0.05)
        return False

    async def sweep(self) -> None:
        """Keep the kits' memory locked as the shards grow it (tierswap/keeper.py)."""
        while True:
            await trio.sleep(SWEEP_EVERY)
            await trio.to_thread.run_sync(self.keeper.sweep)

    async def retire(self, slot: ShardSlot) -> None:
        """A shard that will not serve again: make sure nothing waits on its FUSE connection,
        take its device out of swap (pages nobody can read any more are lost: their owners get
        SIGBUS, as the kernel marks them at swapoff), detach it and unmount."""
        with trio.CancelScope(shield=True):
            if await trio.to_thread.run_sync(system.abort_fuse, str(slot.paths.mountpoint),
                                             slot.backing):
                log.warning("shard %d: aborted its FUSE connection", slot.index)
            err = await self._swapoff(slot)
            if err is not None:
                log.error("shard %d: its device stays in swap: %s", slot.index, err)
                slot.reason = f"{slot.reason}; swapoff failed: {err}"
            elif str(slot.paths.mountpoint) in system.fuse_mounts_under(self.layout.run_dir):
                await trio.to_thread.run_sync(system.lazy_unmount, str(slot.paths.mountpoint))
            await trio.to_thread.run_sync(self.keeper.release, slot.index)
            if err is None:
                self.fdstore.remove_shard(slot.index)
            slot.kit = Kit()
            self._write_state()
            log.error("shard %d failed (%s); the other shards go on serving", slot.index,
                      slot.reason)

    async def monitor(self) -> None:
        """Ping every serving shard; one silent for HUNG_AFTER while its process lives is
        hung: it is killed and handled like a shard that died (replaced from its kit). A failed
        shard that holds its kit is tried again when its backoff is over. A shard's silence
        costs that shard only, never the others."""
        while True:
            replies = await self.fanout(commands.Ping())
            now = trio.current_time()
            for slot in self.slots:
                if (slot.state == FAILED and slot.retry_at is not None and now >= slot.retry_at
                        and slot.kit.fds and not self.shutdown.is_set()):
                    slot.retry_at, slot.state = None, RESTARTING  # one attempt at a time
                    assert self._outer is not None
                    self._outer.start_soon(self._retry, slot)  # the others are still pinged
            for slot, r in zip(self.slots, replies, strict=True):
                if slot.state != SERVING or r.ok:
                    slot.silent_since = None
                    continue
                if slot.silent_since is None:
                    slot.silent_since = now
                    log.warning("shard %d does not answer: %s", slot.index, r.error)
                elif now - slot.silent_since >= HUNG_AFTER and slot.pidfd is not None:
                    log.error("shard %d silent for %.0fs: hung; killing it", slot.index,
                              now - slot.silent_since)
                    slot.reason = f"hung (silent {now - slot.silent_since:.0f}s)"
                    slot.pidfd.send_signal(signal.SIGKILL)
                    slot.silent_since = None
            await trio.sleep(PING_INTERVAL)

    # -------------------------------------------------------------- control

    async def fanout(self, req: commands.Request,
                     progress: Progress | None = None) -> list[ShardReply]:
        """Ask every shard its part of `req` at once; one reply per shard, never an exception.

        Each shard has the request's own timeout. A shard that is not serving is not asked; one
        that does not answer, answers an error or breaks the protocol gets a reply with that
        error, so the caller can still combine what the others said. Progress lines of the
        shards are combined and forwarded at most every 0.2 s.
        """
        parts = req.split(len(self.slots))
        replies: list[ShardReply] = [ShardReply(s.index, error="not asked") for s in self.slots]
        seen: list[dict[str, Any]] = [{} for _ in self.slots]
        changed = trio.Event()

        def note(k: int, p: dict[str, Any]) -> None:
            seen[k] = p
            changed.set()

        async def one(slot: ShardSlot, part: commands.Request) -> None:
            k = slot.index
            if isinstance(part, commands.Skip):
                replies[k] = ShardReply(k, result={})
                return
            if slot.state != SERVING:
                replies[k] = ShardReply(k, error=f"shard {k} is {slot.state}")
                return
            try:
                res = await acall(slot.paths.control_socket, part.to_wire(),
                                  timeout=part.shard_timeout, on_progress=lambda p: note(k, p))
                replies[k] = ShardReply(k, result=res)
            except ControlError as e:
                replies[k] = ShardReply(k, error=str(e))
            except Exception as e:  # a broken reply costs this shard's part only
                log.exception("shard %d: %s failed", k, part.cmd)
                replies[k] = ShardReply(k, error=f"bad reply ({type(e).__name__})")

        async def forward() -> None:
            nonlocal changed
            assert progress is not None
            while True:
                await changed.wait()
                changed = trio.Event()
                await progress(req.combine_progress(seen))
                await trio.sleep(0.2)

        async with trio.open_nursery() as n:
            if progress is not None:
                n.start_soon(forward)
            async with trio.open_nursery() as workers:
                for slot, part in zip(self.slots, parts, strict=True):
                    workers.start_soon(one, slot, part)
            n.cancel_scope.cancel()
        return replies

    async def status(self) -> dict[str, Any]:
        from tierswap.status import combine_status

        replies = await self.fanout(commands.Stats())
        st = combine_status(self.config, [s.info() for s in self.slots], replies,
                            active=self.active)
        st["supervisor"] = {"pid": os.getpid(), "tasks": self.board.record()}
        return st

    async def handle(self, wire: dict[str, Any], progress: Progress | None = None) -> Any:
        req = commands.parse(wire, commands.PUBLIC)
        if isinstance(req, commands.Status):
            return await self.status()
        if isinstance(req, commands.Ping):
            return {"pid": os.getpid(), "active": self.active}
        if isinstance(req, commands.Restart):
            return await handover.hand_over(self, req.config)
        if isinstance(req, commands.Park):
            return await handover.park(self)
        if isinstance(req, commands.Down):
            # swapoff here, so that a failure reaches the operator and nothing is stopped
            dead = await self._revive_for_down()
            if dead is not None:
                raise ControlError(f"swapoff failed, swap stays active: {dead}")
            failed = await self.swapoff_all()
            if failed:
                raise ControlError(f"swapoff failed, swap stays active: {failed[0]}")
            self.shutdown.set()
            return {"stopping": True}
        return req.combine(await self.fanout(req, progress))

    async def watchdog(self) -> None:
        """Ping systemd while the supervisor itself works (its loop runs and its control
        server and shard monitor are up). Shards are judged one by one by `monitor`: one
        wedged shard must not make systemd stop every shard."""
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if not usec:
            await trio.sleep_forever()
        interval = usec / 1e6 / 3
        while True:
            tasks = self.board.tasks
            if all(tasks[n].running for n in ("control", "monitor") if n in tasks):
                sd_notify("WATCHDOG=1")
            else:
                log.error("watchdog: the supervisor's control server or shard monitor is down")
            await trio.sleep(interval)

    async def status_line(self) -> None:
        from tierswap.status import one_line

        while True:
            try:
                st = await self.status()
                sd_notify("STATUS=" + one_line(st))
                await trio.to_thread.run_sync(summary.write, self.layout.summary_file, st,
                                              self.ident)
                if self.config.metrics.textfile is not None:
                    from tierswap.metrics import write_textfile

                    await trio.to_thread.run_sync(write_textfile, self.config.metrics.textfile, st)
            except Exception as e:  # a status summary is never worth stopping swap for
                log.warning("status: %s", first_error(e))
            await trio.sleep(self.config.metrics.interval)

    # -------------------------------------------------------------- main

    async def run(self, ready_fd: int | None) -> None:
        """Bring up, serve until told to stop, tear down; signals are handled throughout,
        tear-down included: a second SIGTERM during swapoff must not end the supervisor."""
        if self.owning:
            write_private(self.layout.pid_file, self.ident.format())
        error: BaseException | None = None
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with trio.open_nursery() as outer:
                self._outer = outer
                outer.start_soon(self._signals, signals)
                try:
                    await self._serve(ready_fd)
                except* (StartError, CommandError) as eg:
                    error = first_error(eg)
                finally:
                    if self.owning and not self.handed_over:
                        with trio.CancelScope(shield=True):
                            await self.tear_down()
                    elif not self.owning:
                        self.keeper.release_all()  # copies only: the shards keep theirs
                    outer.cancel_scope.cancel()
        if self.handed_over or not self.owning:
            log.info("handed over; exiting with swap on" if self.handed_over else
                     "took nothing over; the running supervisor keeps serving")
            if error is not None and not self.handed_over:
                raise error
            return  # the pid file is the other supervisor's
        self.layout.pid_file.unlink(missing_ok=True)
        log.info("stopped")
        if error is not None:
            raise error

    async def _serve(self, ready_fd: int | None) -> None:
        try:
            with trio.CancelScope() as bring_up_scope:
                self._bring_up_scope = bring_up_scope
                if self.adopting:
                    await handover.adopt(self)
                elif self.restoring is not None:
                    await handover.restore(self)
                else:
                    await self.bring_up()
        except (StartError, CommandError) as e:
            _report(ready_fd, f"ERROR {e}")
            raise
        finally:
            self._bring_up_scope = None
        if bring_up_scope.cancelled_caught:
            _report(ready_fd, "ERROR interrupted while starting")
            raise StartError("interrupted while starting")
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(
                keep_running, self.board, "control",
                partial(serve_control, self.layout.control_socket, self.handle),
                backoff=CONTROL_RESTART))
            log.info("swap active on %s (%s virtual, %d shard(s))", ", ".join(self.loops),
                     format_size(self.config.size), self.config.shards)
            if not self.owning:  # a takeover: from here on everything is ours
                write_private(self.layout.pid_file, self.ident.format())
                self.owning = True
            _report(ready_fd, f"READY {' '.join(self.loops)}")
            sd_notify("READY=1")
            if self.takeover is not None:
                nursery.start_soon(handover.replace_shards, self)
            for name, fn in (("monitor", self.monitor), ("watchdog", self.watchdog),
                             ("status", self.status_line), ("keeper", self.sweep)):
                nursery.start_soon(partial(keep_running, self.board, name, started_at_once(fn)))
            await self.shutdown.wait()
            nursery.cancel_scope.cancel()

    async def _signals(self, signals) -> None:
        async for signum in signals:
            name = signal_name(signum)
            if self.shutdown.is_set():
                log.warning("%s received while stopping (swapoff runs first): ignored", name)
                continue
            log.warning("%s received: stopping (swapoff first)", name)
            self.shutdown.set()
            if self._bring_up_scope is not None:
                self._bring_up_scope.cancel()


def _status(code: int | None) -> str:
    if code is None:
        return "status unknown"
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"


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
    try:
        failed = hardening.harden(allow_unlocked=config.allow_unlocked_memory)
    except hardening.HardeningError as e:
        _report(ready_fd, f"ERROR {e}")
        raise StartError(str(e)) from None
    for msg in failed:
        log.warning("running without full protection: %s", msg)
    try:
        trio.run(sup.run, ready_fd)
    except CommandError as e:
        raise StartError(str(e)) from None
    return 0

