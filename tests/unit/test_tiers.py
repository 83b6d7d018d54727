"""Memory and file tiers: arena growth within budget (against a real lane), byte round trips,
O_DIRECT rules, trim, errors.

The memory tier's arena is served by the lane (tierswap/native), so its tests build a real
Lane over the tier's kit memfds: growth ends in `lane.populate` and `lane.add_segments`, and
what the tier did is read back from the lane's own statistics.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import stat
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

import tierswap.tiers.memory as memory_mod
from tierswap import _lane
from tierswap.config import Config, parse_config
from tierswap.kit import Kit
from tierswap.lane import map_size_for
from tierswap.tiers import tier_class
from tierswap.tiers.base import SEG_SIZE, TierError, shard_capacity
from tierswap.tiers.file import HEADER, FileTier, prepare_file
from tierswap.tiers.memory import CHUNK, HEADROOM_RESERVE, INITIAL, MemoryTier

MIB = 1 << 20


def make_config(tmp_path: Path, mem: str = "4M", disk: str = "8M", shards: int = 1) -> Config:
    return parse_config(
        f"""
[daemon]
state_dir = "{tmp_path}/state"
run_dir = "{tmp_path}/run"
[device]
size = "{16 * shards}M"
shards = {shards}
[[tier]]
name = "ram"
kind = "memory"
capacity = "{mem}"
[[tier]]
name = "disk"
kind = "file"
path = "{tmp_path}/tiers/disk.tier"
capacity = "{disk}"
""",
        check_fs=False,
    )


def blob(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, np.uint8).tobytes()


def test_tier_classes_by_kind() -> None:
    from tierswap.tiers.remote import RemoteTier

    assert tier_class("file") is FileTier
    assert tier_class("remote") is RemoteTier
    for kind in ("memory", "tape"):  # a memory tier is the lane's arena, not a store
        with pytest.raises(KeyError):
            tier_class(kind)


def test_shard_capacity_is_segment_aligned(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, mem="9M", disk="13M", shards=2)
    assert shard_capacity(cfg.tier("ram"), cfg) == 4 * MIB
    assert shard_capacity(cfg.tier("disk"), cfg) == 6 * MIB


# ------------------------------------------------------------------------ memory


@asynccontextmanager
async def memory_tier(tmp_path: Path, mem: str, *, headroom: int | None = None,
                      host: int = 1 << 40) -> AsyncIterator[tuple[MemoryTier, Any]]:
    """A MemoryTier and a real lane serving its arena (no reader threads are started)."""
    cfg = make_config(tmp_path, mem=mem)
    kit = Kit()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lane = None
    try:
        tier = MemoryTier(cfg.tier("ram"), 0, cfg.tier("ram").capacity, kit)
        tier.headroom_fn = lambda: headroom
        tier.host_fn = lambda: host
        map_fd = kit.memfd("map")
        lane = _lane.Lane(fds=[b.fileno()], size=cfg.size, map_path=f"/proc/self/fd/{map_fd}",
                          map_size=map_size_for(cfg.size), fresh=True,
                          tiers=[tier.lane_spec()])
        tier.lane = lane
        yield tier, lane
    finally:
        if lane is not None:
            lane.close()
        a.close()
        b.close()
        kit.close()


def lane_tier(lane: Any) -> dict[str, int]:
    st: dict[str, int] = lane.statistics()["tiers"][0]
    return st


@asynccontextmanager
async def grower(tier: MemoryTier, wanted: Callable[[], trio.Event] | None = None
                 ) -> AsyncIterator[None]:
    """The tier's grower running (it owns the nursery growths run in); by default nothing
    asks it to grow by itself."""
    idle = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tier.run_grower, wanted or (lambda: idle))
        while tier._nursery is None:  # growths run in the grower's nursery
            await trio.sleep(0)
        yield
        nursery.cancel_scope.cancel()


async def test_memory_prepare_reserves_the_arena(tmp_path: Path) -> None:
    async with memory_tier(tmp_path, "4M") as (tier, lane):
        assert tier.size == 0 and lane_tier(lane)["segments"] == 0
        await tier.prepare()
        assert tier.size == 4 * MIB and os.fstat(tier.fd).st_size == 4 * MIB
        assert os.fstat(tier.fd).st_blocks * 512 >= 4 * MIB  # allocated, not sparse
        st = lane_tier(lane)
        assert st["segments"] == st["capacity_segments"] == 4
        assert st["free_bytes"] == 4 * MIB
        assert tier.extra_statistics() == {"arena_bytes": 4 * MIB, "grow_failures": 0,
                                           "growths": 1}


async def test_memory_prepare_stops_at_initial(tmp_path: Path) -> None:
    async with memory_tier(tmp_path, "200M") as (tier, lane):
        await tier.prepare()
        assert tier.size == INITIAL
        st = lane_tier(lane)
        assert st["segments"] * SEG_SIZE == INITIAL < st["capacity_segments"] * SEG_SIZE


async def test_memory_prepare_without_headroom_reserves_nothing(tmp_path: Path) -> None:
    async with memory_tier(tmp_path, "8M", headroom=0) as (tier, lane):
        await tier.prepare()
        assert tier.size == 0 and lane_tier(lane)["free_bytes"] == 0


async def test_memory_growth_respects_capacity(tmp_path: Path) -> None:
    async with memory_tier(tmp_path, "40M") as (tier, lane), grower(tier):
        assert lane_tier(lane)["free_bytes"] == 0
        await tier.request_growth().wait()
        assert tier.size == CHUNK and lane_tier(lane)["segments"] == CHUNK // SEG_SIZE
        await tier.request_growth().wait()  # the last 8 MiB: a short chunk
        assert tier.size == 40 * MIB and lane_tier(lane)["segments"] == 40
        ev = tier.request_growth()  # at capacity: refused at once
        assert ev.is_set() and tier.size == 40 * MIB
        assert os.fstat(tier.fd).st_size == 40 * MIB
        assert lane_tier(lane)["capacity_segments"] == 40 and tier.growths == 2


@pytest.mark.parametrize("which", ["cgroup", "host"])
async def test_memory_growth_refused_without_headroom(tmp_path: Path, which: str) -> None:
    kw: dict[str, Any] = {"headroom": 0} if which == "cgroup" else {"host": CHUNK}
    async with memory_tier(tmp_path, "64M", **kw) as (tier, lane), grower(tier):
        ev = tier.request_growth()
        assert ev.is_set()  # nothing to wait for
        assert tier.size == 0 and lane_tier(lane)["segments"] == 0
        assert tier.grow_failures == 0  # a refusal is not a failure
        # just enough room for a chunk plus the reserve: allowed again
        tier.headroom_fn = lambda: CHUNK + HEADROOM_RESERVE
        tier.host_fn = lambda: CHUNK + HEADROOM_RESERVE
        await tier.request_growth().wait()
        assert tier.size == CHUNK and lane_tier(lane)["segments"] == CHUNK // SEG_SIZE


async def test_memory_growth_failure_gives_back_what_it_took(tmp_path: Path) -> None:
    async with memory_tier(tmp_path, "64M") as (tier, lane), grower(tier):
        real = tier.extend_fn

        def failing(old: int, chunk: int) -> None:
            os.ftruncate(tier.fd, old + chunk)  # half done, then the allocation fails
            raise OSError(errno.ENOMEM, "no memory")

        tier.extend_fn = failing
        await tier.request_growth().wait()
        assert (tier.size, tier.grow_failures, tier.growths) == (0, 1, 0)
        assert os.fstat(tier.fd).st_size == 0 and lane_tier(lane)["segments"] == 0
        tier.extend_fn = real
        await tier.request_growth().wait()
        assert tier.size == CHUNK and lane_tier(lane)["segments"] == CHUNK // SEG_SIZE


async def test_memory_growth_is_single_flight(tmp_path: Path, monkeypatch) -> None:
    """One growth at a time, shared by every caller; a write waits at most GROW_WAIT for it
    and the growth still finishes (its worker thread cannot be cancelled)."""
    monkeypatch.setattr(memory_mod, "GROW_WAIT", 0.2)
    async with memory_tier(tmp_path, "96M") as (tier, lane), grower(tier):
        gate, calls = threading.Event(), []
        real = tier.extend_fn

        def slow(old: int, chunk: int) -> None:
            calls.append(old)
            gate.wait(10)
            real(old, chunk)

        tier.extend_fn = slow
        ev = tier.request_growth()
        assert tier.request_growth() is ev and not ev.is_set()
        t0 = trio.current_time()
        async with trio.open_nursery() as n:  # three writers found every tier full
            for _ in range(3):
                n.start_soon(tier.grow_for_write)
        assert 0.2 <= trio.current_time() - t0 < 1.0  # they gave up after GROW_WAIT
        assert tier.request_growth() is ev and tier.size == 0
        gate.set()
        await ev.wait()
        assert calls == [0] and tier.size == CHUNK and tier.growths == 1
        assert lane_tier(lane)["segments"] == CHUNK // SEG_SIZE
        nxt = tier.request_growth()  # the next one is a new growth
        assert nxt is not ev
        await nxt.wait()
        assert calls == [0, CHUNK] and tier.size == 2 * CHUNK


async def test_memory_grower_follows_the_lane(tmp_path: Path, monkeypatch) -> None:
    """The whole loop: writes use up room, the lane asks trio to grow, the grower grows
    until two chunks are free again, and stops at the capacity."""
    from tests.lane.harness import open_lane

    monkeypatch.setattr(memory_mod, "cgroup_headroom", lambda: None)
    monkeypatch.setattr(memory_mod, "host_available", lambda: 1 << 40)
    async with open_lane(size=128 << 20, mem="112M", disk=None, tmp=tmp_path) as rig:
        tier = rig.svc.tiers[0]
        assert isinstance(tier, MemoryTier)
        assert tier.size == INITIAL and tier.growths == INITIAL // CHUNK  # prepare()

        async def grown_to(size: int) -> None:
            with trio.fail_after(10):
                while tier.size < size:
                    await trio.sleep(0.01)

        data = os.urandom(2 * MIB + 4096)  # free room now below two chunks
        await rig.client.write_all(0, data)
        await grown_to(INITIAL + CHUNK)
        await trio.sleep(0.2)
        assert tier.size == INITIAL + CHUNK  # one chunk brought it back above two chunks
        await rig.client.write_all(8 * MIB, os.urandom(60 * MIB))
        await grown_to(112 * MIB)  # the rest of the capacity: a short chunk, then it stops
        st = lane_tier(rig.svc.lane)
        assert st["segments"] == st["capacity_segments"] == 112
        assert tier.growths == INITIAL // CHUNK + 2 and tier.grow_failures == 0
        asked = st["grow_requests"]
        await rig.client.write_all(80 * MIB, os.urandom(8 * MIB))
        assert lane_tier(rig.svc.lane)["grow_requests"] == asked  # full arena: no more asks
        assert await rig.client.read_all(0, len(data)) == data


async def test_memory_grower_backs_off_when_refused(tmp_path: Path, autojump_clock) -> None:
    async with memory_tier(tmp_path, "112M", headroom=0) as (tier, _lane):
        tries: list[float] = []

        def counting() -> int:
            tries.append(trio.current_time())
            return 0

        tier.headroom_fn = counting
        always = trio.Event()
        always.set()  # a writer asking again and again
        async with grower(tier, lambda: always):
            await trio.sleep(1)
        assert tier.size == 0
        assert 5 <= len(tries) <= 21  # at most ~20 attempts a second
        assert all(b - a >= 0.05 - 1e-9 for a, b in itertools.pairwise(tries))


# ------------------------------------------------------------------------ file


async def file_tier(tmp_path: Path, shard: int = 0, shards: int = 1) -> tuple[Config, FileTier]:
    cfg = make_config(tmp_path, disk=f"{8 * shards}M", shards=shards)
    tcfg = cfg.tier("disk")
    assert tcfg.path is not None
    if not tcfg.path.exists():
        prepare_file(tcfg.path, tcfg.capacity)
    tier = await FileTier.create(tcfg, 1, cfg, shard)
    return cfg, tier


def test_prepare_file_mode_and_size(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "disk.tier"
    prepare_file(path, 8 * MIB)
    st_ = path.stat()
    assert stat.S_IMODE(st_.st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert st_.st_size == HEADER + 8 * MIB
    assert st_.st_blocks * 512 >= HEADER + 8 * MIB  # preallocated, not sparse
    # an existing file with loose permissions is tightened and resized
    path.chmod(0o644)
    prepare_file(path, 4 * MIB)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == HEADER + 4 * MIB


async def test_file_round_trip(tmp_path: Path) -> None:
    _, tier = await file_tier(tmp_path)
    try:
        assert tier.can_trim and tier.align == 4096 and tier.nseg == 8
        cases = [(0, 4096), (4096, 1), (8192, 5000), (SEG_SIZE, SEG_SIZE), (3 * SEG_SIZE, 777)]
        for base, n in cases:
            await tier.write(base, blob(n, base), 1)
        for base, n in cases:
            assert await tier.read(base, n) == blob(n, base)
        # reads at any byte offset and length inside what was written
        assert await tier.read(8192 + 4001, 999) == blob(5000, 8192)[4001:]
        assert await tier.read(SEG_SIZE + 5, 10) == blob(SEG_SIZE, SEG_SIZE)[5:15]
        # a short write is padded with zeros to the next 4 KiB, never leaving old bytes
        await tier.write(0, b"x" * 10, 1)
        assert await tier.read(0, 4096) == b"x" * 10 + bytes(4086)
        # concurrent I/O through the bounded buffer pool
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(tier.write, 4 * SEG_SIZE + i * 8192, blob(8000, i), 1)
        for i in range(20):
            assert await tier.read(4 * SEG_SIZE + i * 8192, 8000) == blob(8000, i)
        assert len(tier._pool) == 8
    finally:
        await tier.aclose()


async def test_file_rejects_unaligned_and_oversized(tmp_path: Path) -> None:
    _, tier = await file_tier(tmp_path)
    try:
        await tier.write(0, blob(4096), 1)
        for base, n in [(1, 10), (4095, 4096), (2048, 100)]:
            with pytest.raises(TierError) as ei:
                await tier.write(base, blob(n), 1)
            assert ei.value.errno == errno.EINVAL
        with pytest.raises(TierError) as ei:
            await tier.write(0, blob(2 * SEG_SIZE), 1)
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(TierError) as ei:
            await tier.read(0, 2 * SEG_SIZE)
        assert ei.value.errno == errno.EINVAL
        assert await tier.read(0, 4096) == blob(4096)  # nothing was overwritten
    finally:
        await tier.aclose()


async def test_file_shards_own_their_share(tmp_path: Path) -> None:
    cfg, t0 = await file_tier(tmp_path, 0, shards=2)
    _, t1 = await file_tier(tmp_path, 1, shards=2)
    try:
        assert t1.origin == HEADER + 8 * MIB and t0.nseg == t1.nseg == 8
        await t0.write(0, b"zero" * 1024, 1)
        await t1.write(0, b"one!" * 1024, 1)
        assert await t0.read(0, 4) == b"zero" and await t1.read(0, 4) == b"one!"
        path = cfg.tier("disk").path
        assert path is not None
        with open(path, "rb") as f:
            f.seek(HEADER + 8 * MIB)
            assert f.read(4) == b"one!"
    finally:
        await t0.aclose()
        await t1.aclose()


async def test_file_trim_punches_hole(tmp_path: Path) -> None:
    _cfg, tier = await file_tier(tmp_path)
    try:
        await tier.write(SEG_SIZE, blob(SEG_SIZE), 1)
        before = os.fstat(tier.fd).st_blocks
        assert tier.extra_statistics()["file_allocated_bytes"] == before * 512
        await tier.trim(SEG_SIZE, SEG_SIZE)
        after = os.fstat(tier.fd).st_blocks
        assert before - after >= SEG_SIZE // 512
        assert await tier.read(SEG_SIZE, 4096) == bytes(4096)  # a hole reads as zeros
        assert os.fstat(tier.fd).st_size == HEADER + 8 * MIB  # KEEP_SIZE
    finally:
        await tier.aclose()
    assert tier.fd == -1


async def test_file_create_errors(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, disk="8M")
    tcfg = cfg.tier("disk")
    assert tcfg.path is not None
    with pytest.raises(TierError) as ei:
        await FileTier.create(tcfg, 1, cfg, 0)  # not prepared
    assert ei.value.errno == errno.ENOENT and "disk" in str(ei.value)
    prepare_file(tcfg.path, 4 * MIB)  # smaller than configured
    with pytest.raises(TierError) as ei:
        await FileTier.create(tcfg, 1, cfg, 0)
    assert ei.value.errno == errno.ENOSPC


async def test_file_io_error_counted(tmp_path: Path) -> None:
    _, tier = await file_tier(tmp_path)
    fd = tier.fd
    try:
        tier.fd = os.open(os.devnull, os.O_RDONLY)  # every pwrite now fails with EBADF
        with pytest.raises(TierError) as ei:
            await tier.write(0, blob(4096), 1)
        assert ei.value.errno == errno.EBADF
        assert tier.errors == 1
        assert len(tier._pool) == 8  # the buffer came back
        os.close(tier.fd)
    finally:
        tier.fd = fd
        await tier.aclose()
