"""The remote tier against real nbdkit servers: replication, failover, resync, sealing.

Real servers for the same reason as test_nbd.py: killing and restarting a process is the
failure we must survive, and the nbdkit memory plugin restarts *empty*, which is exactly the
case a resync that trusts a returning target would get wrong.

The tier is a store of the lane: the lane allocates its space and hands trio the byte I/O,
so pages are written and read here through a real lane (tests/lane/harness.py), and what is
checked about the tier (placement, copies on the exports, repair) follows from that traffic.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from tests.lane.fuseproto import FuseError
from tests.lane.harness import PAGE, LaneRig, all_runs, lookup, mixed_bytes, open_lane
from tests.netutil import free_port, spawn_nbdkit, wait_listening
from tierswap.config import Config, parse_config
from tierswap.crypto import BLOCK
from tierswap.nbd import open_nbd_client
from tierswap.tiers.base import SEG_SIZE, TierError
from tierswap.tiers.remote import RemoteTier

MiB = 1 << 20
CAPACITY = 16 * MiB


class Server:
    """An nbdkit process on a fixed port that can be killed and started again (empty)."""

    def __init__(self, tmp: Path, args: tuple[str, ...]) -> None:
        self.tmp, self.args = tmp, args
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        for _ in range(3):
            self.port = free_port()
            if self.start():
                return
        pytest.fail(f"nbdkit {' '.join(args)} did not start")

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def start(self) -> bool:
        for _ in range(50):  # the port may linger briefly after a kill
            self.proc = spawn_nbdkit(self.port, self.args,
                                     self.tmp / f"nbdkit-{self.port}.log")
            if wait_listening(self.proc, self.port, 5.0):
                return True
            self.kill()
            time.sleep(0.1)
        return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=5)




@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed (apt install nbdkit)")
    servers: list[Server] = []

    def start(*args: str) -> Server:
        server = Server(tmp_path, args or ("memory", str(CAPACITY)))
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for s in servers:
            s.kill()


def make_config(tmp_path: Path, servers: list[Server], *, replicas: int = 2,
                capacity: int = CAPACITY, shards: int = 1, memory: str | None = None,
                extra: str | None = None) -> Config:
    targets = ", ".join(f'"{s.url}"' for s in servers)
    ram = (f'[[tier]]\nname = "ram"\nkind = "memory"\ncapacity = "{memory}"\n'
           if memory else "")
    return parse_config(f"""
[daemon]
state_dir = "{tmp_path}/state"
run_dir = "{tmp_path}/run"
[device]
size = "{64 * shards}M"
shards = {shards}
{ram}
[[tier]]
name = "net"
kind = "remote"
capacity = "{capacity * shards}"
compression = "none"
targets = [{targets}]
{extra if extra is not None else f"replicas = {replicas}"}
""", check_fs=False)


def fast(tier: RemoteTier) -> RemoteTier:
    tier.timeout = 1.0
    tier.heartbeat = 0.1
    tier.backoff_max = 0.3
    return tier


def remote_tier_text(servers: list[Any], *, replicas: int, compression: str,
                     extra: str | None = None) -> str:
    """The remote tier's config; `extra` (e.g. 'erasure = "4+2"') replaces the replicas."""
    targets = ", ".join(f'"{s.url}"' for s in servers)
    return f"""
[[tier]]
name = "net"
kind = "remote"
capacity = "{CAPACITY}"
compression = "{compression}"
targets = [{targets}]
{extra if extra is not None else f"replicas = {replicas}"}
"""


@dataclass
class Remote:
    """A lane whose last tier is the remote tier, and a bytearray model of the device."""

    rig: LaneRig
    tier: RemoteTier
    model: bytearray
    written: list[tuple[int, int]]  # (offset, length) of every write, for check_all
    next_page: int = 0

    @property
    def index(self) -> int:
        return self.tier.index

    def open_segment(self) -> int:
        return int(self.rig.svc.lane.segments(self.index)[2])

    async def write(self, off: int, data: bytes) -> None:
        await self.rig.client.write(off, data)
        self.model[off : off + len(data)] = data
        self.written.append((off, len(data)))

    async def store(self, npages: int, seed: int, *, kind: str = "mixed") -> tuple[int, bytes]:
        """npages at the next free pages; returns (offset, data)."""
        n = npages * PAGE
        data = mixed_bytes(seed, n) if kind == "mixed" else \
            np.random.default_rng(seed).bytes(n)
        off = self.next_page * PAGE
        await self.write(off, data)
        self.next_page += npages
        return off, data

    async def fill(self, nseg: int, seed: int = 1) -> None:
        """Pieces of mixed sizes (compressed pages are any length) until segment `nseg`
        of the tier is the open one."""
        rng = np.random.default_rng(seed)
        i = 0
        while self.open_segment() < nseg:
            await self.store(int(rng.integers(1, 64)), seed * 100 + i)
            i += 1

    async def check_all(self, written: list[tuple[int, int]] | None = None) -> None:
        c = self.rig.client
        for off, n in self.written if written is None else written:
            assert await c.read(off, n) == bytes(self.model[off : off + n])
            mid = off + n // 2 + 100  # a sub-range: part of a run, off the page grid
            m = min(5000, off + n - mid)
            if m > 0:
                assert await c.read(mid, m) == bytes(self.model[mid : mid + m])


@asynccontextmanager
async def remote_lane(tmp_path: Path, servers: list[Any], *, replicas: int = 2,
                      compression: str = "zstd:1", extra: str | None = None,
                      tweak: Callable[[RemoteTier], None] | None = None
                      ) -> AsyncIterator[Remote]:
    """A running lane whose only tier is the remote tier over `servers` (anything with a
    `url`), its tunables shortened by `fast` (and `tweak`) before it connects."""
    def setup(svc: Any) -> None:  # before the tier's background tasks connect
        tier = fast(svc.tiers[-1])
        if tweak is not None:
            tweak(tier)

    size = 64 * MiB
    async with open_lane(size=size, mem=None, disk=None, tmp=tmp_path, setup=setup,
                         extra=remote_tier_text(servers, replicas=replicas,
                                                compression=compression,
                                                extra=extra)) as rig:
        tier = rig.svc.tiers[-1]
        assert isinstance(tier, RemoteTier)
        yield Remote(rig, tier, bytearray(size), [])


def target(tier: RemoteTier, i: int) -> dict:
    return tier.extra_statistics()["targets"][i]  # type: ignore[index]


async def wait_for(pred: Callable[[], bool], timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


def synced(tier: RemoteTier) -> bool:
    st = tier.extra_statistics()
    return all(t["up"] and t["resync_pending"] == 0 for t in st["targets"])  # type: ignore


async def export_bytes(url: str, start: int, n: int) -> bytes:
    async with open_nbd_client(url) as c:
        return b"".join([await c.read(off, min(4 * MiB, start + n - off))
                         for off in range(start, start + n, 4 * MiB)])


# ----------------------------------------------------------------------------------- tests


async def test_round_trip_and_placement(nbdkit, tmp_path: Path) -> None:
    servers = [nbdkit(), nbdkit()]
    async with remote_lane(tmp_path, servers) as r:
        tier = r.tier
        assert tier.align == BLOCK and tier.can_trim
        await r.fill(4)
        await r.check_all()
        # segments rotate over the targets, so reads (first copy preferred) spread out
        assert tier.placement[:4].tolist() == [[0, 1], [1, 0], [0, 1], [1, 0]]
        # every copy holds the same ciphertext at the same export offset
        assert await export_bytes(servers[0].url, 0, 2 * SEG_SIZE) == \
            await export_bytes(servers[1].url, 0, 2 * SEG_SIZE)
        st = tier.extra_statistics()
        assert st["replicas"] == 2 and st["auth_failures"] == 0
        assert st["degraded_writes"] == 0 and st["degraded_segments"] == 0
        assert [t["up"] for t in st["targets"]] == [True, True]  # type: ignore[index]
        ts = r.rig.stats().tiers[r.index]
        assert ts.pages > 0 and ts.read_errors == ts.write_errors == 0


async def test_trim_only_free_segments(nbdkit, tmp_path: Path) -> None:
    servers = [nbdkit(), nbdkit()]
    async with remote_lane(tmp_path, servers) as r:
        tier = r.tier
        await r.fill(3)
        for run in all_runs(r.rig, r.index):  # empty segment 0: every record in it goes
            if run.base < SEG_SIZE and run.nbytes:
                await r.rig.client.punch(run.start * PAGE, run.npages * PAGE)
                r.model[run.start * PAGE : (run.start + run.npages) * PAGE] = \
                    bytes(run.npages * PAGE)
        assert r.rig.svc.lane.segments(r.index)[1][0]  # free in the lane
        await tier.trim(0, 3 * SEG_SIZE)  # segment 0 is free; 1 and 2 are live: kept
        for s in servers:
            assert await export_bytes(s.url, 0, SEG_SIZE) == bytes(SEG_SIZE)
        await r.check_all()
        assert sum(c.statistics().trims for t in tier.targets if (c := t.client)) == 2


async def test_create_checks_exports(nbdkit, tmp_path: Path) -> None:
    small = nbdkit("memory", str(CAPACITY - MiB))
    good = nbdkit()
    cfg = make_config(tmp_path, [good, small])
    with pytest.raises(TierError, match="has 15728640 bytes") as info:
        await RemoteTier.create(cfg.tiers[0], 0, cfg, 0)
    assert info.value.errno == errno.ENOSPC
    # two shards: shard 1 needs [share, 2 * share) of each export
    cfg2 = make_config(tmp_path, [good], replicas=1, shards=2)
    tier0 = await RemoteTier.create(cfg2.tiers[0], 0, cfg2, 0)
    assert tier0.origin == 0
    with pytest.raises(TierError, match="shard 1 uses bytes"):
        await RemoteTier.create(cfg2.tiers[0], 0, cfg2, 1)
    readonly = nbdkit("-r", "memory", str(CAPACITY))
    cfg3 = make_config(tmp_path, [readonly], replicas=1)
    with pytest.raises(TierError, match="read-only") as info:
        await RemoteTier.create(cfg3.tiers[0], 0, cfg3, 0)
    assert info.value.errno == errno.EROFS


async def test_unreachable_at_start_then_joins(nbdkit, tmp_path: Path) -> None:
    a = nbdkit()
    b = nbdkit()
    b.kill()
    async with remote_lane(tmp_path, [a, b]) as r:  # b down: starts degraded, not refused
        tier = r.tier
        assert target(tier, 1)["up"] is False
        await r.fill(2)
        # with b down new segments still get their copies where possible (only a is up)
        assert tier.extra_statistics()["degraded_writes"] > 0
        assert target(tier, 1)["resync_pending"] >= 2
        b.start()
        await wait_for(lambda: synced(tier))
        a.kill()
        await r.check_all()  # everything came from b: resync copied it


async def test_no_cleartext_on_the_wire(nbdkit, tmp_path: Path) -> None:
    servers = [nbdkit(), nbdkit()]
    canary = b"TIERSWAP-CLEARTEXT-CANARY-0123456789abcdef!"
    page = (canary * (BLOCK // len(canary) + 1))[:BLOCK]
    data = page * 64
    async with remote_lane(tmp_path, servers, compression="none") as r:
        await r.write(0, data)
        await r.write(10 * BLOCK, page)  # overwrite: runs now split a piece
        assert await r.rig.client.read(0, len(data)) == data
        ts = r.rig.stats().tiers[r.index]
        assert ts.pages == 64 and ts.pages_in == 65
        for s in servers:
            raw = await export_bytes(s.url, 0, CAPACITY)
            assert canary not in raw and canary[:16] not in raw
            assert raw[: len(data)].count(0) < len(data) // 100  # ciphertext did land


async def test_failover_resync_after_empty_restart(nbdkit, tmp_path: Path) -> None:
    a, b = nbdkit(), nbdkit()
    async with remote_lane(tmp_path, [a, b]) as r:
        tier = r.tier
        await r.fill(3)
        a.kill()
        await r.check_all()  # from b
        await wait_for(lambda: not target(tier, 0)["up"])
        await r.fill(5, seed=2)  # written while a is away
        st = tier.extra_statistics()
        assert st["degraded_writes"] > 0 and st["degraded_segments"] > 0
        assert target(tier, 0)["resync_pending"] > 0 and target(tier, 0)["errors"] >= 1
        a.start()  # the memory plugin comes back empty: old copies are gone too
        await wait_for(lambda: synced(tier))
        assert target(tier, 0)["reconnects"] == 1
        assert tier.extra_statistics()["degraded_segments"] == 0
        b.kill()
        await r.check_all()  # all from a: proves the resync
        assert tier.extra_statistics()["auth_failures"] == 0


async def test_both_down_fails_fast_then_recovers(nbdkit, tmp_path: Path) -> None:
    a, b = nbdkit(), nbdkit()
    async with remote_lane(tmp_path, [a, b], compression="none") as r:
        tier, lane = r.tier, r.rig.svc.lane
        off, data = await r.store(8, 1, kind="random")
        (run,) = lookup(r.rig, off // PAGE, off // PAGE + 8)
        a.kill()
        b.kill()
        await wait_for(lambda: not (target(tier, 0)["up"] or target(tier, 1)["up"]), 5)
        with trio.fail_after(tier.timeout):
            with pytest.raises(TierError) as info:
                await tier.write(run.base + 8 * BLOCK, b"x" * 100, 1)
            assert info.value.errno == errno.EIO
            with pytest.raises(TierError) as info:
                await tier.read(run.base, run.nbytes)
            assert info.value.errno == errno.EIO
        # nowhere to write: the lane takes the tier offline and places nothing there
        await wait_for(lambda: lane.statistics()["tiers"][r.index]["offline"] == 1, 5)
        with trio.fail_after(tier.timeout):
            with pytest.raises(FuseError) as info:
                await r.rig.client.write(100 * PAGE, b"y" * PAGE)
            assert info.value.errno == errno.ENOSPC  # (no other tier to spill to here)
            with pytest.raises(FuseError) as info:
                await r.rig.client.read(off, len(data))
            assert info.value.errno == errno.EIO
        a.start()
        b.start()
        await wait_for(lambda: target(tier, 0)["up"] and target(tier, 1)["up"])
        await wait_for(lambda: lane.statistics()["tiers"][r.index]["offline"] == 0, 5)
        again = [await r.store(1, 2, kind="random"), await r.store(3, 3)]
        await r.check_all([(o, len(d)) for o, d in again])
        with pytest.raises(FuseError):  # both servers restarted empty: lost, never wrong
            await r.rig.client.read(off, len(data))
        assert tier.extra_statistics()["auth_failures"] == 0  # known stale, not tampering


async def test_tampering_detected_and_repaired(nbdkit, tmp_path: Path) -> None:
    a, b = nbdkit(), nbdkit()
    async with remote_lane(tmp_path, [a, b], compression="none") as r:
        tier, c = r.tier, r.rig.client
        off, data = await r.store(3, 1, kind="random")
        (run,) = lookup(r.rig, off // PAGE, off // PAGE + 3)
        assert tier.placement[run.base // SEG_SIZE].tolist() == [0, 1]  # a is read first
        async with open_nbd_client(a.url) as raw:
            await raw.write(tier.origin + run.base + 100, b"garbage" * 10)
        assert await c.read(off, len(data)) == data  # from b, after a failed
        assert tier.extra_statistics()["auth_failures"] == 1
        await wait_for(lambda: synced(tier))  # a's copy rewritten from b
        b.kill()
        assert await c.read(off, len(data)) == data  # from the repaired a
        await wait_for(lambda: not target(tier, 1)["up"])
        b.start()
        await wait_for(lambda: target(tier, 1)["reconnects"] == 1 and synced(tier))
        for s in (a, b):
            async with open_nbd_client(s.url) as raw:
                await raw.write(tier.origin + run.base + BLOCK, os.urandom(BLOCK))
        with pytest.raises(FuseError) as info:
            await c.read(off, len(data))
        assert info.value.errno == errno.EIO
        assert tier.extra_statistics()["auth_failures"] == 3
        assert await c.read(off, 100) == data[:100]  # other blocks still serve
        assert r.rig.stats().tiers[r.index].read_errors == 1


async def test_rereplication_elsewhere(nbdkit, tmp_path: Path) -> None:
    servers = [nbdkit(), nbdkit(), nbdkit()]

    def tweak(tier: RemoteTier) -> None:
        tier.rereplicate_after = 0.3

    async with remote_lane(tmp_path, servers, tweak=tweak) as r:
        tier = r.tier
        await r.fill(5)
        servers[0].kill()
        await wait_for(lambda: not target(tier, 0)["up"])
        assert tier.extra_statistics()["degraded_segments"] >= 3
        await wait_for(lambda: tier.extra_statistics()["degraded_segments"] == 0)
        assert tier.extra_statistics()["rereplicated_segments"] >= 3
        assert not (tier.placement[:6] == 0).any()
        servers[1].kill()  # every segment still has its copy on server 2
        await r.check_all()


async def test_slow_target_is_bounded_by_the_timeout(nbdkit, tmp_path: Path) -> None:
    slow = nbdkit("--filter=delay", "memory", str(CAPACITY), "delay-read=3")
    ok = nbdkit()
    async with remote_lane(tmp_path, [slow, ok], compression="none") as r:
        tier = r.tier
        off, data = await r.store(2, 1, kind="random")
        (run,) = lookup(r.rig, off // PAGE, off // PAGE + 2)
        assert tier.placement[run.base // SEG_SIZE].tolist() == [0, 1]
        t0 = trio.current_time()
        assert await r.rig.client.read(off, len(data)) == data  # slow copy times out, then b
        assert trio.current_time() - t0 < tier.timeout + 0.5
        assert target(tier, 0)["errors"] >= 1


async def test_a_reused_segment_is_placed_afresh(nbdkit, tmp_path: Path) -> None:
    """The lane bumps a segment's life each time it opens it from free; the tier places a
    segment again when it sees a new life (here: with a target down, up targets first)."""
    a, b = nbdkit(), nbdkit()
    async with remote_lane(tmp_path, [a, b], compression="none") as r:
        tier, lane = r.tier, r.rig.svc.lane
        await r.fill(2)  # segments 0 and 1 full, 2 open
        assert tier.placement[:2].tolist() == [[0, 1], [1, 0]]
        life = tier.space.life  # type: ignore[union-attr]
        assert life[:3].tolist() == [1, 1, 1]
        for run in all_runs(r.rig, r.index):  # empty segment 1
            if run.base >> 20 == 1 and run.nbytes:
                await r.rig.client.punch(run.start * PAGE, run.npages * PAGE)
                r.model[run.start * PAGE : (run.start + run.npages) * PAGE] = \
                    bytes(run.npages * PAGE)
        b.kill()
        await wait_for(lambda: not target(tier, 1)["up"])
        lane.set_draining(r.index, True)  # close segment 2: the next one opened is 1
        lane.set_draining(r.index, False)
        off, _ = await r.store(4, 9, kind="random")
        (run,) = lookup(r.rig, off // PAGE, off // PAGE + 4)
        assert run.base >> 20 == 1 and life[1] == 2
        assert tier.placement[1].tolist() == [0, 1]  # placed again: the up target first
        await r.check_all()
