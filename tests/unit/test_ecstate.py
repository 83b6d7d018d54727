"""An erasure-coded store adopted from a kit after its process died in the middle of a flush
(tierswap/tiers/ecstate.py): the crash image is taken while a write is in flight, before or
after it reached the target, and a new store over that image reads every acknowledged byte,
rebuilds the parity that was staged, and settles the rewritten block either way."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
import trio

from tests.unit.test_erasure import SEG, Targets, blob, running
from tierswap.kit import Kit
from tierswap.kitstate import Layout, claim
from tierswap.tiers.ecseal import FragmentSecrets
from tierswap.tiers.erasure import ErasureStore, Geometry

G = Geometry(4, 2, SEG)
NSEG = 8
SLOTS = G.min_slots(NSEG, 6)


class Hanging(Targets):
    """Targets whose next data write hangs: before it reaches the target ("lost") or after
    ("landed"); `hung` is set then, which is when the test takes its crash image."""

    def __init__(self, n: int, size: int) -> None:
        super().__init__(n, size)
        self.hang: str | None = None
        self.hung = trio.Event()

    async def frag_write(self, t: int, offset: int, data: memoryview) -> bool:
        if self.hang == "lost":
            self.hung.set()
            await trio.sleep_forever()
        ok = await super().frag_write(t, offset, data)
        if self.hang == "landed":
            self.hung.set()
            await trio.sleep_forever()
        return ok


def build(kit: Kit, tg: Targets) -> ErasureStore:
    """The store as RemoteTier makes it: state and secrets in kit memfds, adopted if there."""
    region, state = Layout("ec-test", ErasureStore.fields(G, NSEG, 6)).open(kit, "state.0")
    assert region is not None
    sreg = claim(kit, "secrets.0", FragmentSecrets.nbytes(NSEG, 6, G.fblocks), "test",
                 adopt=region.adopted)
    secrets = FragmentSecrets(NSEG, 6, G.fblocks, buffer=sreg.payload, fresh=not sreg.adopted)
    sreg.commit()
    store = ErasureStore(G, NSEG, 6, tg, context=b"test", rate=1 << 30, slots=SLOTS, seed=1,
                         secrets=secrets, state=state, adopted=region.adopted)
    region.commit()
    tg.store = store
    return store


def crash_image(kit: Kit) -> Kit:
    """Copies of every memfd as it is now: what a process killed at this instant leaves."""
    image = Kit()
    for name, fd in kit.fds.items():
        size = os.fstat(fd).st_size
        new = image.memfd(name, size)
        src = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        dst = mmap.mmap(new, size, flags=mmap.MAP_SHARED)
        dst[:] = src[:]
        src.close()
        dst.close()
    image.fresh = False
    return image


async def check_parity(store: ErasureStore, seg: int) -> None:
    ext = store._ext(seg, G.k)
    data = [await store._read_one(seg, i, 0, ext) for i in range(G.k)]
    want = store.encoder.encode([bytes(d) for d in data], tuple(range(G.k, G.n)))  # type: ignore[arg-type]
    for j, code in zip(range(G.k, G.n), want, strict=True):
        got = await store._read_one(seg, j, 0, ext)
        assert got is not None and bytes(got) == code


@pytest.mark.parametrize("when", ["lost", "landed"])
async def test_a_crash_during_a_flush_loses_nothing_acknowledged(when: str) -> None:
    kit = Kit()
    first_piece = blob(5000, 1)  # ends inside block 1 of fragment 0
    second = blob(4000, 2)  # rewrites block 1, then block 2
    tg = Hanging(6, SLOTS * G.frag_size)
    store = build(kit, tg)
    async with running(store), trio.open_nursery() as nursery:
        await store.write(0, first_piece, 1)  # acknowledged: on its target
        tg.hang = when
        nursery.start_soon(store.write, 5000, second, 1)
        await tg.hung.wait()
        image = crash_image(kit)
        on_targets = [bytearray(d) for d in tg.data]
        nursery.cancel_scope.cancel()
    kit.close()

    tg2 = Targets(6, SLOTS * G.frag_size)
    tg2.data = on_targets
    adopted = build(image, tg2)
    assert adopted.adopted_parity == 2  # segment 0's parity was staged: missing now
    assert adopted.journal.orphans  # the rewrite in flight
    for t in range(6):  # first connections after an adoption are returns
        adopted.target_returned(t)
    async with running(adopted):
        assert await adopted.read(0, len(first_piece)) == first_piece
        # the unacknowledged piece reads as what the target holds: all of it, or nothing
        got = await adopted.read(5000, len(second))
        assert got == (second if when == "landed" else bytes(len(second)))
        assert not adopted.journal.orphans
        with trio.fail_after(10):
            while adopted.missing.any() or adopted.suspect.any():
                await trio.sleep(0.02)
        await check_parity(adopted, 0)
        for j in (0, 1):  # the data fragment that was rewritten, and another: decode
            tg2.down(int(adopted.placement.target[0, j]))
        assert await adopted.read(0, len(first_piece)) == first_piece
        assert adopted.auth_failures == 0
    image.close()


async def test_adoption_undoes_a_half_made_placement() -> None:
    kit = Kit()
    tg = Targets(6, SLOTS * G.frag_size)
    store = build(kit, tg)
    async with running(store):
        await store.write(0, blob(3000, 3), 1)
        await store.flush(unstage=True)
        # died inside _open of segment 1: placed, but its life not yet set
        store.placement.assign(1, store.placement.choose(1, [True] * 6) or [])
        image = crash_image(kit)
    kit.close()
    adopted = build(image, Targets(6, SLOTS * G.frag_size))
    assert not adopted.placement.placed()[1] and adopted.placement.placed()[0]
    assert adopted.placement.free_slots(0) == SLOTS - 1
    assert np.array_equal(adopted.placement.used(), np.ones(6, np.int64))
    image.close()
