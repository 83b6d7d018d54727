"""Segment spaces (tierswap/native/space.c) through the lane: packing, segment bounds, the
file tier's alignment, prefix placement and spill, zero pages, freeing by live count,
lowest-free-first reuse, read guards (pins) that hold retired segments, draining and the
free-extent statistics.

Raw (incompressible) pages are 4096 stored bytes each, so a 1 MiB segment holds exactly 256 of
them and the arithmetic stays visible. Pins are taken with Move objects (`lane.move`), which
hold one on the record's tier from `move()` until commit or abort, like any reader.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lane.fuseproto import FuseError
from tests.lane.harness import (
    PAGE,
    LaneRig,
    all_runs,
    check_ledger,
    lens,
    lookup,
    open_lane,
    page_content,
)
from tierswap import _lane
from tierswap.lane import ZERO_TIER, RunInfo

SEG = 1 << 20
PER_SEG = SEG // PAGE  # raw pages per segment


def raw(n: int) -> bytes:
    return os.urandom(n * PAGE)


def text(n: int, seed: int = 0) -> bytes:
    return b"".join(page_content(seed * 1000 + i, "text") for i in range(n))


def space(rig: LaneRig, tier: int = 0) -> tuple[np.ndarray, set[int], int]:
    """(live bytes per usable segment, free segments, open segment or -1)."""
    live_b, free_b, open_seg = rig.svc.lane.segments(tier)
    free = {int(s) for s in np.flatnonzero(np.frombuffer(free_b, np.uint8))}
    return np.frombuffer(live_b, np.int64), free, open_seg


def tstats(rig: LaneRig, tier: int = 0) -> dict:
    return rig.svc.lane.statistics()["tiers"][tier]


def segs(runs: list[RunInfo]) -> list[int]:
    return [r.base >> 20 for r in runs]


# ------------------------------------------------------------------------ allocation


async def test_packs_back_to_back() -> None:
    async with open_lane(disk=None) as rig:
        await rig.client.write(0, text(3))
        await rig.client.write(100 * PAGE, text(1, seed=1))
        a, b = all_runs(rig)
        assert (a.base, b.base) == (0, a.nbytes)  # no rounding between requests
        live, free, open_seg = space(rig)
        assert live[0] == a.nbytes + b.nbytes and open_seg == 0 and free == {1, 2, 3}
        assert tstats(rig)["free_bytes"] == 4 * SEG - a.nbytes - b.nbytes
        assert tstats(rig)["live_bytes"] == a.nbytes + b.nbytes


async def test_a_request_never_straddles_a_segment() -> None:
    async with open_lane(disk=None) as rig:
        await rig.client.write(1000 * PAGE, raw(PER_SEG - 1))  # one page of room left
        # a small page fits, the raw one after it does not, and the small one after that must
        # not be placed before it: the rest of the request starts the next segment
        await rig.client.write(0, text(1) + raw(1) + text(1, seed=1))
        first, rest = lookup(rig, 0, 3)
        assert (first.start, first.npages, first.base) == (0, 1, (PER_SEG - 1) * PAGE)
        assert (rest.start, rest.npages, rest.base) == (1, 2, SEG)
        assert space(rig)[2] == 1
        check_ledger(rig)  # every record inside one segment


async def test_file_tier_aligns_each_request() -> None:
    async with open_lane(mem=None, disk="16M") as rig:
        c = rig.client
        await c.write(0, text(1))
        await c.write(10 * PAGE, text(1, seed=1))
        await c.write(20 * PAGE, raw(1) + text(1, seed=2))
        await c.write(30 * PAGE, text(1, seed=3))
        runs = all_runs(rig)
        assert [r.base for r in runs] == [0, PAGE, 2 * PAGE, 4 * PAGE]
        assert all(r.nbytes % PAGE for r in runs)  # none of them a whole number of blocks
        st = tstats(rig)
        assert st["live_bytes"] == sum(r.nbytes for r in runs)  # stored bytes, not padding
        assert st["free_bytes"] == 16 * SEG - 5 * PAGE  # padding is room nobody gets
        assert await c.read(20 * PAGE, 2 * PAGE) != bytes(2 * PAGE)


async def test_prefix_placement_then_spill_to_the_next_tier() -> None:
    async with open_lane(size=16 << 20, mem="4M", disk="16M") as rig:
        data = raw(1500)
        for off in range(0, 1500, 200):  # the tier boundary falls inside a request
            await rig.client.write(off * PAGE, data[off * PAGE : (off + 200) * PAGE])
        st = rig.stats()
        assert (st.tiers[0].pages, st.tiers[1].pages) == (1024, 476)
        assert st.tiers[0].stored_bytes == 4 * SEG and st.tiers[0].free_bytes == 0
        for r in all_runs(rig):  # in order: the first pages where there was room first
            assert r.tier == (0 if r.start < 1024 else 1), r
        assert await rig.client.read_all(0, len(data)) == data
        check_ledger(rig)


async def test_zero_pages_take_no_room() -> None:
    async with open_lane(disk=None) as rig:
        c = rig.client
        await c.write(1000 * PAGE, raw(PER_SEG - 1))
        before = tstats(rig)["free_bytes"]
        t = text(1)
        await c.write(0, bytes(2 * PAGE) + t + bytes(PAGE))  # zero, zero, text, zero
        (r,) = lookup(rig, 0, 4)
        assert r.npages == 4 and r.base == (PER_SEG - 1) * PAGE  # still segment 0
        (n,) = [x for x in lens(r) if x]
        assert lens(r) == [0, 0, n, 0] and tstats(rig)["free_bytes"] == before - n
        # every byte taken: zeros are still accepted, anything else is not
        p = 1100
        while (room := tstats(rig)["free_bytes"] // PAGE) > 0:
            await c.write(p * PAGE, raw(min(256, room)))
            p += min(256, room)
        await c.write(10 * PAGE, bytes(64 * PAGE))
        assert lookup(rig, 10, 74)[0].tier == ZERO_TIER
        with pytest.raises(FuseError) as ei:
            await c.write(100 * PAGE, bytes(PAGE) + raw(1))
        assert ei.value.errno == errno.ENOSPC
        check_ledger(rig)


# ------------------------------------------------------------------------ freeing, reuse


async def test_release_returns_empty_segments() -> None:
    async with open_lane(disk=None) as rig:
        c = rig.client
        await c.write(0, raw(PER_SEG))  # fills and closes segment 0
        await c.write(500 * PAGE, raw(1))  # segment 1, open
        live, free, open_seg = space(rig)
        assert free == {2, 3} and open_seg == 1
        await c.punch(0, PER_SEG * PAGE)
        live, free, open_seg = space(rig)
        assert free == {0, 2, 3} and live[0] == 0
        # the open segment is not freed while it is open, even when empty ...
        await c.punch(500 * PAGE, PAGE)
        live, free, open_seg = space(rig)
        assert free == {0, 2, 3} and open_seg == 1 and tstats(rig)["live_bytes"] == 0
        # ... but once it is closed it is free again
        rig.svc.lane.set_draining(0, True)
        rig.svc.lane.set_draining(0, False)
        live, free, open_seg = space(rig)
        assert free == {0, 1, 2, 3} and open_seg == -1
        await c.write(0, raw(1))
        assert all_runs(rig)[0].base == 0  # lowest free first


async def test_partial_release_keeps_the_segment() -> None:
    async with open_lane(disk=None) as rig:
        await rig.client.write(0, raw(PER_SEG))
        await rig.client.punch(0, 128 * PAGE)
        live, free, _ = space(rig)
        assert live[0] == 128 * PAGE and 0 not in free
        await rig.client.punch(128 * PAGE, 128 * PAGE)
        live, free, _ = space(rig)
        assert live[0] == 0 and 0 in free


async def test_lowest_free_segment_first() -> None:
    async with open_lane(disk=None) as rig:
        c = rig.client
        for s in range(4):  # segments 0..3 full and closed, one record each
            await c.write(s * PER_SEG * PAGE, raw(PER_SEG))
        assert segs(all_runs(rig)) == [0, 1, 2, 3] and space(rig)[1] == set()
        await c.punch(2 * PER_SEG * PAGE, PER_SEG * PAGE)  # freed first ...
        await c.punch(1 * PER_SEG * PAGE, PER_SEG * PAGE)  # ... but lower
        assert space(rig)[1] == {1, 2}
        await c.write(1500 * PAGE, raw(256))
        await c.write(1756 * PAGE, raw(44))
        assert segs(lookup(rig, 1500, 1756) + lookup(rig, 1756, 1800)) == [1, 2]
        check_ledger(rig)


async def test_freed_segments_are_reused() -> None:
    async with open_lane(disk=None) as rig:
        c = rig.client
        await c.write_all(0, raw(1024))
        await c.punch(0, 1024 * PAGE)
        assert space(rig)[1] == {0, 1, 2, 3} and rig.stats().stored_pages == 0
        data = raw(1024)
        await c.write_all(1024 * PAGE, data)
        assert sorted(set(segs(all_runs(rig)))) == [0, 1, 2, 3]
        assert tstats(rig)["free_bytes"] == 0
        with pytest.raises(FuseError) as ei:
            await c.write(0, raw(1))
        assert ei.value.errno == errno.ENOSPC
        assert await c.read_all(1024 * PAGE, len(data)) == data


# ------------------------------------------------------------------------ read guards


async def full_segments(rig: LaneRig, n: int) -> list[RunInfo]:
    """n records of one closed, full segment each (segments 0..n-1)."""
    for s in range(n):
        await rig.client.write(s * PER_SEG * PAGE, raw(PER_SEG))
    runs = all_runs(rig)
    assert segs(runs) == list(range(n))
    return runs


async def test_a_pin_keeps_a_retired_segment_out_of_reuse() -> None:
    async with open_lane(disk=None) as rig:
        c, lane = rig.client, rig.svc.lane
        (a,) = await full_segments(rig, 1)
        await c.write(1500 * PAGE, raw(3))  # segment 1, open, 253 pages of room
        mv = lane.move(a.start, a.gen)  # a reader of segment 0 is in flight
        await c.punch(0, PER_SEG * PAGE)
        live, free, _ = space(rig)
        assert live[0] == 0 and free == {2, 3}
        st = tstats(rig)
        assert (st["guards"], st["retiring"], st["free_segments"]) == (1, 1, 2)
        # nothing is placed in segment 0 while the pin lives
        await c.write(1000 * PAGE, raw(256))
        await c.write(1256 * PAGE, raw(44))
        assert segs(lookup(rig, 1000, 1256) + lookup(rig, 1256, 1300)) == [1, 2, 2]
        assert 0 not in segs(all_runs(rig))
        mv.abort()  # the reader is done
        st = tstats(rig)
        assert (st["guards"], st["retiring"]) == (0, 0) and 0 in space(rig)[1]
        lane.set_draining(0, True)  # close segment 2: the next one opened is ...
        lane.set_draining(0, False)
        await c.write(0, raw(1))
        assert segs(lookup(rig, 0, 1)) == [0]  # ... segment 0 again
        check_ledger(rig)


async def test_a_pin_taken_after_the_retirement_does_not_hold_it() -> None:
    async with open_lane(disk=None) as rig:
        lane = rig.svc.lane
        a, b = await full_segments(rig, 2)
        old = lane.move(a.start, a.gen)
        await rig.client.punch(0, PER_SEG * PAGE)  # segment 0 retired under `old`
        new = lane.move(b.start, b.gen)  # began after: it cannot target segment 0
        assert 0 not in space(rig)[1]
        old.abort()
        assert 0 in space(rig)[1]  # `new` does not hold it
        new.abort()
        assert space(rig)[1] == {0, 2, 3}


async def test_a_newer_pin_holds_only_later_retirements() -> None:
    async with open_lane(disk=None) as rig:
        lane, c = rig.svc.lane, rig.client
        a, _b, cc = await full_segments(rig, 3)
        p1 = lane.move(a.start, a.gen)
        await c.punch(0, PER_SEG * PAGE)  # segment 0 retires under p1
        p2 = lane.move(cc.start, cc.gen)
        await c.punch(PER_SEG * PAGE, PER_SEG * PAGE)  # segment 1 retires under p1 and p2
        p1.abort()
        free = space(rig)[1]
        assert 0 in free and 1 not in free
        p2.abort()
        assert {0, 1} <= space(rig)[1]


async def test_pins_of_one_generation_are_counted() -> None:
    async with open_lane(disk=None) as rig:
        lane = rig.svc.lane
        a, b, cc = await full_segments(rig, 3)
        p1, p2 = lane.move(a.start, a.gen), lane.move(b.start, b.gen)  # same generation
        await rig.client.punch(2 * PER_SEG * PAGE, PER_SEG * PAGE)
        assert tstats(rig)["guards"] == 1  # one guard entry, counted twice
        p1.abort()
        assert 2 not in space(rig)[1]
        p2.abort()
        assert 2 in space(rig)[1]
        assert cc.tier == 0
        # moves are bounded: two at a time
        m1, m2 = lane.move(a.start, a.gen), lane.move(b.start, b.gen)
        with pytest.raises(_lane.LaneError):
            lane.move(a.start, a.gen)
        m1.abort()
        m2.abort()


# ------------------------------------------------------------------------ draining


async def test_draining_refuses_allocation() -> None:
    async with open_lane(mem="4M", disk="16M") as rig:
        c, lane = rig.client, rig.svc.lane
        await c.write(0, text(10))
        live0 = tstats(rig)["live_bytes"]
        lane.set_draining(0, True)
        st = tstats(rig)
        assert st["draining"] == 1 and space(rig)[2] == -1  # the open segment was closed
        await c.write(100 * PAGE, text(10, seed=1))
        assert {r.tier for r in lookup(rig, 100, 110)} == {1}
        assert tstats(rig)["live_bytes"] == live0
        lane.set_draining(0, False)
        await c.write(200 * PAGE, text(10, seed=2))
        (r,) = lookup(rig, 200, 210)
        assert r.tier == 0 and r.base >> 20 == 1  # a new segment: 0 was closed
    async with open_lane(disk=None) as rig:
        rig.svc.lane.set_draining(0, True)
        with pytest.raises(FuseError) as ei:  # no other tier: no room anywhere
            await rig.client.write(0, text(1))
        assert ei.value.errno == errno.ENOSPC
        await rig.client.write(0, bytes(PAGE))  # zeros need no room
        rig.svc.lane.set_draining(0, False)
        await rig.client.write(0, text(1))


# ------------------------------------------------------------------------ statistics


async def test_free_extent_statistics() -> None:
    async with open_lane(size=8 << 20, mem="8M", disk=None) as rig:
        await full_segments(rig, 8)
        st = tstats(rig)
        assert (st["free_segments"], st["free_extents"], st["largest_free_extent"]) == (0, 0, 0)
        for s in (1, 2, 5, 7):
            await rig.client.punch(s * PER_SEG * PAGE, PER_SEG * PAGE)
        st = tstats(rig)
        assert st["free_segments"] == 4 and st["free_extents"] == 3  # {1, 2}, {5}, {7}
        assert st["largest_free_extent"] == 2 * SEG
        assert st["live_bytes"] == 4 * SEG == st["free_bytes"]
        assert (st["segments"], st["capacity_segments"]) == (8, 8)
        await rig.client.punch(6 * PER_SEG * PAGE, PER_SEG * PAGE)
        st = tstats(rig)
        assert st["free_extents"] == 2 and st["largest_free_extent"] == 3 * SEG
        t = rig.stats().tiers[0]
        assert (t.free_extents, t.largest_free_extent, t.free_segments) == (2, 3 * SEG, 5)


# ------------------------------------------------------------------------ model

SPACE_OPS = st.lists(st.tuples(st.sampled_from(["write", "write", "discard", "empty", "pin",
                                                "unpin"]),
                               st.integers(0, 900), st.integers(1, 256),
                               st.sampled_from(["raw", "raw", "text", "zero"])),
                     min_size=1, max_size=30)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=SPACE_OPS)
async def test_space_against_a_model(ops) -> None:
    """Random writes, discards and pins: the books always follow from the records, and a
    segment that empties while a pin is alive is never reused before the pin ends."""
    async with open_lane(size=4 << 20, mem="4M", disk="16M") as rig:
        c, lane = rig.client, rig.svc.lane
        npages = rig.size // PAGE
        pins: list = []
        held: set[int] = set()  # segments of tier 0 emptied while a pin was alive
        await c.write_all(0, raw(600))  # segments 0 and 1 full, 2 open
        for kind, first, n, content in ops:
            n = min(n, npages - first)
            live0, _free0, open0 = space(rig)
            if kind == "write":
                data = raw(n) if content == "raw" else text(n) if content == "text" \
                    else bytes(n * PAGE)
                await c.write(first * PAGE, data)
            elif kind == "discard":
                await c.punch(first * PAGE, n * PAGE)
            elif kind == "empty":  # discard every record of one segment of tier 0
                runs = [r for r in all_runs(rig, 0) if r.nbytes]
                if runs:
                    seg = runs[first % len(runs)].base >> 20
                    for r in runs:
                        if r.base >> 20 == seg:
                            await c.punch(r.start * PAGE, r.npages * PAGE)
            elif kind == "pin":
                runs = [r for r in all_runs(rig, 0) if r.nbytes]
                if runs and len(pins) < 2:
                    r = runs[first % len(runs)]
                    pins.append(lane.move(r.start, r.gen))
            else:
                for mv in pins:
                    mv.abort()
                pins.clear()
                free = space(rig)[1]
                assert held <= free, "a held segment did not come back"
                held.clear()
            runs = check_ledger(rig)
            live, free, open_seg = space(rig)
            if pins:  # emptied (or closed empty) now: retired while the pins live
                held |= {s for s in range(len(live)) if live[s] == 0 and s != open_seg
                         and (live0[s] > 0 or s == open0)}
            assert not held & free, "a segment came free under a pin"
            assert not held & {r.base >> 20 for r in runs if r.tier == 0 and r.nbytes}, \
                "reused a segment under a pin"
        for mv in pins:
            mv.abort()
