"""A shard worker: one FUSE file, one slot map, a share of every tier, one process.

Started by the supervisor as ``python -m tierswap.daemon --shard K [--config PATH]``. It hardens
itself, builds its device, mounts ``<run_dir>/shardK/mnt`` (without allow_other) and serves
FUSE requests and its private control socket until told to stop. pyfuse3 runs at most
MAX_TASKS requests at once: that, the tiers' buffer pools and the zstd thread limiter bound
everything the daemon holds in flight.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from tierswap import hardening, system
from tierswap.config import Config, ConfigError, load_config
from tierswap.control import ControlError, serve_control
from tierswap.device import VirtualSwapDevice, open_device
from tierswap.fs import FILE_NAME, SwapFS
from tierswap.logs import setup_logging
from tierswap.policy import Policy
from tierswap.tiers.memory import MemoryTier

log = logging.getLogger("tierswap.daemon")

MIN_TASKS, MAX_TASKS = 4, 16


def shard_paths(config: Config, shard: int) -> tuple[Path, Path, Path]:
    d = config.shard_dir(shard)
    return d, d / "mnt", d / "control.sock"


class Shard:
    def __init__(self, config: Config, shard: int, device: VirtualSwapDevice) -> None:
        self.config = config
        self.shard = shard
        self.device = device
        self.stop = trio.Event()
        self.policy: Policy | None = None  # the tiering engine, attached once serving

    def tier_index(self, name: str) -> int:
        for t in self.device.tiers:
            if t.name == name:
                return t.index
        raise ControlError(f"no tier named {name!r}")

    def stats(self) -> dict[str, Any]:
        d = dataclasses.asdict(self.device.statistics())
        d["tiers"] = [dataclasses.asdict(t.statistics()) for t in self.device.tiers]
        d["hardening"] = hardening.hardening_state()
        return d

    async def handle(self, req: dict[str, Any], progress) -> Any:
        cmd = req["cmd"]
        if cmd == "ping":
            return {"shard": self.shard, "pid": os.getpid()}
        if cmd == "stats":
            return self.stats()
        if cmd == "shutdown":
            self.stop.set()
            return {"stopping": True}
        if self.policy is not None:
            return await self.policy.handle(req, progress)
        raise ControlError(f"unknown command {cmd!r}")


async def release_own_swap(mnt: Path) -> None:
    """Whatever stops us: take our file out of swap first, or the kernel loses its pages."""
    for dev in await trio.to_thread.run_sync(system.loops_backed_by, mnt):
        log.warning("swap still active on %s at shutdown: running swapoff", dev)
        try:
            await trio.to_thread.run_sync(system.swapoff, dev)
        except system.SystemError_ as e:
            log.error("%s", e)
            continue
        await trio.to_thread.run_sync(system.loop_detach, dev)


async def serve(config: Config, shard: int) -> None:
    sdir, mnt, sock = shard_paths(config, shard)
    sdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    mnt.mkdir(mode=0o700, exist_ok=True)
    device = await open_device(config, shard)
    hardening.prefault_heap()
    me = Shard(config, shard, device)
    opts = set(pyfuse3.default_options) | {"fsname=tierswap", "subtype=tierswap"}
    pyfuse3.init(SwapFS(device), str(mnt), opts)
    mounted = True
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main, MIN_TASKS, MAX_TASKS)
            await nursery.start(serve_control, sock, me.handle)
            for t in device.tiers:
                if isinstance(t, MemoryTier):
                    nursery.start_soon(t.run_grower)
                if hasattr(t, "run_background"):  # e.g. remote: reconnect and re-replicate
                    await nursery.start(t.run_background)
            me.policy = Policy(me)
            nursery.start_soon(me.policy.run)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                nursery.start_soon(_wait_signal, signals, me.stop)
                log.info("shard %d serving %s (%d pages)", shard, mnt / FILE_NAME.decode(),
                         device.npages)
                await me.stop.wait()
            await release_own_swap(mnt)
            pyfuse3.terminate()
            nursery.cancel_scope.cancel()
    finally:
        if mounted:
            pyfuse3.close(unmount=True)
        for t in device.tiers:
            await t.aclose()
        device.map.close()
        log.info("shard %d stopped", shard)


async def _wait_signal(signals, stop: trio.Event) -> None:
    async for _ in signals:
        stop.set()
        return


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
    for msg in hardening.harden():
        log.warning("running without full protection: %s", msg)
    try:
        trio.run(serve, config, args.shard)
    except (OSError, RuntimeError) as e:
        log.error("shard %d: %s", args.shard, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
