"""The lane's FUSE operations against a plain bytearray, with the books checked after every
operation; the edges (EOF, fallocate modes, attributes); running out of room and getting it
back; waiting for memory growth; reads that hold their segment; per-page register semantics
under concurrency; moves and cleaning racing serial foreground I/O; drain, undrain and migrate
through the real Policy.

(Ported from tests/ops, which drove the old Python device. What tests/lane/test_lane_model.py
already covers, random sub-page operations and moves racing concurrent writers, is not
repeated here.)
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import stat
import struct
import threading
from dataclasses import dataclass

import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tierswap.tiers.memory as memory_mod
from tests.lane.fuseproto import FILE_INO, OP, ROOT_INO, FuseError
from tests.lane.harness import PAGE, LaneRig, all_runs, check_ledger, open_lane
from tierswap.commands import Drain, Migrate, Undrain
from tierswap.control import ControlError
from tierswap.lane import ZERO_TIER, NoRoom
from tierswap.policy import Policy
from tierswap.tiers.memory import MemoryTier
from tierswap.workload import expected_pages

MIB = 1 << 20
NPAGES = 2048  # the model tests' device: 8 MiB over a 4 MiB RAM tier and a 16 MiB file
SIZE = NPAGES * PAGE
PREFILL = range(1028, 2048)  # incompressible pages that take ~all of the RAM tier


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


def assert_all_space_returned(rig: LaneRig) -> None:
    st_ = rig.stats()
    assert (st_.stored_pages, st_.zero_pages, st_.runs, st_.stored_bytes) == (0, 0, 0, 0)
    for t in rig.svc.lane.statistics()["tiers"]:
        assert t["live_bytes"] == t["pages"] == t["zero_pages"] == 0
        # every segment is free again, except the one still open for appends
        open_ = 1 if t["free_segments"] < t["segments"] else 0
        assert t["free_segments"] + open_ + t["retiring"] == t["segments"], t
        assert t["guards"] == 0


class Runner:
    """Applies operations to the lane and to the model, checking both agree."""

    def __init__(self, rig: LaneRig) -> None:
        self.rig = rig
        self.c = rig.client
        self.size = rig.size
        self.model = bytearray(self.size)
        self.enospc = 0

    async def read_model_check(self, off: int, length: int) -> None:
        if length > MIB:  # requests are at most 1 MiB
            for o in range(0, length, MIB):
                await self.read_model_check(off + o, min(MIB, length - o))
            return
        got = await self.c.read(off, length)
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
            n = await self.c.write(off, data)
        except FuseError as e:
            assert e.errno == errno.ENOSPC, e
            self.enospc += 1  # the old content must still be there
        else:
            assert n == len(data)
            self.model[off : off + len(data)] = data
        await self.check_around(off, len(data))

    async def discard(self, off: int, length: int) -> None:
        end = off + length
        try:
            await self.c.punch(off, length)
        except FuseError as e:
            # Partial edge pages are zero-filled by writes, which can run out of room. Each
            # part must then hold either the old bytes or zeros, never anything else.
            assert e.errno == errno.ENOSPC, e
            self.enospc += 1
            got = await self.c.read(off, length)
            a, b = -(-off // PAGE) * PAGE, end // PAGE * PAGE
            parts = [(off, end)] if a >= b else [(off, a), (a, b), (b, end)]
            for p, q in parts:
                have, old = got[p - off : q - off], bytes(self.model[p:q])
                assert have in (old, bytes(q - p)), f"discard left garbage in {p}..{q}"
            self.model[off:end] = got
        else:
            self.model[off:end] = bytes(length)
        await self.check_around(off, length)

    async def apply(self, op: tuple) -> None:
        kind = op[0]
        if kind == "write":
            _, off, length, ckind, seed = op
            for o in range(0, length, MIB):  # requests are at most 1 MiB
                await self.write(off + o, content(ckind, seed, off + o, min(MIB, length - o)))
        elif kind == "discard":
            await self.discard(op[1], op[2])
        else:
            await self.read_model_check(op[1], op[2])
        check_ledger(self.rig)

    async def finish(self) -> None:
        for off in range(0, self.size, MIB):
            await self.read_model_check(off, MIB)
        await self.c.punch(0, self.size)
        self.model[:] = bytes(self.size)
        check_ledger(self.rig)
        assert_all_space_returned(self.rig)
        assert await self.c.read_all(0, self.size) == bytes(self.size)


async def prefill(r: Runner) -> None:
    data = random_bytes(len(PREFILL) * PAGE, 99)
    for o in range(0, len(data), MIB):
        await r.write(PREFILL.start * PAGE + o, data[o : o + MIB])
    st_ = r.rig.svc.lane.statistics()["tiers"][0]
    assert st_["pages"] == len(PREFILL) and st_["free_bytes"] < 64 * PAGE


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
    st.one_of(offset, st.integers(SIZE - 3 * PAGE, SIZE + 2 * PAGE)),  # also past EOF
    st.integers(0, 70 * PAGE),
)
operation = st.one_of(write_op, write_op, discard_op, read_op)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(operation, min_size=1, max_size=40))
async def test_operations_against_model(ops: list[tuple]) -> None:
    async with open_lane(size=SIZE, mem="4M", disk="16M") as rig:
        r = Runner(rig)
        await prefill(r)
        for op in ops:
            await r.apply(op)
        # sized so that no write can run out of room: 40 ops x 66 pages < the 16M file tier
        assert r.enospc == 0
        await r.finish()


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
async def test_long_random_sequence(seed: int) -> None:
    """Hundreds of operations: segments fill, empty and get reused in both tiers."""
    rng = random.Random(seed)
    async with open_lane(size=SIZE, mem="4M", disk="16M") as rig:
        r = Runner(rig)
        await prefill(r)
        for i in range(400):
            hot = (900, 1300) if i < 200 else (0, 400)
            await r.apply(random_op(rng, hot))
        mem, disk = rig.stats().tiers
        assert disk.pages_in > 0 and mem.pages_out > 0
        assert disk.pages_out > 0  # pages were read back from the spill tier
        # RAM segments were freed and filled again: more went in than it can hold
        assert mem.pages_in > 4 * MIB // PAGE
        await r.finish()


async def test_spill_and_read_back() -> None:
    async with open_lane(size=SIZE, mem="4M", disk="16M") as rig:
        r = Runner(rig)
        data = random_bytes(1500 * PAGE, 5)  # more than the RAM tier holds, raw
        for off in range(0, len(data), MIB):
            await r.write(off, data[off : off + MIB])
        mem, disk = rig.stats().tiers
        assert (mem.pages, disk.pages) == (1024, 476)  # RAM full first, the rest spilled
        assert mem.stored_bytes == 4 * MIB
        check_ledger(rig)
        await r.read_model_check(1000 * PAGE + 123, 100 * PAGE)  # both tiers, unaligned
        # overwrite a stretch of spilled pages in the middle of their run, partly unaligned
        await r.write(1200 * PAGE + 7, content("workload", 3, 1200 * PAGE + 7, 50 * PAGE))
        check_ledger(rig)
        await r.finish()


# ------------------------------------------------------------------------ edges and errors


async def test_io_past_the_end() -> None:
    """Writes beyond the fixed size are EFBIG (the device cannot grow); reads stop at EOF;
    discards are clipped to the device (the loop driver never sends either)."""
    async with open_lane(size=64 * PAGE, disk=None) as rig:
        c, size = rig.client, rig.size
        r = Runner(rig)
        await r.write(size - 2 * PAGE, random_bytes(2 * PAGE, 1))
        for off, n in ((size - 10, 20), (size, 1), (size + PAGE, PAGE), (2**64 - 1, 1)):
            with pytest.raises(FuseError) as ei:
                await c.write(off, b"x" * n)
            assert ei.value.errno == errno.EFBIG, off
        await c.punch(size, 1)  # nothing to punch
        await c.punch(2**64 - PAGE, PAGE)
        assert await c.read(2**64 - 1, 10) == b""
        await r.read_model_check(0, size)  # nothing inside was touched
        await c.punch(size - PAGE, 2 * PAGE)  # clipped: the last page goes
        r.model[size - PAGE :] = bytes(PAGE)
        await r.read_model_check(0, size)
        assert await c.write(size, b"") == 0  # an empty write at the end is fine


async def test_read_at_and_after_eof() -> None:
    async with open_lane(size=64 * PAGE, disk=None) as rig:
        c, size = rig.client, rig.size
        tail = random_bytes(PAGE, 3)
        await c.write(size - PAGE, tail)
        assert await c.read(size, 10) == b""
        assert await c.read(size + 123457, PAGE) == b""
        assert await c.read(size - 10, 100) == tail[-10:]  # short read up to EOF
        assert await c.read(size - PAGE, 1 << 20) == tail
        assert await c.read(0, 0) == b""
        assert await c.read(5, 3) == bytes(3)  # never written: zeros


async def test_fallocate_modes() -> None:
    async with open_lane(size=64 * PAGE, disk=None) as rig:
        c, size = rig.client, rig.size
        r = Runner(rig)
        await r.write(0, random_bytes(8 * PAGE, 2))
        keep_size, punch_only, collapse, zero_range, insert, unshare = (0x01, 0x02, 0x08,
                                                                         0x10, 0x20, 0x40)
        for mode in (punch_only, collapse, zero_range, insert, unshare, collapse | keep_size,
                     insert | keep_size, 0x80):
            with pytest.raises(FuseError) as ei:
                await c.punch(0, 4 * PAGE, mode=mode)
            assert ei.value.errno == errno.EOPNOTSUPP, hex(mode)
        # plain allocation (with or without KEEP_SIZE) inside the fixed size is a no-op,
        # beyond it EFBIG
        await c.punch(0, size, mode=0)
        await c.punch(PAGE, PAGE, mode=keep_size)
        for mode in (0, keep_size):
            with pytest.raises(FuseError) as ei:
                await c.punch(size - PAGE, 2 * PAGE, mode=mode)
            assert ei.value.errno == errno.EFBIG
        await r.read_model_check(0, size)  # nothing was discarded or changed
        assert rig.stats().discards == 0
        # ZERO_RANGE with KEEP_SIZE (the loop driver's write-zeroes) zeroes like a discard
        await c.punch(PAGE + 100, 2 * PAGE, mode=zero_range | keep_size)
        r.model[PAGE + 100 : 3 * PAGE + 100] = bytes(2 * PAGE)
        await r.read_model_check(0, size)
        assert rig.stats().discards == 1
        check_ledger(rig)


# fuse_attr: ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid
# rdev blksize flags; fuse_attr_out prefixes attr_valid, attr_valid_nsec, dummy
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ATTR_OUT = struct.Struct("<QII")
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsec nsec
# fuse_setattr_in: valid padding fh size lock_owner atime mtime ctime atimensec mtimensec
# ctimensec mode unused4 uid gid unused5
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
GETATTR_IN = struct.Struct("<IIQ")
STATFS_OUT = struct.Struct("<QQQQQIII")  # blocks bfree bavail files ffree bsize namelen frsize
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE, FATTR_MTIME = 1, 2, 4, 8, 32
FOPEN_DIRECT_IO = 1


def attr(body: bytes, prefix: struct.Struct = ATTR_OUT) -> dict[str, int]:
    names = ["ino", "size", "blocks", "atime", "mtime", "ctime", "atimensec", "mtimensec",
             "ctimensec", "mode", "nlink", "uid", "gid", "rdev", "blksize", "flags"]
    return dict(zip(names, ATTR.unpack_from(body, prefix.size), strict=True))


def setattr_in(valid: int, *, size: int = 0, mode: int = 0, uid: int = 0) -> bytes:
    return SETATTR_IN.pack(valid, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, mode, 0, uid, 0, 0)


async def test_attributes_and_setattr() -> None:
    async with open_lane(size=64 * PAGE, disk=None) as rig:
        c, size = rig.client, rig.size
        call = c.call
        for new in (0, size - PAGE, size + PAGE):  # the device has a fixed size ...
            err, _ = await call(OP["SETATTR"], FILE_INO, setattr_in(FATTR_SIZE, size=new),
                                raw=True)
            assert -err == errno.EPERM, new
        a = attr(await call(OP["SETATTR"], FILE_INO, setattr_in(FATTR_SIZE, size=size)))
        assert a["size"] == size  # ... which may be set to itself
        a = attr(await call(OP["SETATTR"], FILE_INO, setattr_in(FATTR_MTIME)))
        assert a["size"] == size  # times: accepted
        for valid, kw in ((FATTR_MODE, {"mode": stat.S_IFREG | 0o666}),
                          (FATTR_UID, {"uid": 12345}), (FATTR_GID, {})):
            err, _ = await call(OP["SETATTR"], FILE_INO, setattr_in(valid, **kw), raw=True)
            assert -err == errno.EPERM, valid  # ... and a fixed owner and mode
        err, _ = await call(OP["SETATTR"], 99, setattr_in(FATTR_MTIME), raw=True)
        assert -err == errno.ENOENT

        a = attr(await call(OP["GETATTR"], FILE_INO, GETATTR_IN.pack(0, 0, 0)))
        assert a["ino"] == FILE_INO and a["size"] == size and a["blksize"] == PAGE
        assert stat.S_ISREG(a["mode"]) and stat.S_IMODE(a["mode"]) == 0o600
        assert (a["uid"], a["gid"], a["nlink"]) == (os.getuid(), os.getgid(), 1)
        assert a["blocks"] == 0
        await c.write(0, random_bytes(4 * PAGE, 1))
        a = attr(await call(OP["GETATTR"], FILE_INO, GETATTR_IN.pack(0, 0, 0)))
        assert a["blocks"] == 4 * PAGE // 512  # what the tiers hold
        root = attr(await call(OP["GETATTR"], ROOT_INO, GETATTR_IN.pack(0, 0, 0)))
        assert stat.S_ISDIR(root["mode"]) and stat.S_IMODE(root["mode"]) == 0o700
        err, _ = await call(OP["GETATTR"], 99, GETATTR_IN.pack(0, 0, 0), raw=True)
        assert -err == errno.ENOENT

        entry = await call(OP["LOOKUP"], ROOT_INO, b"swap.img\0")
        assert ENTRY_OUT.unpack_from(entry)[0] == FILE_INO
        assert attr(entry, ENTRY_OUT)["size"] == size
        for ino, name in ((ROOT_INO, b"other\0"), (FILE_INO, b"swap.img\0")):
            err, _ = await call(OP["LOOKUP"], ino, name, raw=True)
            assert -err == errno.ENOENT
        err, _ = await call(OP["OPEN"], FILE_INO, struct.pack("<II", os.O_RDWR | os.O_TRUNC, 0),
                            raw=True)
        assert -err == errno.EPERM
        err, _ = await call(OP["OPEN"], ROOT_INO, struct.pack("<II", os.O_RDONLY, 0), raw=True)
        assert -err == errno.EISDIR
        fh, flags = struct.unpack_from("<QI", await call(OP["OPEN"], FILE_INO,
                                                         struct.pack("<II", os.O_RDWR, 0)))
        assert fh == FILE_INO and flags & FOPEN_DIRECT_IO  # no page cache of ours
        blocks, bfree, bavail, _files, _ffree, bsize, _namelen, frsize = STATFS_OUT.unpack_from(
            await call(OP["STATFS"], ROOT_INO, b""))
        assert (blocks, bfree, bavail, bsize, frsize) == (64, 60, 60, PAGE, PAGE)


# ------------------------------------------------------------------------ running out of room


async def test_enospc_keeps_data_and_recovers() -> None:
    """Tiny tiers, incompressible pages: fill up, fail cleanly, keep serving, recover."""
    async with open_lane(size=4096 * PAGE, mem="4M", disk="4M") as rig:
        r = Runner(rig)
        c = rig.client
        chunk = 60  # 2048 pages of room, so the 35th write finds only 8 pages left
        i = 0
        t0 = trio.current_time()
        while True:
            data = random_bytes(chunk * PAGE, i)
            try:
                await c.write(i * chunk * PAGE, data)
            except FuseError as e:
                assert e.errno == errno.ENOSPC
                break
            r.model[i * chunk * PAGE : (i + 1) * chunk * PAGE] = data
            i += 1
        assert trio.current_time() - t0 < memory_mod.GROW_WAIT  # nothing can grow: no wait
        st_ = rig.stats()
        assert i == 34 and st_.stored_pages == 34 * chunk
        # the failed write was rolled back: no space leaked, nothing half-published
        check_ledger(rig)
        assert (st_.tiers[0].pages, st_.tiers[1].pages) == (1024, 34 * chunk - 1024)
        assert st_.enospc == 1 and st_.write_errors == 1
        await r.read_model_check(0, 2048 * PAGE)
        # whatever room is left (at most those 8 pages), single pages take it
        for k in range(9):
            await r.write((2040 + k) * PAGE, random_bytes(PAGE, 400 + k))
            if r.enospc:
                break
        assert r.enospc == 1 and k <= 8
        r.enospc = 0

        # every tier full: overwrites fail too and leave the old content readable
        before = rig.stats()
        await r.write(10 * PAGE, random_bytes(PAGE, 500))  # aligned
        await r.write(100 * PAGE + 5, random_bytes(3 * PAGE, 501))  # unaligned: RMW
        await r.write(2030 * PAGE, random_bytes(30 * PAGE, 502))  # half stored, half empty
        assert r.enospc == 3 and rig.stats().enospc == before.enospc + 3
        after = rig.stats()
        assert after.stored_pages == before.stored_pages
        assert after.stored_bytes == before.stored_bytes
        check_ledger(rig)
        await r.read_model_check(0, 2048 * PAGE)

        # zero pages need no room: writing them succeeds even now and frees space
        await r.write(200 * PAGE, bytes(4 * PAGE))
        assert r.enospc == 3
        assert rig.stats().stored_pages == before.stored_pages - 4

        # discard the first 512 pages (RAM segments 0 and 1): writes are accepted again
        await r.discard(0, 512 * PAGE)
        assert rig.stats().tiers[0].free_bytes == 2 * MIB
        for k in range(4):
            await r.write((3000 + 64 * k) * PAGE, random_bytes(64 * PAGE, 600 + k))
        assert r.enospc == 3
        assert rig.stats().tiers[0].pages == 1024 - 512 + 256
        check_ledger(rig)
        await r.finish()


async def test_write_waits_for_memory_growth(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing has room but the RAM tier may grow: the write grows it instead of failing;
    a growth that does not finish in GROW_WAIT is ENOSPC for the write, not a hang."""
    monkeypatch.setattr(memory_mod, "cgroup_headroom", lambda: 0)  # no arena at start
    monkeypatch.setattr(memory_mod, "GROW_WAIT", 0.5)
    gate = threading.Event()
    try:
        async with open_lane(size=4096 * PAGE, mem="8M", disk=None) as rig:
            r = Runner(rig)
            mem = rig.svc.tiers[0]
            assert isinstance(mem, MemoryTier)
            assert mem.size == 0 and rig.stats().tiers[0].free_bytes == 0
            # no headroom: ENOSPC at once, without waiting for growth that cannot come
            t0 = trio.current_time()
            await r.write(0, random_bytes(16 * PAGE, 1))
            assert r.enospc == 1 and trio.current_time() - t0 < memory_mod.GROW_WAIT
            # room again, but the growth hangs: the write gives up after GROW_WAIT
            mem.headroom_fn = lambda: None
            mem.host_fn = lambda: 1 << 40
            real = mem.extend_fn

            def stuck(old: int, chunk: int) -> None:
                gate.wait(30)
                real(old, chunk)

            mem.extend_fn = stuck
            t0 = trio.current_time()
            await r.write(0, random_bytes(16 * PAGE, 2))
            assert r.enospc == 2
            assert memory_mod.GROW_WAIT <= trio.current_time() - t0 < 3 * memory_mod.GROW_WAIT
            # the growth finishes after all; the next write is stored in it
            gate.set()
            with trio.fail_after(10):
                while mem.size < 8 * MIB:
                    await trio.sleep(0.01)
            await r.write(0, random_bytes(16 * PAGE, 3))
            assert r.enospc == 2 and mem.growths == 1
            assert rig.stats().tiers[0].pages == 16
            # the arena is at its capacity: a full tier is ENOSPC at once again
            await r.write(16 * PAGE, random_bytes(2032 * PAGE, 4)[: MIB])
            for off in range(16 + 256, 2048, 256):
                await r.write(off * PAGE, random_bytes(min(256, 2048 - off) * PAGE, off))
            assert rig.stats().tiers[0].free_bytes == 0
            t0 = trio.current_time()
            await r.write(3000 * PAGE, random_bytes(PAGE, 5))
            assert r.enospc == 3 and trio.current_time() - t0 < memory_mod.GROW_WAIT
            check_ledger(rig)
            await r.finish()
    finally:
        gate.set()  # never leave a worker thread waiting


# ------------------------------------------------------------------------ concurrency


async def test_read_in_flight_keeps_its_segment() -> None:
    """A segment freed while a read of it awaits the file tier is not reused under the read."""
    async with open_lane(size=4096 * PAGE, mem=None, disk="8M") as rig:
        c, lane = rig.client, rig.svc.lane
        old = random_bytes(256 * PAGE, 1)  # raw pages: exactly one 1 MiB segment
        await c.write(0, old)
        assert [r.base for r in all_runs(rig)] == [0]
        disk = rig.svc.tiers[0]
        entered, gate = trio.Event(), trio.Event()
        read = disk.read

        async def gated_read(base: int, length: int) -> bytes:
            entered.set()
            await gate.wait()
            return await read(base, length)

        disk.read = gated_read  # type: ignore[method-assign]
        got: list[bytes] = []

        async def reader() -> None:
            got.append(await c.read(0, 256 * PAGE))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await entered.wait()  # the read has resolved the map and awaits the tier
            await c.punch(0, 256 * PAGE)  # segment 0 is empty now ...
            new = random_bytes(256 * PAGE, 2)
            await c.write(1024 * PAGE, new)  # ... and must not take these pages
            (run,) = all_runs(rig)
            assert run.base >> 20 != 0
            assert not lane.segments(0)[1][0]  # not free
            assert lane.statistics()["tiers"][0]["guards"] == 1
            gate.set()
        assert got == [old]  # what the map said when the read began, not the new pages
        assert lane.segments(0)[1][0]  # released once the read finished
        disk.read = read  # type: ignore[method-assign]
        assert await c.read(1024 * PAGE, 256 * PAGE) == new
        check_ledger(rig)


@dataclass
class Version:
    data: bytes
    start: int
    end: int | None = None


async def test_concurrent_writers_and_readers_behave_like_registers() -> None:
    """Writers, discarders and readers on the same pages at once, across both tiers.

    Per page this must behave like a register: every read returns a version some write put
    there (never a mix or stale bytes from freed space), no read returns a version that was
    already overwritten by a write that completed before the read began, and the final
    content is a version no later-started write has overwritten.
    """
    hot = 48
    async with open_lane(size=SIZE, mem="4M", disk="16M", threads=4) as rig:
        r = Runner(rig)
        await prefill(r)  # the RAM tier is nearly full: writes spill to the file tier
        c = rig.client
        clock = itertools.count()
        initial = bytes(PAGE)
        history: dict[int, list[Version]] = {p: [] for p in range(hot)}
        pages_ok = 0

        def overwritten(p: int, v: Version, t: int) -> bool:
            """Another write to p began after v ended and ended before time t."""
            return v.end is not None and any(
                w.start > v.end and w.end is not None and w.end < t for w in history[p])

        def valid(p: int, got: bytes, read_start: int) -> bool:
            cands = [v for v in history[p] if v.data == got]
            if got == initial:
                cands.append(Version(initial, -2, -1))
            return any(not overwritten(p, v, read_start) for v in cands)

        async def writer(w: int, rng: random.Random) -> None:
            for i in range(30):
                first = rng.randrange(hot)
                n = rng.randrange(1, min(16, hot - first) + 1)
                if rng.random() < 0.3:
                    data = random_bytes(n * PAGE, 1000 * w + i)
                else:
                    buf = bytearray(expected_pages(w, np.arange(first, first + n)).tobytes())
                    for k in range(n):  # make every version of every page unique
                        buf[k * PAGE : k * PAGE + 8] = (w * 1000 + i + 1).to_bytes(8, "little")
                    data = bytes(buf)
                vs = [Version(data[k * PAGE : (k + 1) * PAGE], next(clock)) for k in range(n)]
                for k, v in enumerate(vs):
                    history[first + k].append(v)
                await c.write(first * PAGE, data)
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
                await c.punch(first * PAGE, n * PAGE)
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
                got = await c.read(first * PAGE, n * PAGE)
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
        got = await c.read(0, hot * PAGE)
        for p in range(hot):
            page = got[p * PAGE : (p + 1) * PAGE]
            assert valid(p, page, final_start), f"page {p}: final content is no serial outcome"
            r.model[p * PAGE : (p + 1) * PAGE] = page
        assert rig.stats().tiers[1].pages_in > 0  # the race covered the file tier's awaits
        check_ledger(rig)
        await r.finish()


# ------------------------------------------------------------------------ moves and policy


async def test_moves_and_cleaning_race_serial_foreground_io() -> None:
    """One task issues writes, reads and discards on a few hot pages (serially, so the model
    is exact and every read is checked while moves are in flight); another keeps moving those
    records between the tiers and cleaning segments."""
    npages = 256
    async with open_lane(size=npages * PAGE, mem="4M", disk="8M") as rig:
        svc = rig.svc
        c = rig.client
        policy = Policy(svc, rig.config.policy)
        model = bytearray(npages * PAGE)
        rng = random.Random(5)
        data_src = expected_pages(11, np.arange(4 * npages))
        moves = {"done": 0, "lost_race": 0, "cleaned": 0}
        stop = trio.Event()

        async def mover() -> None:
            while not stop.is_set():
                runs = [r for r in all_runs(rig) if r.tier != ZERO_TIER]
                if runs:
                    run = rng.choice(runs)
                    try:
                        done = await svc.move(run, [rng.randrange(2)])
                    except NoRoom:
                        done = 0
                    moves["done" if done else "lost_race"] += 1
                if rng.random() < 0.05:
                    moves["cleaned"] += (await policy.clean(rng.randrange(2)))["pages"]
                await trio.sleep(0)

        async def foreground() -> None:
            for step in range(1000):
                first = rng.randrange(npages - 16)
                n = rng.randrange(1, 16)
                op = rng.random()
                off, length = first * PAGE, n * PAGE
                if op < 0.45:
                    k = rng.randrange(len(data_src) - n)
                    data = data_src[k : k + n].tobytes()
                    if rng.random() < 0.2:  # unaligned edges: read-modify-write in the lane
                        off += 100
                        data = data[: length - 300]
                    await c.write(off, data)
                    model[off : off + len(data)] = data
                elif op < 0.85:
                    got = await c.read(off, length)
                    assert got == bytes(model[off : off + length]), f"step {step}: stale read"
                else:
                    await c.punch(off, length)
                    model[off : off + length] = bytes(length)
                await trio.sleep(0)
            stop.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(mover)
            nursery.start_soon(foreground)
        assert moves["done"] > 100, moves  # the race really happened, many times
        assert moves["lost_race"] > 0, moves
        assert await c.read(0, npages * PAGE) == bytes(model)
        check_ledger(rig)  # pages counted per tier and live bytes equal what the map holds
        await c.punch(0, npages * PAGE)
        assert_all_space_returned(rig)


async def progress(p: dict) -> None:
    pass


async def test_drain_undrain_and_migrate_through_the_policy() -> None:
    npages = 256
    async with open_lane(size=npages * PAGE, mem="4M", disk="8M") as rig:
        svc, c = rig.svc, rig.client
        policy = Policy(svc, rig.config.policy)
        data = expected_pages(3, np.arange(npages)).tobytes()
        await c.write(0, data)
        assert rig.stats().tiers[0].pages > 0
        res = await policy.handle(Drain(tier="ram"), progress)
        st_ = rig.stats()
        assert st_.tiers[0].pages == st_.tiers[0].zero_pages == 0
        assert res["left"] == 0 and res["pages"] > 0 and st_.tiers[0].draining
        await c.write(0, data[: 8 * PAGE])  # new pages avoid the draining tier
        assert rig.stats().tiers[0].pages == 0
        assert await c.read(0, len(data)) == data
        with pytest.raises(ControlError, match="draining"):  # nor does a migration go there
            await policy.handle(Migrate(src="disk", dst="ram", pages=1), progress)
        await policy.handle(Undrain(tier="ram"), progress)
        assert not rig.stats().tiers[0].draining
        await c.write(PAGE * 100, data[: 8 * PAGE])
        assert rig.stats().tiers[0].pages > 0
        moved = await policy.handle(Migrate(src="disk", dst="ram", pages=10), progress)
        assert moved["pages"] >= 10  # whole records move: at least what was asked
        promoted = rig.stats().tiers[0].promotions
        assert 0 < promoted <= moved["pages"]  # zero pages are not counted
        assert await c.read(0, len(data)) == bytes(data[: 100 * PAGE]) + data[: 8 * PAGE] + \
            data[108 * PAGE :]
        check_ledger(rig)


async def test_drain_without_room_elsewhere_stays_draining() -> None:
    async with open_lane(size=4096 * PAGE, mem="4M", disk="4M") as rig:
        c = rig.client
        policy = Policy(rig.svc, rig.config.policy)
        data = random_bytes(1536 * PAGE, 7)  # RAM full, half the file tier
        await c.write_all(0, data)
        with pytest.raises(ControlError, match="still draining"):
            await policy.handle(Drain(tier="ram"), progress)
        st_ = rig.stats()
        assert st_.tiers[0].draining and st_.tiers[1].free_bytes < MIB
        assert st_.tiers[0].pages + st_.tiers[1].pages == 1536  # nothing lost, nothing twice
        assert await c.read_all(0, len(data)) == data
        check_ledger(rig)
