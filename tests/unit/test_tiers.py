"""Memory and file tiers: arena growth within budget, byte round trips, O_DIRECT rules, trim."""

from __future__ import annotations

import errno
import itertools
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import trio

from tierswap.config import Config, parse_config
from tierswap.tiers import tier_class
from tierswap.tiers.base import SEG_SIZE, TierError, shard_capacity
from tierswap.tiers.file import FileTier, prepare_file
from tierswap.tiers.memory import CHUNK, INITIAL, MemoryTier

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
    assert tier_class("memory") is MemoryTier
    assert tier_class("file") is FileTier
    with pytest.raises(KeyError):
        tier_class("tape")


def test_shard_capacity_is_segment_aligned(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, mem="9M", disk="13M", shards=2)
    assert shard_capacity(cfg.tier("ram"), cfg) == 4 * MIB
    assert shard_capacity(cfg.tier("disk"), cfg) == 6 * MIB


# ------------------------------------------------------------------------ memory


async def test_memory_create_reserves_arena(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, mem="4M")
    tier = await MemoryTier.create(cfg.tier("ram"), 0, cfg, 0)
    try:
        assert tier.arena_bytes == 4 * MIB
        assert tier.space.available == tier.space.nseg == 4
        assert tier.space.free_bytes() == 4 * MIB
        assert tier.statistics().available_bytes == 4 * MIB
        assert tier.statistics().extra == {"arena_bytes": 4 * MIB, "grow_failures": 0}
    finally:
        await tier.aclose()


async def test_memory_create_stops_at_initial(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, mem="200M")
    tier = await MemoryTier.create(cfg.tier("ram"), 0, cfg, 0)
    try:
        assert tier.arena_bytes == INITIAL
        assert tier.space.available * SEG_SIZE == INITIAL < tier.space.nseg * SEG_SIZE
    finally:
        await tier.aclose()


async def test_memory_grow_respects_capacity(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, mem="40M")
    tier = MemoryTier(cfg.tier("ram"), 0, 40 * MIB)
    tier.headroom_fn = lambda: None  # no cgroup limit
    tier.host_fn = lambda: 1 << 40
    try:
        assert tier.space.available == 0 and tier.space.free_bytes() == 0
        assert await tier.grow()
        assert tier.arena_bytes == CHUNK and tier.space.available == CHUNK // SEG_SIZE
        assert await tier.grow()  # the last 8 MiB: a short chunk
        assert tier.arena_bytes == 40 * MIB and tier.space.available == 40
        assert not await tier.grow()  # at capacity
        assert tier.arena_bytes == 40 * MIB
        assert tier.space.statistics().capacity_bytes == 40 * MIB
    finally:
        await tier.aclose()


@pytest.mark.parametrize("which", ["cgroup", "host"])
async def test_memory_grow_refused_without_headroom(tmp_path: Path, which: str) -> None:
    cfg = make_config(tmp_path, mem="64M")
    tier = MemoryTier(cfg.tier("ram"), 0, 64 * MIB)
    tier.headroom_fn = (lambda: 0) if which == "cgroup" else (lambda: None)
    tier.host_fn = (lambda: 1 << 40) if which == "cgroup" else (lambda: CHUNK)
    try:
        assert not await tier.grow()
        assert tier.arena_bytes == 0 and tier.space.available == 0
        assert tier.space.allocate(np.array([100], np.uint16)) == []
        # just enough room for a chunk plus the reserve: allowed again
        tier.headroom_fn = lambda: 128 * MIB
        tier.host_fn = lambda: 128 * MIB
        assert await tier.grow()
        assert tier.arena_bytes == CHUNK
    finally:
        await tier.aclose()


async def test_memory_create_with_refused_headroom(tmp_path: Path, monkeypatch) -> None:
    import tierswap.tiers.memory as mem

    monkeypatch.setattr(mem, "cgroup_headroom", lambda: 0)
    cfg = make_config(tmp_path, mem="8M")
    tier = await MemoryTier.create(cfg.tier("ram"), 0, cfg, 0)
    try:
        assert tier.arena_bytes == 0 and tier.space.free_bytes() == 0
    finally:
        await tier.aclose()


async def test_memory_round_trip(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, mem="4M")
    tier = await MemoryTier.create(cfg.tier("ram"), 0, cfg, 0)
    try:
        sizes = np.array([4096, 1000, 3, 4096] * 300, np.uint16)  # spans several segments
        pieces = tier.space.allocate(sizes)
        assert len(pieces) > 1 and pieces[-1].b == len(sizes)
        data = {p.base: blob(p.nbytes, p.base) for p in pieces}
        for base, b in data.items():
            assert tier.write_nowait(base, b)
        for base, b in data.items():
            assert tier.read_nowait(base, len(b)) == b
            assert await tier.read(base, len(b)) == b
        # the async write is the same store
        await tier.write(pieces[0].base + 10, b"hello")
        assert tier.read_nowait(pieces[0].base + 8, 9)[2:7] == b"hello"
        assert not tier.can_trim
    finally:
        await tier.aclose()


async def test_memory_grower(tmp_path: Path, autojump_clock) -> None:
    cfg = make_config(tmp_path, mem="112M")
    tier = await MemoryTier.create(cfg.tier("ram"), 0, cfg, 0)
    tier.headroom_fn = lambda: None
    tier.host_fn = lambda: 1 << 40
    calls: list[bool] = []
    send, attempts = trio.open_memory_channel[bool](10)
    grow = tier.grow

    async def counting_grow() -> bool:
        ok = await grow()  # maps in a worker thread: wait for the result, not for time
        calls.append(ok)
        send.send_nowait(ok)
        return ok

    tier.grow = counting_grow  # type: ignore[method-assign]
    try:
        assert tier.arena_bytes == INITIAL
        tier.note_allocation()  # 64 MiB free >= 2 chunks: nothing to do
        assert not tier.want_grow.is_set()
        tier.space.allocate(np.full(2 * 256 + 1, 4096, np.uint16))  # 2 MiB + a page
        tier.note_allocation()
        assert tier.want_grow.is_set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tier.run_grower)
            # (no timeouts here: the autojump clock would fire them while a thread maps)
            assert await attempts.receive()
            await trio.sleep(1)  # virtual time: the grower is idle again
            assert calls == [True]  # one chunk brought free room back above two chunks
            assert tier.arena_bytes == INITIAL + CHUNK
            # the next request: only 16 MiB of capacity are left, then the grower stops
            tier.space.allocate(np.full(60 * 256, 4096, np.uint16))
            tier.note_allocation()
            assert await attempts.receive()
            assert not await attempts.receive()
            await trio.sleep(1)
            assert calls == [True, True, False]
            assert tier.arena_bytes == 112 * MIB == tier.space.available * SEG_SIZE
            tier.note_allocation()  # full arena: no more requests
            assert not tier.want_grow.is_set()
            nursery.cancel_scope.cancel()
    finally:
        await tier.aclose()


async def test_memory_grower_refused_backs_off(tmp_path: Path, autojump_clock) -> None:
    cfg = make_config(tmp_path, mem="112M")
    tier = await MemoryTier.create(cfg.tier("ram"), 0, cfg, 0)
    tier.headroom_fn = lambda: 0  # the cgroup has no room
    tries: list[float] = []
    grow = tier.grow

    async def counting_grow() -> bool:
        tries.append(trio.current_time())
        return await grow()

    tier.grow = counting_grow  # type: ignore[method-assign]
    try:
        tier.space.allocate(np.full(40 * 256, 4096, np.uint16))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tier.run_grower)
            t0 = trio.current_time()
            while trio.current_time() < t0 + 1:  # a writer asking again and again
                tier.note_allocation()
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
        assert tier.arena_bytes == INITIAL
        assert 5 <= len(tries) <= 21  # at most ~20 attempts a second
        assert all(b - a >= 0.05 - 1e-9 for a, b in itertools.pairwise(tries))
    finally:
        await tier.aclose()


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
    assert st_.st_size == 8 * MIB
    assert st_.st_blocks * 512 >= 8 * MIB  # preallocated, not sparse
    # an existing file with loose permissions is tightened and resized
    path.chmod(0o644)
    prepare_file(path, 4 * MIB)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 4 * MIB


async def test_file_round_trip(tmp_path: Path) -> None:
    _, tier = await file_tier(tmp_path)
    try:
        assert tier.can_trim and tier.space.align == 4096
        cases = [(0, 4096), (4096, 1), (8192, 5000), (SEG_SIZE, SEG_SIZE), (3 * SEG_SIZE, 777)]
        for base, n in cases:
            await tier.write(base, blob(n, base))
        for base, n in cases:
            assert await tier.read(base, n) == blob(n, base)
        # reads at any byte offset and length inside what was written
        assert await tier.read(8192 + 4001, 999) == blob(5000, 8192)[4001:]
        assert await tier.read(SEG_SIZE + 5, 10) == blob(SEG_SIZE, SEG_SIZE)[5:15]
        # a short write is padded with zeros to the next 4 KiB, never leaving old bytes
        await tier.write(0, b"x" * 10)
        assert await tier.read(0, 4096) == b"x" * 10 + bytes(4086)
        # concurrent I/O through the bounded buffer pool
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(tier.write, 4 * SEG_SIZE + i * 8192, blob(8000, i))
        for i in range(20):
            assert await tier.read(4 * SEG_SIZE + i * 8192, 8000) == blob(8000, i)
        assert len(tier._pool) == 8
    finally:
        await tier.aclose()


async def test_file_rejects_unaligned_and_oversized(tmp_path: Path) -> None:
    _, tier = await file_tier(tmp_path)
    try:
        await tier.write(0, blob(4096))
        for base, n in [(1, 10), (4095, 4096), (2048, 100)]:
            with pytest.raises(TierError) as ei:
                await tier.write(base, blob(n))
            assert ei.value.errno == errno.EINVAL
        with pytest.raises(TierError) as ei:
            await tier.write(0, blob(2 * SEG_SIZE))
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
        assert t1.origin == 8 * MIB and t0.space.nseg == t1.space.nseg == 8
        await t0.write(0, b"zero" * 1024)
        await t1.write(0, b"one!" * 1024)
        assert await t0.read(0, 4) == b"zero" and await t1.read(0, 4) == b"one!"
        path = cfg.tier("disk").path
        assert path is not None
        with open(path, "rb") as f:
            f.seek(8 * MIB)
            assert f.read(4) == b"one!"
    finally:
        await t0.aclose()
        await t1.aclose()


async def test_file_trim_punches_hole(tmp_path: Path) -> None:
    _cfg, tier = await file_tier(tmp_path)
    try:
        await tier.write(SEG_SIZE, blob(SEG_SIZE))
        before = os.fstat(tier.fd).st_blocks
        assert tier.extra_statistics()["file_allocated_bytes"] == before * 512
        await tier.trim(SEG_SIZE, SEG_SIZE)
        after = os.fstat(tier.fd).st_blocks
        assert before - after >= SEG_SIZE // 512
        assert await tier.read(SEG_SIZE, 4096) == bytes(4096)  # a hole reads as zeros
        assert os.fstat(tier.fd).st_size == 8 * MIB  # KEEP_SIZE
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
            await tier.write(0, blob(4096))
        assert ei.value.errno == errno.EBADF
        assert tier.counters.errors == 1
        assert len(tier._pool) == 8  # the buffer came back
        os.close(tier.fd)
    finally:
        tier.fd = fd
        await tier.aclose()
