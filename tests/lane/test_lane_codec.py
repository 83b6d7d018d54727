"""The lane's per-page codecs (tierswap/native/codec.c), seen through the lane: every workload
page kind round-trips, incompressible pages are stored raw and verbatim, zero pages take no
room, every configured codec and level works, and corrupt stored bytes are an EIO (counted in
`corrupt`), never wrong data.

What is stored is checked where it lies: the RAM arena is the kit's memfd, the file tier a
file, so a test reads (and damages) the stored bytes directly, at the addresses the map gives.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import trio

from tests.lane.fuseproto import FuseError
from tests.lane.harness import PAGE, LaneRig, all_runs, lens, lookup, offsets, open_lane
from tierswap import _lane
from tierswap.config import Compression
from tierswap.lane import ZERO_TIER
from tierswap.workload import KINDS, expected_pages, page_kinds

CODEC_NONE, CODEC_ZSTD, CODEC_LZ4 = 0, 1, 2
CODEC_OF = {"zstd": CODEC_ZSTD, "lz4": CODEC_LZ4, "none": CODEC_NONE}


def pages_of_kind(kind: str, n: int, seed: int = 7) -> bytes:
    idx = np.arange(20000)
    sel = idx[page_kinds(seed, idx) == KINDS.index(kind)][:n]
    assert len(sel) == n
    return expected_pages(seed, sel).tobytes()


def page(data: bytes, i: int) -> bytes:
    return data[i * PAGE : (i + 1) * PAGE]


def page_lens(rig: LaneRig, first: int, n: int) -> list[int]:
    """Stored length of pages [first, first + n); every one must be in some record."""
    out: list[int] = []
    at = first
    for r in lookup(rig, first, first + n):
        assert r.start == at, f"page {at} is in no record"
        out += lens(r)
        at += r.npages
    assert at == first + n
    return out


def stored_bytes(rig: LaneRig, p: int) -> bytes:
    """The bytes the tier holds for page `p`, read from the arena memfd or the tier file."""
    (r,) = lookup(rig, p, p + 1)
    (n,) = lens(r)
    if rig.svc.tiers[r.tier].kind == "memory":
        return os.pread(rig.kit.fds[f"arena.{r.tier}"], n, r.base)
    store = rig.svc.tiers[r.tier]
    with open(rig.config.tiers[r.tier].path, "rb") as f:  # the shard's share starts at origin
        return os.pread(f.fileno(), n, store.origin + r.base)


def damage(rig: LaneRig, p: int, at: int, garbage: bytes) -> None:
    """Overwrite stored bytes of page `p` in place (what a bad DIMM or disk would do)."""
    (r,) = lookup(rig, p, p + 1)
    if rig.svc.tiers[r.tier].kind == "memory":
        os.pwrite(rig.kit.fds[f"arena.{r.tier}"], garbage, r.base + at)
        return
    fd = os.open(rig.config.tiers[r.tier].path, os.O_WRONLY)
    try:
        os.pwrite(fd, garbage, rig.svc.tiers[r.tier].origin + r.base + at)
        os.fsync(fd)  # an O_DIRECT read then sees it
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ page kinds


@pytest.mark.parametrize("n", [1, 40])
async def test_every_workload_kind_round_trips(n: int) -> None:
    async with open_lane(size=8 << 20) as rig:
        c = rig.client
        for k, kind in enumerate(KINDS):
            data = pages_of_kind(kind, n, seed=k + 1)
            first = 100 + k * 64
            assert await c.write(first * PAGE, data) == len(data)
            assert await c.read(first * PAGE, len(data)) == data, kind
            got = page_lens(rig, first, n)
            if kind == "zero":
                assert got == [0] * n
                assert all(r.tier == ZERO_TIER for r in lookup(rig, first, first + n))
            elif kind == "random":
                assert got == [PAGE] * n, "incompressible pages are stored raw"
            else:
                assert all(0 < x < PAGE for x in got), kind
                if kind == "run":  # a repeated byte with a short noisy tail
                    assert all(x < 1024 for x in got)
        st = rig.stats()
        assert st.zero_pages == n and st.stored_pages == 4 * n
        assert st.corrupt == st.read_errors == st.write_errors == 0


async def test_mixed_workload_pages_round_trip_across_tiers() -> None:
    """Realistic mixes of every size of request, more than the RAM tier holds."""
    async with open_lane(size=32 << 20, mem="4M", disk="16M") as rig:
        c = rig.client
        first = 0
        batches = []
        for n in (1, 2, 33, *[256] * 12, 7):
            data = expected_pages(12, np.arange(1000 + first, 1000 + first + n)).tobytes()
            await c.write(first * PAGE, data)
            batches.append((first, data))
            first += n
        for f, data in batches:
            assert await c.read(f * PAGE, len(data)) == data
        st = rig.stats()
        assert st.tiers[0].pages > 0 and st.tiers[1].pages > 0


async def test_incompressible_pages_stored_raw_and_verbatim() -> None:
    for mem, disk in (("4M", None), (None, "16M")):  # in the arena, and in the file tier
        async with open_lane(mem=mem, disk=disk) as rig:
            data = pages_of_kind("random", 9)
            await rig.client.write(3 * PAGE, data)
            assert page_lens(rig, 3, 9) == [PAGE] * 9
            for i in range(9):  # the page bytes themselves, not a frame that holds them
                assert stored_bytes(rig, 3 + i) == page(data, i)
            (r,) = lookup(rig, 3, 12)
            assert r.flags >> 4 == CODEC_ZSTD and r.nbytes == 9 * PAGE


async def test_raw_and_compressed_pages_in_one_request() -> None:
    async with open_lane() as rig:
        rnd, txt = pages_of_kind("random", 17), pages_of_kind("text", 17)
        data = b"".join(page(rnd, i) + page(txt, i) for i in range(17))
        await rig.client.write(0, data)
        got = page_lens(rig, 0, 34)
        assert got[0::2] == [PAGE] * 17 and all(x < PAGE for x in got[1::2])
        (r,) = lookup(rig, 0, 34)  # one record, pages packed back to back
        addr = offsets(r)
        arena = rig.kit.fds["arena.0"]
        for i in range(0, 34, 2):  # each raw page sits verbatim at its offset
            assert os.pread(arena, PAGE, addr[i]) == page(data, i)
        assert await rig.client.read(0, len(data)) == data


async def test_zero_pages_take_no_room() -> None:
    async with open_lane() as rig:
        c = rig.client
        txt = pages_of_kind("text", 6)
        data = b"".join(page(txt, i) + bytes(PAGE) for i in range(6))  # text, zero, text, ...
        await c.write(0, data)
        (r,) = lookup(rig, 0, 12)
        got = lens(r)
        assert got[1::2] == [0] * 6 and all(got[0::2])
        assert r.nbytes == sum(got)  # zeros inside a run add no bytes
        st = rig.stats()
        assert (st.stored_pages, st.tiers[0].zero_pages, st.tiers[0].stored_bytes) == (
            6, 6, sum(got))
        # a request of zeros only: a ZERO_TIER record and no storage at all
        await c.write(64 * PAGE, bytes(40 * PAGE))
        (z,) = lookup(rig, 64, 104)
        assert (z.tier, z.npages, z.nbytes) == (ZERO_TIER, 40, 0)
        st = rig.stats()
        assert st.tiers[0].stored_bytes == sum(got) and st.zero_pages == 6 + 40
        assert await c.read(0, 104 * PAGE) == data + bytes(92 * PAGE)


async def test_frames_are_per_page() -> None:
    """A page is compressed on its own: written alone or inside a large request, it gets the
    same stored length and the same bytes (no batch state leaks between pages)."""
    async with open_lane(size=8 << 20, mem="8M", disk=None) as rig:
        data = expected_pages(5, np.arange(64)).tobytes()
        await rig.client.write(0, data)
        for i in range(64):
            await rig.client.write((512 + i) * PAGE, page(data, i))
        assert page_lens(rig, 0, 64) == page_lens(rig, 512, 64)
        for i in range(64):
            if page(data, i) != bytes(PAGE):
                assert stored_bytes(rig, i) == stored_bytes(rig, 512 + i)
        assert await rig.client.read(512 * PAGE, len(data)) == data


async def test_empty_requests() -> None:
    async with open_lane() as rig:
        assert await rig.client.read(PAGE, 0) == b""
        assert await rig.client.write(PAGE, b"") == 0
        assert rig.stats().runs == 0


# ------------------------------------------------------------------------ codecs and levels


@pytest.mark.parametrize("compression", ["zstd:-7", "zstd:1", "zstd:3", "zstd:19", "lz4",
                                         "lz4:16", "none"])
async def test_every_codec_and_level(compression: str) -> None:
    async with open_lane(size=16 << 20, mem="4M", disk="16M", mem_compression=compression,
                         disk_compression=compression) as rig:
        c = rig.client
        # raw pages fill the RAM tier, realistic ones then go to the file tier
        data = pages_of_kind("random", 1100) + expected_pages(9, np.arange(256)).tobytes()
        await c.write_all(0, data)
        assert await c.read_all(0, len(data)) == data
        algorithm = Compression.parse(compression, "t").algorithm
        txt = pages_of_kind("text", 8)
        await c.write(3072 * PAGE, txt)
        assert await c.read(3072 * PAGE, len(txt)) == txt
        got = page_lens(rig, 3072, 8)
        if algorithm == "none":
            assert got == [PAGE] * 8
        else:
            assert all(x < PAGE for x in got)
        for r in all_runs(rig):
            if r.tier != ZERO_TIER:
                assert r.flags >> 4 == CODEC_OF[algorithm], r
        st = rig.stats()
        assert st.tiers[0].pages > 0 and st.tiers[1].pages > 0
        assert st.corrupt == st.read_errors == 0


async def test_levels_are_applied() -> None:
    """The configured level reaches the compressor: zstd:19 stores text smaller than -7."""
    sizes = {}
    txt = pages_of_kind("text", 64)
    for compression in ("zstd:-7", "zstd:19"):
        async with open_lane(mem_compression=compression, disk=None) as rig:
            await rig.client.write(0, txt)
            sizes[compression] = rig.stats().stored_bytes
    assert sizes["zstd:19"] < sizes["zstd:-7"]


@pytest.mark.parametrize(("source", "target"), [("lz4", "zstd:19"), ("zstd:1", "lz4"),
                                                ("zstd:-7", "zstd:19")])
async def test_move_recompresses(source: str, target: str) -> None:
    """A move can store a record with another codec; it keeps the form only if smaller."""
    async with open_lane(mem_compression=source, disk=None) as rig:
        data = expected_pages(4, np.arange(128)).tobytes()
        await rig.client.write(0, data)
        (before,) = lookup(rig, 0, 128)
        want = Compression.parse(target, "t")
        assert await rig.svc.move(before, [0], recompress=want) == 128
        (after,) = lookup(rig, 0, 128)
        if after.nbytes < before.nbytes:
            assert after.flags >> 4 == CODEC_OF[want.algorithm]
        else:  # kept as it was
            assert after.flags >> 4 == before.flags >> 4 and after.nbytes == before.nbytes
        assert after.flags & _lane.FLAG_RECOMPRESSED  # either way: not to be tried again
        assert rig.stats().tiers[0].stored_bytes == after.nbytes
        assert await rig.client.read(0, len(data)) == data
        # recompressing to "none" never makes a page smaller: the record keeps its codec
        assert await rig.svc.move(after, [0], recompress=Compression("none")) == 128
        (same,) = lookup(rig, 0, 128)
        assert (same.flags, same.nbytes) == (after.flags, after.nbytes)


async def test_codecs_in_threads_at_once() -> None:
    """Each lane thread compresses with its own context: many requests at once agree."""
    async with open_lane(size=16 << 20, mem="8M", disk="16M", threads=4) as rig:
        c = rig.client
        chunks = [expected_pages(s, np.arange(64 * s, 64 * s + 64)).tobytes()
                  for s in range(24)]
        async with trio.open_nursery() as n:
            for s, data in enumerate(chunks):
                n.start_soon(c.write, s * 64 * PAGE, data)
        async with trio.open_nursery() as n:
            for s, data in enumerate(chunks):
                async def check(s: int = s, data: bytes = data) -> None:
                    assert await c.read(s * 64 * PAGE, len(data)) == data
                n.start_soon(check)


# ------------------------------------------------------------------------ corruption


@pytest.mark.parametrize("where", ["memory", "file"])
@pytest.mark.parametrize("how", ["magic", "header"])
async def test_corrupt_stored_bytes_give_eio(where: str, how: str) -> None:
    mem, disk = ("4M", None) if where == "memory" else (None, "16M")
    async with open_lane(mem=mem, disk=disk) as rig:
        c = rig.client
        data = pages_of_kind("text", 20)
        await c.write(0, data)
        victim = 9
        if how == "magic":  # the zstd frame magic gone
            damage(rig, victim, 0, bytes(4))
        else:  # the frame header overwritten
            damage(rig, victim, 0, b"\xff" * 8)
        with pytest.raises(FuseError) as ei:
            await c.read(victim * PAGE, PAGE)
        assert ei.value.errno == errno.EIO
        st = rig.stats()
        assert (st.corrupt, st.read_errors) == (1, 1)
        # a read over good pages and the bad one fails as a whole; the others alone do not
        with pytest.raises(FuseError):
            await c.read(0, len(data))
        assert await c.read(0, victim * PAGE) == data[: victim * PAGE]
        assert await c.read((victim + 1) * PAGE, 10 * PAGE) == data[(victim + 1) * PAGE :]
        # a partial write must merge with the page's bytes: it cannot, so EIO too
        with pytest.raises(FuseError) as ei:
            await c.write(victim * PAGE + 100, b"x" * 100)
        assert ei.value.errno == errno.EIO
        st = rig.stats()
        assert st.corrupt == 3 and st.write_errors == 1
        # a whole-page write replaces the bad bytes without reading them
        await c.write(victim * PAGE, page(data, victim))
        assert await c.read(0, len(data)) == data
        assert rig.stats().corrupt == 3
