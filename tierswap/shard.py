"""A shard worker: one FUSE file, one slot map, a share of every tier, one process.

Started by the supervisor as ``python -m tierswap.shard --shard K [--config PATH]``, with the
kit of a predecessor when it replaces one (pass_fds, and TIERSWAP_KIT naming them). It hardens
itself; a fresh shard mounts ``<run_dir>/shardK/mnt`` (without allow_other) and lets pyfuse3
answer INIT, a replacement takes over the mounted connection from its kit. Then the native
lane serves every FUSE request on its own threads (tierswap/lane.py), and this process runs
the control plane: its control socket, the tiering policy, and the slow tiers' I/O.

The one rule of its life: it never stops serving, and never unmounts, while a loop device on
its file is in /proc/swaps. So:
* a stop (SIGTERM, SIGINT, the unit's watchdog signal, or `shutdown` on the control socket)
  first takes its own device out of swap; if that swapoff fails, it logs and keeps serving,
  and the next stop request tries again;
* a `handoff` stops serving without either: a replacement takes the kit over (the supervisor
  holds a copy of every fd, so the connection, the map and the arenas outlive us);
* signals are handled from before the mount until the process exits; one that arrives while
  swapoff runs is logged and ignored;
* every background task (the lane's trio side, policy, control server) runs under
  `tasks.keep_running`: an exception is logged and the task restarted with backoff, never
  the end of serving.

Mounting and the swap-facing system calls sit behind two small seams (`Mounter`, `SwapHost`)
so that this lifecycle can be tested in-process over a socketpair; the real ones are `Mounter`
and `SwapHost`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from functools import partial
from typing import Any

import trio

from tierswap import commands, fs, hardening, logs, system
from tierswap.config import Config, ConfigError, load_config
from tierswap.control import first_error, serve_control
from tierswap.errors import CommandError, TierswapError
from tierswap.kit import FdReply, Kit, KitError, check_manifest, make_manifest
from tierswap.lane import LaneService
from tierswap.layout import Layout, ShardLayout
from tierswap.logs import setup_logging
from tierswap.policy import Policy
from tierswap.tasks import STOP_SIGNALS, TaskBoard, keep_running, signal_name, started_at_once

log = logging.getLogger("tierswap.shard")

LANE_THREADS = 4  # FUSE reader threads per shard, each with its own cloned /dev/fuse fd
CONTROL_RESTART = (0.2, 2.0)  # short: `down --force` decides a shard is dead by its silence
BACKGROUND_RESTART = (1.0, 60.0)  # policy, growth, repair: a fault that repeats backs off


# ---------------------------------------------------------------------------- seams


class Mounter:
    """Mount the shard's file system and hand back its connection (fs.py)."""

    async def mount(self, paths: ShardLayout, nclones: int) -> tuple[int, list[int]]:
        return await fs.mount(paths.mountpoint, nclones)

    def unmount(self, paths: ShardLayout) -> None:
        fs.unmount(paths.mountpoint)


class SwapHost:
    """The kernel's swap as one shard sees it: the loop devices on its own file."""

    def __init__(self, paths: ShardLayout) -> None:
        self.paths = paths
        self.majmin: str | None = None  # device number of our FUSE file, once mounted

    def note_mounted(self) -> None:
        """Record our mount's device number, from mountinfo: a stat of our own file here,
        before the lane serves, would wait for ourselves to answer it."""
        self.majmin = system.mount_device(str(self.paths.mountpoint))

    def own_loops(self) -> list[str]:
        """Loop devices on our file: by path, or by device number (after a lazy unmount)."""
        out = []
        for d in system.loop_list():
            back = d.get("back-file") or ""
            if back == str(self.paths.swap_file) or (
                    self.majmin is not None and d.get("back-maj:min") == self.majmin):
                out.append(d["name"])
        return out

    def own_swaps(self) -> list[str]:
        """Those of our loop devices that are in /proc/swaps."""
        swaps = system.active_swaps()
        return [d for d in self.own_loops() if d in swaps]

    def swapoff(self, dev: str) -> None:
        system.swapoff(dev)

    def detach(self, dev: str) -> None:
        system.loop_detach(dev)


# ---------------------------------------------------------------------------- the shard


class Shard:
    def __init__(self, config: Config, shard: int, kit: Kit, *, mounter: Mounter | None = None,
                 host: SwapHost | None = None, threads: int = LANE_THREADS) -> None:
        self.config = config
        self.shard = shard
        self.paths = Layout.of(config).shard(shard)
        self.kit = kit
        self.mounter = mounter or Mounter()
        self.host = host or SwapHost(self.paths)
        self.threads = threads
        self.service: LaneService | None = None
        self.policy: Policy | None = None
        self.board = TaskBoard()
        self._stop = trio.Event()
        self.stopping = False  # a stop is being carried out (swapoff may be running)
        self.handoff = False  # stopping for a replacement: no swapoff, no unmount

    # ------------------------------------------------------------------ control

    def stats(self) -> dict[str, Any]:
        assert self.service is not None
        d = dataclasses.asdict(self.service.statistics())
        for t in d["tiers"]:  # the counters as status.py groups them
            t["counters"] = {k: t[k] for k in ("pages_in", "pages_out", "promotions",
                                               "demotions", "bytes_moved")}
            t["counters"]["errors"] = t["read_errors"] + t["write_errors"]
        d["tiers"] = list(d["tiers"])
        d["hardening"] = hardening.hardening_state()
        d["tasks"] = self.board.record()
        d["log_dropped"] = logs.dropped()
        return d

    async def handle(self, wire: dict[str, Any], progress) -> Any:
        req = commands.parse(wire, commands.SHARD)
        if isinstance(req, commands.Ping):
            return {"shard": self.shard, "pid": os.getpid()}
        if isinstance(req, commands.Stats):
            return self.stats()
        if isinstance(req, commands.Shutdown):
            self.request_stop("shutdown requested")
            return {"stopping": True}
        if isinstance(req, commands.Kit):  # the supervisor keeps a copy of every fd
            names = self.kit.names()
            return FdReply({"names": names, "manifest": self.kit.manifest},
                           [self.kit.fds[n] for n in names])
        if isinstance(req, commands.Handoff):
            self.handoff = True
            self.request_stop("handoff requested")
            return {"stopping": True, "handoff": True}
        assert self.policy is not None
        return await self.policy.handle(req, progress)

    def request_stop(self, why: str) -> None:
        if self.stopping:
            log.warning("shard %d: %s while already stopping (swapoff running): ignored",
                        self.shard, why)
            return
        log.info("shard %d: %s: stopping", self.shard, why)
        self._stop.set()

    # ------------------------------------------------------------------ serving

    async def _connect(self) -> list[int]:
        """A fresh shard mounts; a replacement takes the connection over from its kit."""
        if self.kit.fresh:
            self.kit.manifest = make_manifest(self.config, self.shard, self.threads)
            fd, clones = await self.mounter.mount(self.paths, self.threads)
            self.kit.fds["fuse"] = fd
            for i, c in enumerate(clones):
                self.kit.fds[f"fuse.{i}"] = c
            return clones
        check_manifest(self.kit.manifest, self.config, self.shard)
        n = int(self.kit.manifest["lane_threads"])
        log.info("shard %d taking over a running device (%d fds in its kit)", self.shard,
                 len(self.kit.fds))
        return [self.kit.fds[f"fuse.{i}"] for i in range(n)]

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve until a stop finds our device out of swap (or hands off), unmount."""
        self.paths.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.paths.mountpoint.mkdir(mode=0o700, exist_ok=True)
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            clones = await self._connect()
            try:
                self.host.note_mounted()
                self.service = await LaneService.open(self.config, self.shard, self.kit, clones)
                hardening.prefault_heap()
                self.policy = Policy(self.service, self.config.policy)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._signals, signals)
                    await self._start_background(nursery)
                    self.service.start(resend=not self.kit.fresh)
                    nursery.start_soon(self._on_lost)
                    log.info("shard %d serving %s (%d pages)", self.shard, self.paths.swap_file,
                             self.service.npages)
                    task_status.started()
                    await self._until_out_of_swap()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    if self.service is not None:
                        await self.service.close()
                left = self.host.own_swaps() if self.host.majmin and not self.handoff else []
                if left:  # only a bug gets here: unmounting would not save those pages either
                    log.critical("shard %d exiting while %s is in swap", self.shard,
                                 ", ".join(left))
                if not self.handoff and not left:
                    self.mounter.unmount(self.paths)
                self.kit.close()

    async def _start_background(self, nursery: trio.Nursery) -> None:
        assert self.service is not None and self.policy is not None
        await nursery.start(partial(keep_running, self.board, "lane", self.service.run,
                                    backoff=BACKGROUND_RESTART))
        await nursery.start(partial(keep_running, self.board, "control",
                                    partial(serve_control, self.paths.control_socket,
                                            self.handle), backoff=CONTROL_RESTART))
        nursery.start_soon(partial(keep_running, self.board, "policy",
                                   started_at_once(self.policy.run), backoff=BACKGROUND_RESTART))

    async def _signals(self, signals) -> None:
        async for signum in signals:
            self.request_stop(f"{signal_name(signum)} received")

    async def _on_lost(self) -> None:
        assert self.service is not None
        await self.service.lost.wait()
        if not self.stopping:  # unmounted or aborted from outside: nothing to serve
            log.critical("shard %d: the FUSE connection is gone", self.shard)
            self.request_stop("FUSE connection lost")

    async def _until_out_of_swap(self) -> None:
        """Wait for a stop request; return once our device is out of swap (retry each time),
        or at once for a handoff."""
        while True:
            await self._stop.wait()
            self.stopping = True
            if self.handoff:
                return
            left = await self.release_own_swap()
            if not left:
                return
            log.error("shard %d: %s still in swap: serving on (stop again to retry; "
                      "'tierswap down' retries from the supervisor)", self.shard,
                      ", ".join(left))
            self._stop = trio.Event()
            self.stopping = False

    async def release_own_swap(self) -> list[str]:
        """swapoff and detach our loop devices; returns those still in swap."""
        left = []
        for dev in await trio.to_thread.run_sync(self.host.own_swaps):
            log.warning("shard %d: %s is in swap at shutdown: running swapoff", self.shard, dev)
            try:
                await trio.to_thread.run_sync(self.host.swapoff, dev, abandon_on_cancel=False)
            except CommandError as e:
                if dev in await trio.to_thread.run_sync(self.host.own_swaps):
                    log.error("shard %d: %s", self.shard, e)
                    left.append(dev)
                # else: out of swap all the same (the supervisor's swapoff ran at once)
        if left:
            return left
        for dev in await trio.to_thread.run_sync(self.host.own_loops):
            await trio.to_thread.run_sync(self.host.detach, dev)
        return []


async def serve(config: Config, shard: int, kit: Kit) -> None:
    try:
        await Shard(config, shard, kit).serve()
    finally:
        log.info("shard %d stopped", shard)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tierswap-shard")
    p.add_argument("--config")
    p.add_argument("--shard", type=int, required=True)
    args = p.parse_args(argv)
    setup_logging()
    try:
        config = load_config(args.config, check_fs=False)
    except ConfigError as e:
        print(f"tierswap shard: {e}", file=sys.stderr)
        return 2
    try:
        failed = hardening.harden(allow_unlocked=config.allow_unlocked_memory)
    except hardening.HardeningError as e:
        log.error("shard %d: %s", args.shard, e)
        return 1
    for msg in failed:
        log.warning("running without full protection: %s", msg)
    try:
        kit = Kit.from_env(os.environ.pop("TIERSWAP_KIT")) if "TIERSWAP_KIT" in os.environ \
            else Kit()
    except KitError as e:
        log.error("shard %d: %s", args.shard, e)
        return 1
    try:
        trio.run(serve, config, args.shard, kit)
    except BaseExceptionGroup as eg:
        leaf = first_error(eg)
        if not isinstance(leaf, TierswapError | OSError | KitError | fs.MountError):
            raise
        log.error("shard %d: %s", args.shard, leaf)
        return 1
    except (TierswapError, OSError, RuntimeError, KitError, fs.MountError) as e:
        log.error("shard %d: %s", args.shard, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
