"""Moves publish with compare-and-swap: a record rewritten while a move copies it is never
replaced by the stale copy (issue 8, item 1)."""

from __future__ import annotations

import os

import pytest
import trio

from tests.lane.harness import PAGE, open_lane


async def test_move_in_flight_while_its_page_is_discarded_and_rewritten_in_place():
    """The old race: a record moved out of RAM while its page is discarded and rewritten at
    the *same* address with the same stored length. Compare-and-swap on (tier, address,
    lengths) alone would publish the stale copy; the write generation and the move's pin on
    the source segment make the newest content win."""
    async with open_lane(size=16 << 20, mem="8M", disk="16M") as rig:
        c, svc, lane = rig.client, rig.svc, rig.svc.lane
        a, b = os.urandom(PAGE), os.urandom(PAGE)  # incompressible: both stored raw, 4096 B
        await c.write(0, a)  # page 0 -> RAM segment 0, address 0
        filler = os.urandom(300 * PAGE)  # overflows segment 0, so it closes; not adjacent to
        await c.write_all(2 * PAGE, filler)  # page 0, so page 0 stays a record of its own
        (run,) = [r async for r in svc.runs(0) if r.start == 0]
        assert (run.tier, run.base, run.npages) == (0, 0, 1)

        gate = trio.Event()
        disk = svc.tiers[1]
        real_write = disk.write

        async def paused_write(base, data, life):
            await gate.wait()
            await real_write(base, data, life)

        disk.write = paused_write  # type: ignore[method-assign]
        async with trio.open_nursery() as n:
            result = []

            async def mover():
                result.append(await svc.move(run, [1]))

            n.start_soon(mover)
            await trio.sleep(0.1)  # the move has copied page 0 and waits in the disk write
            await c.punch(0, 302 * PAGE)  # segments 0 and 1 hold nothing live now
            lane.set_draining(0, True)  # close the open segment: the next one opened is ...
            lane.set_draining(0, False)  # ... the lowest free one
            await c.write(0, b)  # page 0 again, same stored length
            (again,) = [r async for r in svc.runs(0) if r.start == 0]
            gate.set()
        # the move's pin kept segment 0 out of reuse: the rewrite went elsewhere (without the
        # pin it lands on the old address, and only the generation tells the two apart)
        assert again.base != run.base
        assert result == [0], "the move must lose to the newer write"
        assert await c.read(0, PAGE) == b
        st = rig.stats()
        assert st.stored_pages == 1 and st.tiers[1].pages == 0


async def test_moves_keep_the_books():
    """Moving records back and forth leaves page counts and live bytes exact."""
    async with open_lane(size=16 << 20, mem="8M", disk="16M") as rig:
        c, svc = rig.client, rig.svc
        data = b"".join(os.urandom(64) * 64 for _ in range(512))
        await c.write_all(0, data)
        for to in ([1], [0], [1]):
            async for r in svc.runs(-1):
                if r.tier != 255:
                    assert await svc.move(r, to) == r.npages
        st = rig.stats()
        assert st.tiers[0].pages == 0 and st.tiers[1].pages == 512
        assert st.tiers[0].stored_bytes == 0
        assert await c.read_all(0, len(data)) == data


async def test_a_store_holding_on_to_its_buffer_never_wedges_a_request_or_a_move():
    """A store's write gets a view of the lane's buffer, lent for the call only. A reference
    that outlives the call (trio < 0.34's worker thread kept the function it ran, and so the
    view, until the OS scheduled it again; any store may keep one by accident) must not keep
    the buffer exported: the lane refuses to resume a request or finish a move whose buffer
    is still exported: a LaneError that ended the lane's trio side (the job) or the move."""
    async with open_lane(size=16 << 20, mem="4M", disk="16M") as rig:
        c, svc = rig.client, rig.svc
        disk = svc.tiers[1]
        real_write = disk.write
        kept: list[memoryview] = []

        async def keeping_write(base, data, life):
            await real_write(base, data, life)
            kept.append(data)  # still referenced once the write returned

        disk.write = keeping_write  # type: ignore[method-assign]
        data = os.urandom(1500 * PAGE)  # more than the RAM tier holds: requests spill to disk
        await c.write_all(0, data)
        spilled = len(kept)
        assert spilled and rig.stats().tiers[1].pages > 0
        moved = 0
        async for r in svc.runs(0):  # and moves from RAM to the disk
            if r.tier == 0:
                moved += await svc.move(r, [1])
                break
        assert moved > 0 and len(kept) > spilled
        assert await c.read_all(0, len(data)) == data
        for view in kept:  # what was kept is a released view, not the lane's memory
            with pytest.raises(ValueError, match="released"):
                view.tobytes()
