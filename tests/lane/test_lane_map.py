"""The run map (tierswap/native/map.c) through the lane: cutting runs, lookup clipping, record
size bounds, joining, generations, compare-and-swap moves, touch and epochs, scans, statistics,
and the record format itself, decoded independently with the Python `lmdb` package.

Records are made the way the device makes them (FUSE writes and discards), so what a test
asserts about the map is what swap traffic produces.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lane.harness import (
    PAGE,
    LaneRig,
    all_runs,
    check_ledger,
    lens,
    lookup,
    mixed_bytes,
    offsets,
    open_lane,
    page_content,
)
from tierswap import _lane
from tierswap.lane import ZERO_TIER, NoRoom, RunInfo, map_size_for

JOIN_BELOW = 64  # lane.h: runs this long are not grown further by joining
KINDS10 = ["text", "zero", "random", "run", "text", "random", "zero", "zero", "text", "run"]


def pages(kinds: list[str], seed: int = 0) -> bytes:
    return b"".join(page_content(seed * 1000 + i, k) for i, k in enumerate(kinds))


def compressible(n: int, seed: int = 0) -> bytes:
    return pages(["text"] * n, seed)


def spans(rig: LaneRig) -> list[tuple[int, int]]:
    return [(r.start, r.start + r.npages) for r in all_runs(rig)]


def by_page(runs: list[RunInfo]) -> dict[int, tuple[int, int, int]]:
    """page -> (tier, byte address, stored length), from the records' own lengths."""
    out: dict[int, tuple[int, int, int]] = {}
    for r in runs:
        for i, (addr, n) in enumerate(zip(offsets(r), lens(r), strict=True)):
            assert r.start + i not in out
            out[r.start + i] = (r.tier, addr, n)
    return out


async def filler(rig: LaneRig, page: int = 1900) -> None:
    """A write elsewhere, so that the next write's bytes do not follow the last one's."""
    await rig.client.write(page * PAGE, compressible(1, seed=page))


# ------------------------------------------------------------------------ cutting


@pytest.mark.parametrize(
    ("first", "last", "left", "right"),
    [
        (10, 14, None, (14, 20)),  # left edge
        (16, 20, (10, 16), None),  # right edge
        (13, 16, (10, 13), (16, 20)),  # middle
        (10, 20, None, None),  # exactly
        (5, 25, None, None),  # beyond both ends
        (0, 11, None, (11, 20)),
        (19, 30, (10, 19), None),
    ],
)
async def test_discard_cuts_a_run(first, last, left, right) -> None:
    async with open_lane() as rig:
        data = pages(KINDS10)
        await rig.client.write(10 * PAGE, data)
        (orig,) = all_runs(rig)
        olens = lens(orig)
        assert orig.npages == 10 and 0 in olens and PAGE in olens
        before = rig.stats().tiers[0].stored_bytes
        await rig.client.punch(first * PAGE, (last - first) * PAGE)
        runs = all_runs(rig)
        assert spans(rig) == [s for s in (left, right) if s is not None]
        for r in runs:  # the pieces keep their bytes: base moved by the skipped lengths
            a, b = r.start - 10, r.start - 10 + r.npages
            assert r.base == orig.base + sum(olens[:a])
            assert lens(r) == olens[a:b]
            assert (r.tier, r.epoch, r.gen, r.flags) == (orig.tier, orig.epoch, orig.gen,
                                                         orig.flags)
        cut = range(max(first, 10) - 10, min(last, 20) - 10)
        assert rig.stats().tiers[0].stored_bytes == before - sum(olens[i] for i in cut)
        model = bytearray(data)
        for i in cut:
            model[i * PAGE : (i + 1) * PAGE] = bytes(PAGE)
        assert await rig.client.read(10 * PAGE, len(data)) == bytes(model)
        check_ledger(rig)


async def test_write_inside_a_run_cuts_it_and_inserts() -> None:
    async with open_lane() as rig:
        await rig.client.write(0, compressible(8))
        (orig,) = all_runs(rig)
        await rig.client.punch(2 * PAGE, PAGE)  # page 2 unmapped ...
        await rig.client.write(3 * PAGE, pages(["zero", "zero", "random"], 5))  # ... 3..5 new
        assert spans(rig) == [(0, 2), (3, 6), (6, 8)]
        assert lookup(rig, 2, 3) == []
        new = lookup(rig, 3, 6)[0]
        assert lens(new) == [0, 0, PAGE] and new.gen != orig.gen
        left, right = lookup(rig, 0, 2)[0], lookup(rig, 6, 8)[0]
        assert left.gen == right.gen == orig.gen  # remainders keep the run's generation
        assert right.base == orig.base + sum(lens(orig)[:6])
        check_ledger(rig)


async def test_write_across_several_runs() -> None:
    async with open_lane() as rig:
        for i in range(5):
            await rig.client.write(i * 4 * PAGE, compressible(4, seed=i))
            await filler(rig)  # keeps the five records apart
        assert spans(rig)[:5] == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
        await rig.client.write(2 * PAGE, compressible(16, seed=9))
        assert spans(rig)[:3] == [(0, 2), (2, 18), (18, 20)]
        check_ledger(rig)


# ------------------------------------------------------------------------ lookup


async def test_lookup_clips() -> None:
    async with open_lane() as rig:
        await rig.client.write(3 * PAGE, compressible(7))  # pages 3..10
        await filler(rig)
        await rig.client.write(20 * PAGE, compressible(10, seed=1))  # pages 20..30
        (a,) = lookup(rig, 3, 10)
        (b,) = lookup(rig, 20, 30)
        got = lookup(rig, 5, 25)
        assert [(r.start, r.start + r.npages) for r in got] == [(5, 10), (20, 25)]
        assert got[0].base == a.base + sum(lens(a)[:2]) and lens(got[0]) == lens(a)[2:]
        assert got[1].base == b.base and lens(got[1]) == lens(b)[:5]
        assert got[0].nbytes == sum(lens(got[0]))
        assert lookup(rig, 10, 20) == []
        assert [r.start for r in lookup(rig, 9, 21)] == [9, 20]
        assert [(r.start, r.npages) for r in lookup(rig, 0, 5)] == [(3, 2)]  # first record
        assert [(r.start, r.npages) for r in lookup(rig, 29, 200)] == [(29, 1)]
        assert lookup(rig, 30, 200) == []
        assert lookup(rig, 31, 40) == []  # after the last record
        assert lookup(rig, 4, 4) == []
        with pytest.raises(ValueError):
            rig.svc.lane.lookup(0, 10_000)  # longer than any request
        # get_run gives the whole record, unclipped, for any page inside it
        assert rig.svc.lane.get_run(7) == rig.svc.lane.get_run(3)
        assert RunInfo._make(rig.svc.lane.get_run(7)).start == 3
        assert rig.svc.lane.get_run(10) is None


# ------------------------------------------------------------------------ record size, joining


async def test_joining_stops_at_join_below_and_records_stay_within_max_run() -> None:
    """Sequential small writes join into one record up to JOIN_BELOW pages; large writes
    are never joined further. No record exceeds MAX_RUN (it is the map's value bound)."""
    async with open_lane(size=16 << 20, mem="8M", disk=None) as rig:
        for p in range(150):
            await rig.client.write(p * PAGE, compressible(1, seed=p))
        assert spans(rig) == [(0, 64), (64, 128), (128, 150)]
        await rig.client.write(1000 * PAGE, compressible(63, seed=1))
        await rig.client.write(1063 * PAGE, compressible(256, seed=2))  # joins the 63
        await rig.client.write(1319 * PAGE, compressible(256, seed=3))  # does not join 319
        assert spans(rig)[3:] == [(1000, 1319), (1319, 1575)]
        runs = check_ledger(rig)
        assert max(r.npages for r in runs) == 319 <= _lane.MAX_RUN


async def test_contiguous_neighbours_join() -> None:
    async with open_lane(size=16 << 20, mem="8M", disk="16M") as rig:
        c = rig.client
        await c.write(0, compressible(4, seed=1))
        (a,) = all_runs(rig)
        await c.write(4 * PAGE, compressible(4, seed=2))  # packed right behind: one record
        (ab,) = all_runs(rig)
        assert (ab.start, ab.npages, ab.base) == (0, 8, a.base)
        assert lens(ab)[:4] == lens(a) and ab.nbytes == sum(lens(ab))
        assert ab.gen != a.gen  # the join is a publish: a new generation for the record
        assert ab.epoch >= a.epoch
        assert rig.stats().runs == 1
        # not contiguous in bytes: apart
        await filler(rig)
        await c.write(8 * PAGE, compressible(1, seed=3))
        assert spans(rig)[:2] == [(0, 8), (8, 9)]
        # another tier: apart
        rig.svc.lane.set_draining(0, True)
        await c.write(9 * PAGE, compressible(1, seed=4))
        rig.svc.lane.set_draining(0, False)
        assert [(r.start, r.tier) for r in lookup(rig, 8, 10)] == [(8, 0), (9, 1)]
        # zero runs join too, also with the remainder of a cut zero run
        await c.write(100 * PAGE, bytes(PAGE))
        await c.write(101 * PAGE, bytes(2 * PAGE))
        await c.write(102 * PAGE, bytes(PAGE))
        assert [(r.start, r.npages, r.tier) for r in lookup(rig, 100, 103)] == [
            (100, 3, ZERO_TIER)]
        check_ledger(rig)


async def test_no_join_across_a_segment_boundary() -> None:
    async with open_lane(size=16 << 20, mem="8M", disk=None) as rig:
        c = rig.client
        raw = [os.urandom(PAGE) for _ in range(257)]
        await c.write(1000 * PAGE, b"".join(raw[:200]))  # fills segment 0 up to 200 pages
        await c.write(0, b"".join(raw[200:256]))  # pages 0..55 end exactly at 1 MiB
        await c.write(56 * PAGE, raw[256])  # starts segment 1: numerically contiguous
        left, right = lookup(rig, 0, 57)
        assert left.base + left.nbytes == right.base == 1 << 20
        assert (left.npages, right.npages) == (56, 1)
        check_ledger(rig)


# ------------------------------------------------------------------------ generations


async def test_generations() -> None:
    async with open_lane() as rig:
        c = rig.client
        gens = set()
        for i in range(20):  # every publish gets a generation no record has
            await c.write(i * 4 * PAGE, compressible(4, seed=i))
            await filler(rig)
            g = lookup(rig, i * 4, i * 4 + 1)[0].gen
            assert g not in gens
            gens.add(g)
        (r,) = lookup(rig, 8, 12)
        await c.punch(9 * PAGE, PAGE)
        assert {x.gen for x in lookup(rig, 8, 12)} == {r.gen}  # remainders keep theirs
        await c.write(9 * PAGE, compressible(1, seed=99))
        assert lookup(rig, 9, 10)[0].gen not in gens | {r.gen}
        # a move publishes too
        (m,) = lookup(rig, 0, 4)
        assert await rig.svc.move(m, [1]) == 4
        (moved,) = lookup(rig, 0, 4)
        assert moved.tier == 1 and moved.gen != m.gen


# ------------------------------------------------------------------------ compare-and-swap


async def start_move(rig: LaneRig, run: RunInfo, to: int):
    """A move stopped just before its commit: source copied, destination written."""
    mv = rig.svc.lane.move(run.start, run.gen)
    assert mv is not None
    if mv.store:
        data = await rig.svc.tiers[run.tier].read(run.base, run.nbytes)
        with memoryview(mv) as buf:
            buf[:] = data
    ops = mv.allocate([to])
    assert ops is not None
    with memoryview(mv) as buf:
        for tier, base, length, offset, life in ops:
            with buf[offset : offset + length] as piece:  # released now, as lane.py does:
                # commit() refuses while the move's buffer is exported
                await rig.svc.tiers[tier].write(base, piece, life)
    return mv


async def test_move_publishes_with_compare_and_swap() -> None:
    async with open_lane() as rig:
        data = pages(KINDS10)
        await rig.client.write(0, data)
        (run,) = all_runs(rig)
        mv = await start_move(rig, run, 1)
        assert mv.commit() is True
        (moved,) = all_runs(rig)
        assert (moved.tier, moved.start, moved.npages) == (1, 0, 10)
        assert lens(moved) == lens(run) and moved.epoch == run.epoch
        assert moved.base % PAGE == 0  # the file tier's alignment
        st = rig.stats()
        assert st.tiers[0].pages == 0 and st.tiers[1].pages == 7
        assert st.tiers[1].demotions == 7 and st.tiers[1].bytes_moved == run.nbytes
        assert await rig.client.read(0, len(data)) == data
        # the caller's view is stale now: a second move of the old record is refused
        assert rig.svc.lane.move(run.start, run.gen) is None
        check_ledger(rig)


@pytest.mark.parametrize("change", ["overwrite", "same_bytes", "cut_tail", "cut_head",
                                    "discard", "partial_write", "join"])
async def test_move_refused_after_any_change(change: str) -> None:
    async with open_lane() as rig:
        c = rig.client
        data = compressible(3)
        await c.write(0, data)
        (run,) = all_runs(rig)
        mv = await start_move(rig, run, 1)
        model = bytearray(data)
        if change == "overwrite":
            new = compressible(3, seed=5)
            await c.write(0, new)
            model[:] = new
        elif change == "same_bytes":  # the same content again: new place, new generation
            await c.write(0, data)
        elif change == "cut_tail":
            await c.punch(2 * PAGE, PAGE)
            model[2 * PAGE :] = bytes(PAGE)
        elif change == "cut_head":
            await c.punch(0, PAGE)
            model[:PAGE] = bytes(PAGE)
        elif change == "discard":
            await c.punch(0, 3 * PAGE)
            model[:] = bytes(3 * PAGE)
        elif change == "partial_write":
            await c.write(PAGE + 512, b"y" * 512)
            model[PAGE + 512 : PAGE + 1024] = b"y" * 512
        else:  # a write right behind it joins the record (same start, new generation)
            await c.write(3 * PAGE, compressible(1, seed=6))
            model += compressible(1, seed=6)
        before = all_runs(rig)
        assert mv.commit() is False
        assert all_runs(rig) == before
        assert all(r.tier in (0, ZERO_TIER) for r in before)
        st = rig.stats()
        assert st.tiers[1].pages == 0 and st.tiers[1].stored_bytes == 0  # allocation returned
        assert st.tiers[1].demotions == 0
        assert await c.read(0, len(model)) == bytes(model)
        check_ledger(rig)


async def test_move_needs_the_record_as_it_is() -> None:
    async with open_lane() as rig:
        await rig.client.write(0, compressible(4))
        await rig.client.write(10 * PAGE, bytes(4 * PAGE))
        (run, zero) = all_runs(rig)
        lane = rig.svc.lane
        assert lane.move(run.start, run.gen ^ 1) is None  # another generation
        assert lane.move(run.start + 1, run.gen) is None  # not the start of a record
        assert lane.move(50, run.gen) is None  # nothing there
        assert zero.tier == ZERO_TIER and lane.move(zero.start, zero.gen) is None
        mv = lane.move(run.start, run.gen)
        assert mv is not None and RunInfo._make(mv.run) == run and mv.nbytes == run.nbytes
        mv.abort()
        with pytest.raises(_lane.LaneError):
            mv.commit()


# ------------------------------------------------------------------------ touch, epoch, scan


async def test_touch_and_epoch() -> None:
    async with open_lane() as rig:
        lane = rig.svc.lane
        boot = int(time.clock_gettime(time.CLOCK_BOOTTIME))
        assert abs(lane.epoch() - boot) <= 1  # coarse CLOCK_BOOTTIME seconds
        await rig.client.write(0, compressible(4))
        (run,) = all_runs(rig)
        assert abs(run.epoch - lane.epoch()) <= 1  # a write sets the epoch
        assert lane.touch(run.start, run.gen, 1234) is True
        (t,) = all_runs(rig)
        assert t.epoch == 1234 and t._replace(epoch=run.epoch) == run  # nothing else changed
        assert lane.touch(run.start, run.gen ^ 1, 99) is False  # another generation
        assert lane.touch(run.start + 1, run.gen, 99) is False  # not a record start
        assert lane.touch(77, run.gen, 99) is False  # nothing there
        assert all_runs(rig)[0].epoch == 1234


async def test_scan_slices_filters_and_cursor() -> None:
    async with open_lane(size=16 << 20) as rig:
        c = rig.client
        for i in range(10):
            await c.write(i * 8 * PAGE, compressible(2, seed=i))
        rig.svc.lane.set_draining(0, True)
        for i in range(10, 13):
            await c.write(i * 8 * PAGE, compressible(2, seed=i))  # tier 1
        rig.svc.lane.set_draining(0, False)
        every = all_runs(rig)
        assert [r.start for r in every] == [i * 8 for i in range(13)]
        lane = rig.svc.lane
        got, cursor, done = lane.scan(-1, 0, 0xFFFFFFFF, 3)
        assert [t[0] for t in got] == [0, 8, 16] and cursor == 24 and not done
        got, cursor, done = lane.scan(1, 0, 0xFFFFFFFF, 3)  # the budget counts records seen
        assert got == [] and cursor == 24 and not done
        got, cursor, done = lane.scan(1, 0)
        assert [t[0] for t in got] == [80, 88, 96] and done
        assert [r.start for r in all_runs(rig, 0)] == [i * 8 for i in range(10)]
        lane.touch(16, every[2].gen, 5)
        assert [t[0] for t in lane.scan(-1, 0, 5)[0]] == [16]  # only records this old
        assert [r.start async for r in rig.svc.runs(-1, budget=2)] == [r.start for r in every]


async def test_statistics() -> None:
    async with open_lane(size=16 << 20, mem="8M", disk=None) as rig:
        empty = rig.svc.lane.statistics()
        assert empty["runs"] == 0 and empty["map_size"] == map_size_for(rig.size)
        for i in range(300):  # 300 records: nothing joins across the gaps
            await rig.client.write(i * 2 * PAGE, page_content(i, "text"))
        st = rig.svc.lane.statistics()
        assert st["runs"] == 300 == rig.stats().runs
        assert st["map_bytes"] > empty["map_bytes"] and st["map_bytes"] % 4096 == 0
        assert st["map_bytes"] <= st["map_high_water"] < st["map_size"]
        await rig.client.punch(0, 600 * PAGE)
        assert rig.svc.lane.statistics()["runs"] == 0


# ------------------------------------------------------------------------ the record format

HDR = struct.Struct("<BBHIQ")  # tier, flags, npages, epoch, base | gen << 48


async def test_records_decode_as_documented() -> None:
    """map.c's docstring is the format: check it with another LMDB implementation."""
    async with open_lane(size=16 << 20, mem="4M", disk="16M") as rig:
        c = rig.client
        await c.write_all(0, mixed_bytes(3, 2 << 20))  # zero runs, cut runs ...
        await c.write_all(2 << 20, os.urandom(6 << 20))  # ... and both tiers
        await c.punch(100 * PAGE + 7, 50 * PAGE)
        await c.write(300 * PAGE + 100, b"z" * 9000)
        await c.write(2000 * PAGE, bytes(8 * PAGE))
        want = all_runs(rig)
        assert {r.tier for r in want} == {0, 1, ZERO_TIER}
        rig.svc.lane.close()  # LMDB is never open twice in one process
        path = f"/proc/self/fd/{rig.kit.fds['map']}"
        env = lmdb.open(path, subdir=False, lock=False, readonly=True, max_dbs=1)
        try:
            db = env.open_db(b"runs", create=False)
            got = []
            with env.begin(db=db) as txn:
                for key, value in txn.cursor():
                    (start,) = struct.unpack(">Q", key)
                    tier, flags, npages, epoch, bg = HDR.unpack_from(value)
                    assert len(value) == HDR.size + 2 * npages
                    lens_b = value[HDR.size :]
                    ls = struct.unpack(f"<{npages}H", lens_b)
                    got.append(RunInfo(start, npages, tier, bg & ((1 << 48) - 1), bg >> 48,
                                       epoch, sum(ls), flags, sum(1 for x in ls if x),
                                       bytes(lens_b)))
        finally:
            env.close()
        assert got == want


# ------------------------------------------------------------------------ against a model

OP = st.tuples(st.sampled_from(["write", "write", "discard", "move"]),
               st.integers(0, 700), st.integers(1, 256), st.integers(0, 1 << 20),
               st.sampled_from([0, 0, 0, 100, 2048]))


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(OP, min_size=1, max_size=25))
async def test_map_against_a_model(ops) -> None:
    """After any writes, discards and moves: pages outside what an operation touched keep
    their exact place (tier, address, length); pages it wrote are mapped, discarded ones are
    not; lookups agree with the records; and the books agree with the map."""
    async with open_lane(size=4 << 20, mem="4M", disk="16M") as rig:
        c = rig.client
        npages = rig.size // PAGE
        for kind, first, n, seed, skew in ops:
            n = min(n, npages - first)
            before = by_page(all_runs(rig))
            off, length = first * PAGE + skew, n * PAGE - skew
            touched = range(first, first + n)
            if kind == "write":
                await c.write(off, mixed_bytes(seed, length))
            elif kind == "discard":
                await c.punch(off, length)
                whole = range(-(-off // PAGE), (off + length) // PAGE)
            else:
                runs = [r for r in all_runs(rig) if r.tier != ZERO_TIER]
                if not runs:
                    continue
                run = runs[seed % len(runs)]
                touched = range(run.start, run.start + run.npages)
                with contextlib.suppress(NoRoom):
                    await rig.svc.move(run, [seed % 2])
            after = by_page(check_ledger(rig))
            for p in set(before) | set(after):
                if p not in touched:
                    assert after.get(p) == before.get(p), f"{kind}: page {p} changed"
            if kind == "write":
                assert all(p in after for p in touched)
            elif kind == "discard":
                assert not any(p in after for p in whole)
            else:
                assert all(after[p][2] == before[p][2] for p in touched)  # bytes as stored
            a, b = sorted((first, min(npages, first + seed % 250)))
            clipped = {p: v for p, v in after.items() if a <= p < b}
            assert by_page(lookup(rig, a, b)) == clipped


# ------------------------------------------------------------------------ reopening


async def test_reopened_map_is_adopted_and_a_fresh_one_is_empty(tmp_path) -> None:
    """A lane built over a kit that already holds a map adopts it: the same records, and the
    spaces rebuilt from them (live bytes per segment, free set). A fresh lane over the same
    memfd starts empty (the old device's `reopen truncates`)."""
    from tierswap.kit import Kit

    kit = Kit()
    try:
        async with open_lane(size=16 << 20, mem="4M", disk="16M", kit=kit, tmp=tmp_path) as rig:
            data = mixed_bytes(5, 2 << 20) + os.urandom(4 << 20)  # both tiers
            await rig.client.write_all(0, data)
            await rig.client.punch(300 * PAGE, 40 * PAGE)
            want = all_runs(rig)
            want_space = [rig.svc.lane.segments(t)[:2] for t in (0, 1)]
            want_books = [(t.pages, t.zero_pages, t.stored_bytes) for t in rig.stats().tiers]
        async with open_lane(size=16 << 20, mem="4M", disk="16M", kit=kit, tmp=tmp_path) as rig:
            assert all_runs(rig) == want
            assert [rig.svc.lane.segments(t)[:2] for t in (0, 1)] == want_space
            assert [(t.pages, t.zero_pages, t.stored_bytes)
                    for t in rig.stats().tiers] == want_books
            check_ledger(rig)
            model = bytearray(data)
            model[300 * PAGE : 340 * PAGE] = bytes(40 * PAGE)
            assert await rig.client.read_all(0, len(data)) == bytes(model)
        lane = _lane.Lane(fds=[0], size=16 << 20, map_path=f"/proc/self/fd/{kit.fds['map']}",
                          map_size=map_size_for(16 << 20), fresh=True,
                          tiers=[{"kind": "store", "nseg": 16}])
        try:
            assert lane.scan(-1, 0)[0] == [] and lane.statistics()["runs"] == 0
        finally:
            lane.close()
    finally:
        kit.close()
