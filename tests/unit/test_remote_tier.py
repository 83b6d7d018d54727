"""The remote tier against real nbdkit servers: replication, failover, resync, sealing.

Real servers for the same reason as test_nbd.py: killing and restarting a process is the
failure we must survive, and the nbdkit memory plugin restarts *empty*, which is exactly the
case a resync that trusts a returning target would get wrong.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import trio

from tests.netutil import free_port, spawn_nbdkit, wait_listening
from tierswap.config import Config, parse_config
from tierswap.crypto import BLOCK
from tierswap.device import open_device
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
                capacity: int = CAPACITY, shards: int = 1, memory: str | None = None) -> Config:
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
replicas = {replicas}
""", check_fs=False)


def fast(tier: RemoteTier) -> RemoteTier:
    tier.timeout = 1.0
    tier.heartbeat = 0.1
    tier.backoff_max = 0.3
    return tier


@asynccontextmanager
async def running(tier: RemoteTier) -> AsyncIterator[RemoteTier]:
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(tier.run_background)
            yield tier
            nursery.cancel_scope.cancel()
    finally:
        await tier.aclose()


async def make_tier(tmp_path: Path, servers: list[Server], **kw) -> RemoteTier:
    cfg = make_config(tmp_path, servers, **kw)
    return fast(await RemoteTier.create(cfg.tiers[-1], 0, cfg, 0))


def blob(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, np.uint8).tobytes()


async def store(tier: RemoteTier, lens: list[int], seed: int) -> list[tuple[int, bytes]]:
    """Allocate and write like the device does; returns (base, bytes) per piece."""
    out = []
    pieces = tier.space.allocate(np.array(lens, np.uint16))
    assert pieces and pieces[-1].b == len(lens)
    for k, p in enumerate(pieces):
        data = blob(p.nbytes, seed * 1000 + k)
        await tier.write(p.base, data)
        out.append((p.base, data))
    return out


async def check_all(tier: RemoteTier, stored: list[tuple[int, bytes]]) -> None:
    for base, data in stored:
        assert await tier.read(base, len(data)) == data
        mid = len(data) // 2  # a run: a sub-range of what one write stored
        assert await tier.read(base + mid, min(5000, len(data) - mid)) == \
            data[mid : mid + 5000]


def target(tier: RemoteTier, i: int) -> dict:
    return tier.extra_statistics()["targets"][i]  # type: ignore[index]


async def wait_for(pred: Callable[[], bool], timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


def synced(tier: RemoteTier) -> bool:
    st = tier.extra_statistics()
    return all(t["up"] and t["resync_pending"] == 0 for t in st["targets"])  # type: ignore


async def fill_segments(tier: RemoteTier, nseg: int, seed: int = 1) -> list[tuple[int, bytes]]:
    """Pieces of mixed sizes (compressed pages are any length) over `nseg` segments."""
    stored: list[tuple[int, bytes]] = []
    rng = np.random.default_rng(seed)
    i = 0
    while tier.space.open_seg is None or tier.space.open_seg < nseg:
        lens = rng.integers(1, 4097, int(rng.integers(1, 64))).tolist()
        stored += await store(tier, lens, seed * 100 + i)
        i += 1
    return stored


# ----------------------------------------------------------------------------------- tests


async def test_round_trip_and_placement(nbdkit, tmp_path: Path) -> None:
    servers = [nbdkit(), nbdkit()]
    async with running(await make_tier(tmp_path, servers)) as tier:
        assert tier.space.align == BLOCK and tier.can_trim
        stored = await fill_segments(tier, 4)
        await check_all(tier, stored)
        # segments rotate over the targets, so reads (first copy preferred) spread out
        assert tier.placement[:4].tolist() == [[0, 1], [1, 0], [0, 1], [1, 0]]
        # every copy holds the same ciphertext at the same export offset
        async with open_nbd_client(servers[0].url) as a, open_nbd_client(servers[1].url) as b:
            assert await a.read(0, 2 * SEG_SIZE) == await b.read(0, 2 * SEG_SIZE)
        st = tier.extra_statistics()
        assert st["replicas"] == 2 and st["auth_failures"] == 0
        assert st["degraded_writes"] == 0 and st["degraded_segments"] == 0
        assert [t["up"] for t in st["targets"]] == [True, True]  # type: ignore[index]



async def test_trim_only_free_segments(nbdkit, tmp_path: Path) -> None:
    servers = [nbdkit(), nbdkit()]
    async with running(await make_tier(tmp_path, servers)) as tier:
        stored = await fill_segments(tier, 3)
        first = [(b, d) for b, d in stored if b < SEG_SIZE]
        tier.space.release(np.array([b for b, _ in first]), np.array([len(d) for _, d in first]))
        assert 0 in tier.space.free
        await tier.trim(0, 3 * SEG_SIZE)  # segment 0 is free; 1 and 2 are live: kept
        for s in servers:
            async with open_nbd_client(s.url) as raw:
                assert await raw.read(0, SEG_SIZE) == bytes(SEG_SIZE)
        await check_all(tier, [(b, d) for b, d in stored if b >= SEG_SIZE])
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
    tier = await make_tier(tmp_path, [a, b])  # b down: starts degraded, not refused
    async with running(tier):
        assert target(tier, 1)["up"] is False
        stored = await fill_segments(tier, 2)
        # with b down new segments still get their copies where possible (only a is up)
        assert tier.extra_statistics()["degraded_writes"] > 0
        assert target(tier, 1)["resync_pending"] >= 2
        b.start()
        await wait_for(lambda: synced(tier))
        a.kill()
        await check_all(tier, stored)  # everything came from b: resync copied it


async def test_no_cleartext_on_the_wire(nbdkit, tmp_path: Path) -> None:
    servers = [nbdkit(), nbdkit()]
    cfg = make_config(tmp_path, servers)
    canary = b"TIERSWAP-CLEARTEXT-CANARY-0123456789abcdef!"
    page = (canary * (BLOCK // len(canary) + 1))[:BLOCK]
    data = page * 64
    device = await open_device(cfg, 0)
    tier = fast(device.tiers[0])  # type: ignore[arg-type]
    try:
        async with running(tier):
            await device.write(0, data)
            await device.write(10 * BLOCK, page)  # overwrite: runs now split a piece
            assert await device.read(0, len(data)) == data
            assert tier.pages == 64 and tier.counters.pages_in == 65
            for s in servers:
                async with open_nbd_client(s.url) as c:
                    raw = b"".join([await c.read(off, 4 * MiB)
                                    for off in range(0, c.size, 4 * MiB)])
                assert canary not in raw and canary[:16] not in raw
                assert raw[: len(data)].count(0) < len(data) // 100  # ciphertext did land
    finally:
        device.map.close()


async def test_failover_resync_after_empty_restart(nbdkit, tmp_path: Path) -> None:
    a, b = nbdkit(), nbdkit()
    async with running(await make_tier(tmp_path, [a, b])) as tier:
        stored = await fill_segments(tier, 3)
        a.kill()
        await check_all(tier, stored)  # from b
        await wait_for(lambda: not target(tier, 0)["up"])
        more = await fill_segments(tier, 5, seed=2)  # written while a is away
        st = tier.extra_statistics()
        assert st["degraded_writes"] > 0 and st["degraded_segments"] > 0
        assert target(tier, 0)["resync_pending"] > 0 and target(tier, 0)["errors"] >= 1
        a.start()  # the memory plugin comes back empty: old copies are gone too
        await wait_for(lambda: synced(tier))
        assert target(tier, 0)["reconnects"] == 1
        assert tier.extra_statistics()["degraded_segments"] == 0
        b.kill()
        await check_all(tier, stored + more)  # all from a: proves the resync
        assert tier.extra_statistics()["auth_failures"] == 0


async def test_both_down_fails_fast_then_recovers(nbdkit, tmp_path: Path) -> None:
    a, b = nbdkit(), nbdkit()
    async with running(await make_tier(tmp_path, [a, b])) as tier:
        stored = await store(tier, [4096] * 8, seed=1)
        a.kill()
        b.kill()
        await wait_for(lambda: not (target(tier, 0)["up"] or target(tier, 1)["up"]), 5)
        with trio.fail_after(tier.timeout):
            with pytest.raises(TierError) as info:
                await tier.write(stored[0][0] + 8 * BLOCK, b"x" * 100)
            assert info.value.errno == errno.EIO
            with pytest.raises(TierError) as info:
                await tier.read(stored[0][0], len(stored[0][1]))
            assert info.value.errno == errno.EIO
        # nowhere to write: the allocator refuses, so the device spills to another tier
        assert tier.space.allocate(np.array([4096], np.uint16)) == []
        a.start()
        b.start()
        await wait_for(lambda: target(tier, 0)["up"] and target(tier, 1)["up"])
        again = await store(tier, [4096, 1000], seed=2)
        await check_all(tier, again)
        with pytest.raises(TierError):  # both servers restarted empty: lost, never wrong
            await tier.read(stored[0][0], len(stored[0][1]))
        assert tier.extra_statistics()["auth_failures"] == 0  # known stale, not tampering


async def test_tampering_detected_and_repaired(nbdkit, tmp_path: Path) -> None:
    a, b = nbdkit(), nbdkit()
    async with running(await make_tier(tmp_path, [a, b])) as tier:
        (base, data), = await store(tier, [4096] * 3, seed=1)
        assert tier.placement[0].tolist() == [0, 1]  # a is read first
        async with open_nbd_client(a.url) as raw:
            await raw.write(tier.origin + base + 100, b"garbage" * 10)
        assert await tier.read(base, len(data)) == data  # from b, after a failed
        assert tier.extra_statistics()["auth_failures"] == 1
        await wait_for(lambda: synced(tier))  # a's copy rewritten from b
        b.kill()
        assert await tier.read(base, len(data)) == data  # from the repaired a
        await wait_for(lambda: not target(tier, 1)["up"])
        b.start()
        await wait_for(lambda: target(tier, 1)["reconnects"] == 1 and synced(tier))
        for s in (a, b):
            async with open_nbd_client(s.url) as raw:
                await raw.write(tier.origin + base + BLOCK, os.urandom(BLOCK))
        with pytest.raises(TierError) as info:
            await tier.read(base, len(data))
        assert info.value.errno == errno.EIO
        assert tier.extra_statistics()["auth_failures"] == 3
        assert await tier.read(base, 100) == data[:100]  # other blocks still serve


async def test_rereplication_elsewhere(nbdkit, tmp_path: Path) -> None:
    servers = [nbdkit(), nbdkit(), nbdkit()]
    tier = await make_tier(tmp_path, servers)
    tier.rereplicate_after = 0.3
    async with running(tier):
        stored = await fill_segments(tier, 5)
        servers[0].kill()
        await wait_for(lambda: not target(tier, 0)["up"])
        assert tier.extra_statistics()["degraded_segments"] >= 3
        await wait_for(lambda: tier.extra_statistics()["degraded_segments"] == 0)
        assert tier.extra_statistics()["rereplicated_segments"] >= 3
        assert not (tier.placement[:6] == 0).any()
        servers[1].kill()  # every segment still has its copy on server 2
        await check_all(tier, stored)


async def test_slow_target_is_bounded_by_the_timeout(nbdkit, tmp_path: Path) -> None:
    slow = nbdkit("--filter=delay", "memory", str(CAPACITY), "delay-read=3")
    ok = nbdkit()
    async with running(await make_tier(tmp_path, [slow, ok])) as tier:
        (base, data), = await store(tier, [4096, 4096], seed=1)
        assert tier.placement[0].tolist() == [0, 1]
        t0 = trio.current_time()
        assert await tier.read(base, len(data)) == data  # slow copy times out, then b
        assert trio.current_time() - t0 < tier.timeout + 0.5
        assert target(tier, 0)["errors"] >= 1
