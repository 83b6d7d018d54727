"""The lane against a plain bytearray: random operations, concurrent writers at 512-byte
granularity, discards, and moves racing foreground I/O.

The device is small and its RAM tier smaller than what the tests write, so pages spill to the
file tier and requests go both ways: natively (RAM) and through trio (the file store).
"""

from __future__ import annotations

import itertools
import random

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lane.harness import PAGE, mixed_bytes, open_lane
from tierswap.lane import NoRoom

SECTOR = 512
DEV = 16 << 20  # virtual bytes: four times the RAM tier


async def check_all(rig, model: bytearray) -> None:
    c = rig.client
    step = 256 << 10
    for off in range(0, len(model), step):
        got = await c.read(off, step)
        assert got == bytes(model[off:off + step]), f"mismatch in [{off}, {off + step})"


def check_books(rig, model: bytearray) -> None:
    """The lane's own accounting agrees with the model: one stored page per non-zero page."""
    st_ = rig.stats()
    nonzero = sum(1 for p in range(0, len(model), PAGE) if any(model[p:p + PAGE]))
    assert st_.stored_pages == nonzero
    assert st_.read_errors == st_.write_errors == st_.corrupt == 0


ops = st.lists(
    st.tuples(st.sampled_from(["write", "write", "write", "read", "discard"]),
              st.integers(0, DEV // SECTOR - 1), st.integers(1, 128), st.integers(0, 1 << 30)),
    min_size=1, max_size=40)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=ops)
async def test_random_operations_match_the_model(ops):
    async with open_lane(size=DEV, mem="4M", disk="32M") as rig:
        c = rig.client
        model = bytearray(DEV)
        for kind, sector, nsec, seed in ops:
            off = sector * SECTOR
            n = min(nsec * SECTOR, DEV - off)
            if kind == "write":
                data = mixed_bytes(seed, n)
                await c.write(off, data)
                model[off:off + n] = data
            elif kind == "discard":
                await c.punch(off, n)
                model[off:off + n] = bytes(n)
            else:
                assert await c.read(off, n) == bytes(model[off:off + n])
        await check_all(rig, model)
        check_books(rig, model)


async def test_concurrent_subpage_writers_never_lose_a_write():
    """Many writers of disjoint 512-byte-aligned ranges that share pages, all in flight at
    once, with discards of other disjoint ranges and readers elsewhere: every byte lands."""
    rng = random.Random(42)
    async with open_lane(size=DEV, mem="4M", disk="32M", threads=4) as rig:
        c = rig.client
        model = bytearray(DEV)
        # a background of full pages in both tiers, so edge pages come from RAM and from disk
        base = mixed_bytes(1, DEV)
        await c.write_all(0, base)
        model[:] = base
        for _round in range(60):
            window = rng.randrange(0, DEV // PAGE - 8) * PAGE
            span = 8 * PAGE
            cuts = sorted(rng.sample(range(1, span // SECTOR), rng.randrange(4, 24)))
            bounds = [0, *cuts, span // SECTOR]
            pieces = [(window + a * SECTOR, (b - a) * SECTOR)
                      for a, b in itertools.pairwise(bounds)]
            async with trio.open_nursery() as n:
                for off, length in pieces:
                    if rng.random() < 0.2:
                        n.start_soon(c.punch, off, length)
                        model[off:off + length] = bytes(length)
                    else:
                        data = mixed_bytes(rng.randrange(1 << 30), length)
                        n.start_soon(c.write, off, data)
                        model[off:off + length] = data
                other = (window + span + rng.randrange(0, 64) * PAGE) % (DEV - PAGE)
                n.start_soon(c.read, other, PAGE)
            got = await c.read(window, span)
            assert got == bytes(model[window:window + span]), f"round {_round}: a write was lost"
        await check_all(rig, model)
        check_books(rig, model)
        assert rig.stats().rmw > 0


async def test_overlapping_concurrent_writes_leave_one_of_them_per_sector():
    rng = random.Random(7)
    async with open_lane(size=DEV, mem="4M", disk="32M", threads=4) as rig:
        c = rig.client
        for _round in range(40):
            window = rng.randrange(0, DEV // PAGE - 4) * PAGE
            writes = []
            for _ in range(rng.randrange(2, 6)):
                a = rng.randrange(0, 4 * PAGE // SECTOR)
                b = rng.randrange(a + 1, 4 * PAGE // SECTOR + 1)
                writes.append((window + a * SECTOR, mixed_bytes(rng.randrange(1 << 30),
                                                                (b - a) * SECTOR)))
            before = await c.read(window, 4 * PAGE)
            async with trio.open_nursery() as n:
                for off, data in writes:
                    n.start_soon(c.write, off, data)
            got = await c.read(window, 4 * PAGE)
            for s in range(0, 4 * PAGE, SECTOR):
                cands = [before[s:s + SECTOR]]
                for off, data in writes:
                    o = window + s - off
                    if 0 <= o < len(data):
                        cands.append(data[o:o + SECTOR])
                assert got[s:s + SECTOR] in cands, f"round {_round}: sector {s} is nobody's"
                if len(cands) > 1:  # written by someone: the old bytes cannot survive
                    assert got[s:s + SECTOR] in cands[1:] or cands[0] in cands[1:]


async def test_moves_racing_foreground_io_keep_the_newest_content():
    """A mover keeps moving records between the tiers (and within them, as cleaning does)
    while writers overwrite and discard: the map always ends with the newest content."""
    rng = random.Random(3)
    async with open_lane(size=DEV, mem="8M", disk="32M", threads=3) as rig:
        c, svc = rig.client, rig.svc
        model = bytearray(DEV)
        base = mixed_bytes(2, DEV // 2)
        await c.write_all(0, base)
        model[: len(base)] = base
        stop = trio.Event()
        moved = [0, 0]

        async def mover():
            while not stop.is_set():
                async for run in svc.runs(-1):
                    if stop.is_set():
                        break
                    if run.tier == 255:
                        continue
                    to = [rng.randrange(2)]
                    try:
                        n = await svc.move(run, to)
                    except NoRoom:
                        n = 0
                    moved[0 if n else 1] += 1
                    await trio.sleep(0)

        async def writer(w: int):
            # each writer has a region of its own: concurrent writes to one place may land in
            # either order, and the model could not tell which (the mover races all of them)
            lo, hi = w * DEV // 3 // SECTOR, (w + 1) * DEV // 3 // SECTOR - 64
            for _ in range(400):
                off = rng.randrange(lo, hi) * SECTOR
                n = rng.randrange(1, 64) * SECTOR
                if rng.random() < 0.25:
                    await c.punch(off, n)
                    model[off:off + n] = bytes(n)
                else:
                    data = mixed_bytes(rng.randrange(1 << 30), n)
                    await c.write(off, data)
                    model[off:off + n] = data

        async with trio.open_nursery() as n:
            n.start_soon(mover)
            async with trio.open_nursery() as w:
                for k in range(3):
                    w.start_soon(writer, k)
            stop.set()
        await check_all(rig, model)
        check_books(rig, model)
        assert moved[0] > 50, moved  # moves did happen ...
        assert moved[1] > 0, moved  # ... and some lost the race to a write, as they must


async def test_many_writers_of_one_page_all_land():
    """Sixteen writers of disjoint 256-byte pieces of one page, all at once, round after round:
    every conditional publish but one per round conflicts and starts over, and in the end
    every piece is there (no write lost, none failed)."""
    rng = random.Random(9)
    async with open_lane(size=DEV, mem="4M", disk="32M", threads=4) as rig:
        c, svc = rig.client, rig.svc
        for _round in range(30):
            page = rng.randrange(DEV // PAGE) * PAGE
            # the page starts on the file tier: every writer's read of it waits for trio, so
            # they all read the same old page and all but one must start over
            await c.write(page, rng.randbytes(PAGE))
            for r in [r async for r in svc.runs(0) if r.start == page // PAGE]:
                assert await svc.move(r, [1]) == 1
            pieces = [(page + i * 256, rng.randbytes(256)) for i in range(16)]
            async with trio.open_nursery() as n:
                for off, data in pieces:
                    n.start_soon(c.write, off, data)
            assert await c.read(page, PAGE) == b"".join(d for _o, d in pieces)
        st = rig.stats()
        assert st.rmw_conflicts > 0 and st.write_errors == 0
