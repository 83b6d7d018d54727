"""The FUSE operations against a plain bytearray model of the device.

`SwapFS` is driven directly (its handlers are plain async methods; nothing is mounted) over a
device from `open_device` with a tiny memory tier and a file tier, so pages spill from one to
the other. Every operation is checked against the model and against the bookkeeping the
device keeps (pages per tier, live bytes per segment space, the run map).
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import stat
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyfuse3
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tierswap.tiers.memory as memory_mod
from tierswap.config import Config, parse_config
from tierswap.device import GROW_WAIT, VirtualSwapDevice, open_device
from tierswap.fs import FILE_INODE, FILE_NAME, SwapFS
from tierswap.slotmap import ZERO_TIER
from tierswap.tiers.file import prepare_file
from tierswap.tiers.memory import MemoryTier
from tierswap.workload import expected_pages

PAGE = 4096
MIB = 1 << 20
PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE

# the model test's device: 8 MiB virtual over a 4 MiB memory tier and a 16 MiB file tier
NPAGES = 2048
SIZE = NPAGES * PAGE
PREFILL = range(1028, 2048)  # incompressible pages that take ~all of the memory tier


def make_config(
    tmp: Path, *, size: int = SIZE, mem: str | None = "4M", disk: str | None = "16M"
) -> Config:
    text = f"""
[daemon]
state_dir = "{tmp}/state"
run_dir = "{tmp}/run"
[device]
size = {size}
"""
    if mem is not None:
        text += f"""
[[tier]]
name = "ram"
kind = "memory"
capacity = "{mem}"
"""
    if disk is not None:
        text += f"""
[[tier]]
name = "disk"
kind = "file"
path = "{tmp}/disk.tier"
capacity = "{disk}"
"""
    cfg = parse_config(text, check_fs=False)
    for t in cfg.tiers:
        if t.kind == "file":
            assert t.path is not None
            prepare_file(t.path, t.capacity)
    return cfg


@dataclass
class Swap:
    dev: VirtualSwapDevice
    fs: SwapFS
    fh: int


@asynccontextmanager
async def open_swap(tmp: Path, **kw) -> AsyncIterator[Swap]:
    dev = await open_device(make_config(tmp, **kw), 0)
    try:
        fs = SwapFS(dev)
        fi = await fs.open(FILE_INODE, os.O_RDWR, None)
        assert fi.direct_io
        yield Swap(dev, fs, fi.fh)
    finally:
        for t in dev.tiers:
            await t.aclose()
        dev.map.close()


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def content(kind: str, seed: int, off: int, length: int) -> bytes:
    if kind == "zero":
        return bytes(length)
    if kind == "random":
        return random_bytes(length, seed)
    # realistic pages (zero, text, structs, runs, random) laid on the page grid
    first, last = off // PAGE, -(-(off + length) // PAGE)
    pages = expected_pages(seed, np.arange(first, last)).tobytes()
    skip = off - first * PAGE
    return pages[skip : skip + length]


def check_invariants(dev: VirtualSwapDevice) -> None:
    runs = list(dev.map.iter_runs())
    for r1, r2 in itertools.pairwise(runs):
        assert r1.end <= r2.start, "runs overlap"
    assert not runs or (runs[0].start >= 0 and runs[-1].end <= dev.npages)
    st_ = dev.statistics()
    held = sum(r.npages for r in runs)
    assert st_.stored_pages + st_.zero_pages == held
    assert st_.runs == len(runs)
    assert dev.zero_pages == sum(r.npages for r in runs if r.tier == ZERO_TIER)
    for t in dev.tiers:
        mine = [r for r in runs if r.tier == t.index]
        assert t.pages == sum(int(np.count_nonzero(r.lens)) for r in mine)
        assert t.zero_pages == sum(r.npages - int(np.count_nonzero(r.lens)) for r in mine)
        assert t.space.live_total == sum(r.nbytes for r in mine), f"{t.name}: live bytes leak"
        assert int(t.space.live.sum()) == t.space.live_total
        free = t.space.free
        assert len(free) == len(set(free)), f"{t.name}: a segment is twice on the free list"
        assert all(t.space.live[s] == 0 and s != t.space.open_seg for s in free)
        capacity = t.space.nseg * t.space.seg_size
        assert t.space.live_total <= capacity
        if isinstance(t, MemoryTier):
            assert t.arena_bytes <= capacity
        for r in mine:  # every stored run lies inside one segment of its tier
            if r.nbytes:
                seg = r.base >> t.space.seg_shift
                assert seg < t.space.available
                assert (r.base + r.nbytes - 1) >> t.space.seg_shift == seg
    assert st_.stored_bytes == sum(t.space.live_total for t in dev.tiers)


def assert_all_space_returned(dev: VirtualSwapDevice) -> None:
    st_ = dev.statistics()
    assert (st_.stored_pages, st_.zero_pages, st_.runs, st_.stored_bytes) == (0, 0, 0, 0)
    for t in dev.tiers:
        assert t.space.live_total == 0 and t.pages == 0 and t.zero_pages == 0
        assert not t.space.live.any()
        # every segment is free again, except the one still open for appends
        open_ = 0 if t.space.open_seg is None else 1
        assert len(t.space.free) + open_ + len(t.space._pending) == t.space.available


class Runner:
    """Applies operations to the file system and to the model, checking both agree."""

    def __init__(self, swap: Swap) -> None:
        self.s = swap
        self.size = swap.dev.size
        self.model = bytearray(self.size)
        self.enospc = 0

    async def read_model_check(self, off: int, length: int) -> None:
        got = await self.s.fs.read(self.s.fh, off, length)
        want = bytes(self.model[off : off + length]) if off < self.size else b""
        assert len(got) == len(want), (off, length)
        if got != want:
            bad = next(i for i in range(len(got)) if got[i] != want[i])
            raise AssertionError(f"read {off}+{length}: first wrong byte at {off + bad}")

    async def check_around(self, off: int, length: int) -> None:
        a = max(0, off - off % PAGE - PAGE)
        b = min(self.size, off + length + 2 * PAGE)
        await self.read_model_check(a, b - a)

    async def write(self, off: int, data: bytes) -> None:
        try:
            n = await self.s.fs.write(self.s.fh, off, data)
        except pyfuse3.FUSEError as e:
            assert e.errno == errno.ENOSPC, e
            self.enospc += 1  # the old content must still be there
        else:
            assert n == len(data)
            self.model[off : off + len(data)] = data
        await self.check_around(off, len(data))

    async def discard(self, off: int, length: int) -> None:
        end = off + length
        try:
            await self.s.fs.fallocate(self.s.fh, PUNCH, off, length)
        except pyfuse3.FUSEError as e:
            # Partial edge pages are zero-filled by writes, which can run out of room. Each
            # part must then hold either the old bytes or zeros, never anything else.
            assert e.errno == errno.ENOSPC, e
            self.enospc += 1
            got = await self.s.fs.read(self.s.fh, off, length)
            a, b = -(-off // PAGE) * PAGE, end // PAGE * PAGE
            parts = [(off, end)] if a >= b else [(off, a), (a, b), (b, end)]
            for p, q in parts:
                have, old = got[p - off : q - off], bytes(self.model[p:q])
                assert have in (old, bytes(q - p)), f"discard left garbage in {p}..{q}"
                if (p, q) == (a, b):
                    assert have == old, "whole pages dropped although the discard failed"
            self.model[off:end] = got
        else:
            self.model[off:end] = bytes(length)
        await self.check_around(off, length)

    async def read(self, off: int, length: int) -> None:
        await self.read_model_check(off, length)

    async def apply(self, op: tuple) -> None:
        kind = op[0]
        if kind == "write":
            _, off, length, ckind, seed = op
            await self.write(off, content(ckind, seed, off, length))
        elif kind == "discard":
            await self.discard(op[1], op[2])
        else:
            await self.read(op[1], op[2])
        check_invariants(self.s.dev)

    async def finish(self) -> None:
        for off in range(0, self.size, MIB):
            await self.read_model_check(off, MIB)
        await self.s.fs.fallocate(self.s.fh, PUNCH, 0, self.size)
        self.model[:] = bytes(self.size)
        check_invariants(self.s.dev)
        assert_all_space_returned(self.s.dev)
        assert await self.s.fs.read(self.s.fh, 0, self.size) == bytes(self.size)


async def prefill(r: Runner) -> None:
    off = PREFILL.start * PAGE
    await r.write(off, random_bytes(len(PREFILL) * PAGE, 99))
    mem = r.s.dev.tiers[0]
    assert mem.pages == len(PREFILL) and mem.space.free_bytes() < 64 * PAGE


# ------------------------------------------------------------------------ the model test

HOT = st.integers(990, 1100)  # around the edge of the prefilled region: ops overlap there
page_no = st.one_of(st.integers(0, NPAGES - 1), HOT)
offset = st.one_of(
    page_no.map(lambda p: p * PAGE),
    st.tuples(page_no, st.sampled_from([1, 100, 2048, 4095])).map(lambda t: t[0] * PAGE + t[1]),
    st.integers(0, SIZE - 1),
)
write_len = st.one_of(
    st.integers(1, 64).map(lambda n: n * PAGE),
    st.integers(1, 64 * PAGE),
    st.sampled_from([1, 4095, 4097]),
)
write_op = st.builds(
    lambda off, n, kind, seed: ("write", off, min(n, SIZE - off), kind, seed),
    offset, write_len, st.sampled_from(["workload", "workload", "random", "zero"]),
    st.integers(0, 1000),
)
discard_op = st.builds(
    lambda off, n: ("discard", off, min(n, SIZE - off)),
    offset,
    st.one_of(st.integers(1, 300).map(lambda n: n * PAGE), st.integers(0, 300 * PAGE)),
)
read_op = st.builds(
    lambda off, n: ("read", off, n),
    st.one_of(offset, st.integers(SIZE - 3 * PAGE, SIZE + 2 * PAGE)),
    st.integers(0, 70 * PAGE),
)
operation = st.one_of(write_op, write_op, discard_op, read_op)


async def run_ops(tmp: Path, ops: list[tuple]) -> Runner:
    async with open_swap(tmp) as swap:
        r = Runner(swap)
        await prefill(r)
        for op in ops:
            await r.apply(op)
        # sized so that no write can run out of room: 40 ops x 66 pages < the 16M file tier
        assert r.enospc == 0
        await r.finish()
        return r


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=st.lists(operation, min_size=1, max_size=40))
def test_operations_against_model(ops: list[tuple]) -> None:
    with tempfile.TemporaryDirectory(prefix="tierswap-ops-") as d:
        trio.run(run_ops, Path(d), ops)


def random_op(rng: random.Random, hot: tuple[int, int]) -> tuple:
    p = rng.randrange(*hot) if rng.random() < 0.7 else rng.randrange(NPAGES)
    off = p * PAGE + (rng.choice([0, 1, 2048, 4095]) if rng.random() < 0.3 else 0)
    x = rng.random()
    if x < 0.5:
        n = rng.randrange(1, 65) * PAGE if rng.random() < 0.7 else rng.randrange(1, 64 * PAGE)
        kind = rng.choice(["workload", "workload", "random", "zero"])
        return ("write", off, min(n, SIZE - off), kind, rng.randrange(1000))
    if x < 0.75:
        return ("read", off, rng.randrange(70 * PAGE))
    n = rng.randrange(1, 300) * PAGE if rng.random() < 0.7 else rng.randrange(300 * PAGE)
    return ("discard", off, min(n, SIZE - off))


@pytest.mark.parametrize("seed", [1, 2])
async def test_long_random_sequence(tmp_path: Path, seed: int) -> None:
    """Hundreds of operations: segments fill, empty and get reused in both tiers."""
    rng = random.Random(seed)
    async with open_swap(tmp_path) as swap:
        r = Runner(swap)
        await prefill(r)
        mem, disk = swap.dev.tiers
        for i in range(500):
            hot = (900, 1300) if i < 250 else (0, 400)
            await r.apply(random_op(rng, hot))
        assert disk.counters.pages_in > 0 and mem.counters.pages_out > 0
        assert disk.counters.pages_out > 0  # pages were read back from the spill tier
        # memory segments were freed and filled again: more went in than it can hold
        assert mem.counters.pages_in > mem.space.nseg * mem.space.seg_size // PAGE
        await r.finish()


async def test_spill_and_read_back(tmp_path: Path) -> None:
    async with open_swap(tmp_path) as swap:
        r = Runner(swap)
        data = random_bytes(1500 * PAGE, 5)  # more than the memory tier holds, raw
        await r.write(0, data)
        mem, disk = swap.dev.tiers
        assert mem.pages == 1024 and disk.pages == 476  # memory full first, the rest spilled
        assert mem.space.live_total == 4 * MIB
        check_invariants(swap.dev)
        # one read spanning both tiers, unaligned at both ends
        await r.read(1000 * PAGE + 123, 100 * PAGE)
        # overwrite a stretch of spilled pages in the middle of their run, partly unaligned
        await r.write(1200 * PAGE + 7, content("workload", 3, 1200 * PAGE + 7, 50 * PAGE))
        check_invariants(swap.dev)
        await r.finish()


# ------------------------------------------------------------------------ edges and errors


async def test_io_past_the_end_is_einval(tmp_path: Path) -> None:
    async with open_swap(tmp_path, size=64 * PAGE, disk=None) as swap:
        fs, fh, size = swap.fs, swap.fh, swap.dev.size
        r = Runner(swap)
        await r.write(size - 2 * PAGE, random_bytes(2 * PAGE, 1))
        cases = [
            (fs.write, (fh, size - 10, b"x" * 20)),
            (fs.write, (fh, size, b"x")),
            (fs.write, (fh, size + PAGE, b"x" * PAGE)),
            (fs.write, (fh, -1, b"x")),
            (fs.fallocate, (fh, PUNCH, size - PAGE, 2 * PAGE)),
            (fs.fallocate, (fh, PUNCH, size, 1)),
            (fs.fallocate, (fh, PUNCH, -PAGE, PAGE)),
            (fs.read, (fh, -1, 10)),
        ]
        for fn, args in cases:
            with pytest.raises(pyfuse3.FUSEError) as ei:
                await fn(*args)
            assert ei.value.errno == errno.EINVAL, (fn.__name__, args[1:])
        # nothing inside the device was touched by the refused requests
        await r.read(0, size)
        assert await fs.write(fh, size, b"") == 0  # an empty write at the end is fine


async def test_read_at_and_after_eof(tmp_path: Path) -> None:
    async with open_swap(tmp_path, size=64 * PAGE, disk=None) as swap:
        fs, fh, size = swap.fs, swap.fh, swap.dev.size
        tail = random_bytes(PAGE, 3)
        await fs.write(fh, size - PAGE, tail)
        assert await fs.read(fh, size, 10) == b""
        assert await fs.read(fh, size + 123457, PAGE) == b""
        assert await fs.read(fh, size - 10, 100) == tail[-10:]  # short read up to EOF
        assert await fs.read(fh, size - PAGE, 1 << 20) == tail
        assert await fs.read(fh, 0, 0) == b""
        assert await fs.read(fh, 5, 3) == bytes(3)  # never written: zeros


async def test_unsupported_fallocate_modes(tmp_path: Path) -> None:
    async with open_swap(tmp_path, size=64 * PAGE, disk=None) as swap:
        fs, fh, size = swap.fs, swap.fh, swap.dev.size
        r = Runner(swap)
        await r.write(0, random_bytes(8 * PAGE, 2))
        keep_size, punch_only, collapse, zero_range, insert = 0x01, 0x02, 0x08, 0x10, 0x20
        for mode in (keep_size, punch_only, collapse, zero_range, insert, zero_range | keep_size):
            with pytest.raises(pyfuse3.FUSEError) as ei:
                await fs.fallocate(fh, mode, 0, 4 * PAGE)
            assert ei.value.errno == errno.EOPNOTSUPP, hex(mode)
        # plain allocation inside the fixed size is a no-op, beyond it is EFBIG
        assert await fs.fallocate(fh, 0, 0, size) is None
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await fs.fallocate(fh, 0, size - PAGE, 2 * PAGE)
        assert ei.value.errno == errno.EFBIG
        await r.read(0, size)  # nothing was discarded or changed
        assert swap.dev.discards == 0


def setattr_fields(**kw: bool) -> SimpleNamespace:
    names = ("update_size", "update_mode", "update_uid", "update_gid", "update_atime",
             "update_mtime", "update_ctime")
    return SimpleNamespace(**{n: kw.get(n, False) for n in names})


async def test_setattr_and_attributes(tmp_path: Path) -> None:
    async with open_swap(tmp_path, size=64 * PAGE, disk=None) as swap:
        fs, size = swap.fs, swap.dev.size
        for new in (0, size - PAGE, size + PAGE):
            attr = pyfuse3.EntryAttributes()
            attr.st_size = new
            with pytest.raises(pyfuse3.FUSEError) as ei:
                await fs.setattr(FILE_INODE, attr, setattr_fields(update_size=True), None, None)
            assert ei.value.errno == errno.EPERM
        attr = pyfuse3.EntryAttributes()
        attr.st_size = size
        got = await fs.setattr(FILE_INODE, attr, setattr_fields(update_size=True), None, None)
        assert got.st_size == size
        got = await fs.setattr(FILE_INODE, attr, setattr_fields(update_mtime=True), None, None)
        assert got.st_size == size
        attr.st_mode = stat.S_IFREG | 0o666
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await fs.setattr(FILE_INODE, attr, setattr_fields(update_mode=True), None, None)
        assert ei.value.errno == errno.EPERM

        a = await fs.getattr(FILE_INODE)
        assert a.st_size == size and stat.S_ISREG(a.st_mode) and stat.S_IMODE(a.st_mode) == 0o600
        assert a.st_blocks == 0
        await fs.write(swap.fh, 0, random_bytes(4 * PAGE, 1))
        assert (await fs.getattr(FILE_INODE)).st_blocks == 4 * PAGE // 512
        assert stat.S_ISDIR((await fs.getattr(pyfuse3.ROOT_INODE)).st_mode)
        assert (await fs.lookup(pyfuse3.ROOT_INODE, FILE_NAME)).st_ino == FILE_INODE
        for bad in ((pyfuse3.ROOT_INODE, b"other"), (FILE_INODE, FILE_NAME)):
            with pytest.raises(pyfuse3.FUSEError) as ei:
                await fs.lookup(*bad)
            assert ei.value.errno == errno.ENOENT
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await fs.open(FILE_INODE, os.O_RDWR | os.O_TRUNC, None)
        assert ei.value.errno == errno.EPERM
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await fs.open(pyfuse3.ROOT_INODE, os.O_RDONLY, None)
        assert ei.value.errno == errno.EISDIR
        sv = await fs.statfs(None)
        assert sv.f_blocks == 64 and sv.f_bfree == 60


# ------------------------------------------------------------------------ running out of room


async def test_enospc_keeps_data_and_recovers(tmp_path: Path, autojump_clock) -> None:
    """Tiny tiers, incompressible pages: fill up, fail cleanly, keep serving, recover."""
    async with open_swap(tmp_path, size=4096 * PAGE, mem="4M", disk="4M") as swap:
        r = Runner(swap)
        dev, fs, fh = swap.dev, swap.fs, swap.fh
        mem, disk = dev.tiers
        # 60-page writes: 2048 pages of room, so the 35th write finds only 8 pages left
        chunk = 60
        i = 0
        t0 = trio.current_time()
        while True:
            data = random_bytes(chunk * PAGE, i)
            try:
                await fs.write(fh, i * chunk * PAGE, data)
            except pyfuse3.FUSEError as e:
                assert e.errno == errno.ENOSPC
                break
            r.model[i * chunk * PAGE : (i + 1) * chunk * PAGE] = data
            i += 1
        assert i == 34 and mem.pages + disk.pages == 34 * chunk
        # the failed write was rolled back: no space leaked, nothing half-published
        check_invariants(dev)
        assert mem.pages == 1024 and disk.pages == 34 * chunk - 1024
        assert dev.enospc == 1 and dev.write_errors == 1
        assert trio.current_time() - t0 < GROW_WAIT  # nothing can grow: no waiting either
        await r.read(0, dev.size)

        # every tier full: overwrites fail too and leave the old content readable
        before = dev.statistics()
        await r.write(10 * PAGE, random_bytes(PAGE, 500))  # aligned
        await r.write(100 * PAGE + 5, random_bytes(3 * PAGE, 501))  # unaligned: RMW
        await r.write(2030 * PAGE, random_bytes(30 * PAGE, 502))  # half stored, half empty
        assert r.enospc == 3 and dev.enospc == 4
        after = dev.statistics()
        assert after.stored_pages == before.stored_pages
        assert after.stored_bytes == before.stored_bytes
        check_invariants(dev)
        await r.read(0, dev.size)

        # zero pages need no room: writing them succeeds even now and frees space
        await r.write(200 * PAGE, bytes(4 * PAGE))
        assert r.enospc == 3
        assert dev.statistics().stored_pages == before.stored_pages - 4

        # discard the first 512 pages (memory segments 0 and 1): writes are accepted again
        await r.discard(0, 512 * PAGE)
        assert mem.space.free_bytes() == 2 * MIB
        for k in range(4):
            await r.write((3000 + 64 * k) * PAGE, random_bytes(64 * PAGE, 600 + k))
        assert r.enospc == 3
        assert mem.pages == 1024 - 512 + 256
        check_invariants(dev)
        await r.finish()


async def test_write_waits_for_memory_growth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock
) -> None:
    """Nothing has room but the memory tier may grow: the write grows it instead of failing."""
    monkeypatch.setattr(memory_mod, "cgroup_headroom", lambda: 0)  # no arena at start
    async with open_swap(tmp_path, size=4096 * PAGE, mem="8M", disk=None) as swap:
        r = Runner(swap)
        mem = swap.dev.tiers[0]
        assert isinstance(mem, MemoryTier)
        assert mem.arena_bytes == 0 and mem.space.free_bytes() == 0
        # still no headroom: ENOSPC at once, without waiting for growth that cannot come
        t0 = trio.current_time()
        await r.write(0, random_bytes(16 * PAGE, 1))
        assert r.enospc == 1 and trio.current_time() - t0 < GROW_WAIT
        # the machine has room again: the next write grows the arena and is stored
        mem.headroom_fn = lambda: None
        mem.host_fn = lambda: 1 << 40
        await r.write(0, random_bytes(16 * PAGE, 2))
        assert r.enospc == 1 and mem.arena_bytes == 8 * MIB and mem.pages == 16
        check_invariants(swap.dev)

        # a grow that hangs: the write gives up after GROW_WAIT with ENOSPC
        await r.write(16 * PAGE, random_bytes(2032 * PAGE, 3))  # fill the arena
        assert mem.space.free_bytes() == 0
        mem.space.nseg += 1  # pretend there is capacity left to grow into

        async def stuck() -> bool:
            await trio.sleep_forever()
            return False

        monkeypatch.setattr(mem, "grow", stuck)
        t0 = trio.current_time()
        await r.write(3000 * PAGE, random_bytes(PAGE, 4))
        assert r.enospc == 2
        assert trio.current_time() - t0 == pytest.approx(GROW_WAIT)
        mem.space.nseg -= 1
        await r.finish()


# ------------------------------------------------------------------------ concurrency


async def test_read_in_flight_keeps_its_segment(tmp_path: Path) -> None:
    """A segment freed while a read of it awaits the file tier is not reused under the read."""
    async with open_swap(tmp_path, size=4096 * PAGE, mem=None, disk="8M") as swap:
        fs, fh = swap.fs, swap.fh
        (disk,) = swap.dev.tiers
        old = random_bytes(256 * PAGE, 1)  # raw pages: exactly one 1 MiB segment
        await fs.write(fh, 0, old)
        assert [r.base for r in swap.dev.map.iter_runs()] == [0]
        entered, gate = trio.Event(), trio.Event()
        read = disk.read

        async def gated_read(base: int, length: int) -> bytes:
            entered.set()
            await gate.wait()
            return await read(base, length)

        disk.read = gated_read  # type: ignore[method-assign]
        got: list[bytes] = []

        async def reader() -> None:
            got.append(await fs.read(fh, 0, 256 * PAGE))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await entered.wait()  # the reader has resolved the map and awaits the tier
            await fs.fallocate(fh, PUNCH, 0, 256 * PAGE)  # segment 0 is empty now ...
            new = random_bytes(256 * PAGE, 2)
            await fs.write(fh, 1024 * PAGE, new)  # ... and must not take these pages
            (run,) = swap.dev.map.iter_runs()
            assert run.base >> disk.space.seg_shift != 0
            assert 0 not in disk.space.free
            gate.set()
        assert got == [old]  # what the map said when the read began, not the new pages
        assert 0 in disk.space.free  # released once the read finished
        assert await fs.read(fh, 1024 * PAGE, 256 * PAGE) == new
        disk.read = read  # type: ignore[method-assign]
        check_invariants(swap.dev)


@dataclass
class Version:
    data: bytes
    start: int
    end: int | None = None


async def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    """Writers, discarders and readers on the same pages at once, across both tiers.

    Per page this must behave like a register: every read returns a version some write put
    there (never a mix or stale bytes from freed space), no read returns a version that was
    already overwritten by a write that completed before the read began, and the final
    content is a version no later-started write has overwritten.
    """
    hot = 48
    async with open_swap(tmp_path) as swap:
        r = Runner(swap)
        await prefill(r)  # the memory tier is nearly full: writes spill to the file tier
        fs, fh = swap.fs, swap.fh
        clock = itertools.count()
        initial = bytes(PAGE)
        history: dict[int, list[Version]] = {p: [] for p in range(hot)}
        pages_ok = 0

        def overwritten(p: int, v: Version, t: int) -> bool:
            """Another write to p began after v ended and ended before time t."""
            return v.end is not None and any(
                w.start > v.end and w.end is not None and w.end < t for w in history[p]
            )

        def valid(p: int, got: bytes, read_start: int) -> bool:
            cands = [v for v in history[p] if v.data == got]
            if got == initial:
                cands.append(Version(initial, -2, -1))
            return any(not overwritten(p, v, read_start) for v in cands)

        async def writer(w: int, rng: random.Random) -> None:
            for i in range(30):
                first = rng.randrange(hot)
                n = rng.randrange(1, min(16, hot - first) + 1)
                kind = rng.random()
                if kind < 0.3:
                    data = random_bytes(n * PAGE, 1000 * w + i)
                else:
                    data = bytearray(expected_pages(w, np.arange(first, first + n)).tobytes())
                    for k in range(n):  # make every version of every page unique
                        data[k * PAGE : k * PAGE + 8] = (w * 1000 + i + 1).to_bytes(8, "little")
                    data = bytes(data)
                vs = [Version(data[k * PAGE : (k + 1) * PAGE], next(clock)) for k in range(n)]
                for k, v in enumerate(vs):
                    history[first + k].append(v)
                await fs.write(fh, first * PAGE, data)
                end = next(clock)
                for v in vs:
                    v.end = end
                await trio.sleep(0)

        async def discarder(rng: random.Random) -> None:
            for _ in range(15):
                first = rng.randrange(hot)
                n = rng.randrange(1, min(8, hot - first) + 1)
                vs = [Version(initial, next(clock)) for _ in range(n)]
                for k, v in enumerate(vs):
                    history[first + k].append(v)
                await fs.fallocate(fh, PUNCH, first * PAGE, n * PAGE)
                end = next(clock)
                for v in vs:
                    v.end = end
                await trio.sleep(0)

        async def reader(rng: random.Random) -> None:
            nonlocal pages_ok
            for _ in range(40):
                first = rng.randrange(hot)
                n = rng.randrange(1, hot - first + 1)
                start = next(clock)
                got = await fs.read(fh, first * PAGE, n * PAGE)
                assert len(got) == n * PAGE
                for k in range(n):
                    page = got[k * PAGE : (k + 1) * PAGE]
                    assert valid(first + k, page, start), f"page {first + k}: impossible content"
                    pages_ok += 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            for w in range(4):
                nursery.start_soon(writer, w, random.Random(w))
            nursery.start_soon(discarder, random.Random(10))
            for k in range(3):
                nursery.start_soon(reader, random.Random(20 + k))

        assert pages_ok > 1000
        # writes to the same page really were in flight at the same time, many times over
        overlapping = sum(
            1
            for vs in history.values()
            for v, w in itertools.combinations(vs, 2)
            if v.end is not None and w.end is not None and v.start < w.end and w.start < v.end
        )
        assert overlapping > 50, overlapping
        final_start = next(clock)
        got = await fs.read(fh, 0, hot * PAGE)
        for p in range(hot):
            page = got[p * PAGE : (p + 1) * PAGE]
            assert valid(p, page, final_start), f"page {p}: final content is no serial outcome"
            r.model[p * PAGE : (p + 1) * PAGE] = page
        _mem, disk = swap.dev.tiers
        assert disk.counters.pages_in > 0  # the race covered the file tier's awaits too
        check_invariants(swap.dev)
        await r.finish()
