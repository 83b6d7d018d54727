"""The erasure-coded store (tierswap.tiers.erasure) over in-memory byte stores.

The transport here is a list of bytearrays with an up/down switch: what is under test is the
coding, sealing, staging, decoding and rebuilding, which sit entirely above the transport
interface. The same store against real nbdkit servers is tests/unit/test_remote_erasure.py.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tierswap.crypto import BLOCK, AuthenticationError
from tierswap.tiers.base import TierError
from tierswap.tiers.ecseal import FragmentSealer, FragmentSecrets
from tierswap.tiers.erasure import ErasureStore, Geometry, fragments_of

SEG = 1 << 20


class Targets:
    """n byte stores; each can be down, and can come back empty (a restarted memory server)."""

    def __init__(self, n: int, size: int) -> None:
        self.data = [bytearray(size) for _ in range(n)]
        self.up = [True] * n
        self.reads = [0] * n
        self.writes = [0] * n
        self.trims = [0] * n
        self.store: ErasureStore | None = None

    def is_up(self, t: int) -> bool:
        return self.up[t]

    async def frag_read(self, t: int, offset: int, buf: memoryview) -> bool:
        await trio.sleep(0)
        if not self.up[t]:
            return False
        self.reads[t] += 1
        buf[:] = self.data[t][offset : offset + len(buf)]
        return True

    async def frag_write(self, t: int, offset: int, data: memoryview) -> bool:
        await trio.sleep(0)
        if not self.up[t]:
            return False
        self.writes[t] += 1
        self.data[t][offset : offset + len(data)] = data
        return True

    async def frag_trim(self, t: int, offset: int, length: int) -> bool:
        await trio.sleep(0)
        if not self.up[t]:
            return False
        self.trims[t] += 1
        self.data[t][offset : offset + length] = bytes(length)
        return True

    def down(self, t: int) -> None:
        self.up[t] = False
        assert self.store is not None
        self.store.target_lost(t)

    def back(self, t: int, *, empty: bool) -> None:
        if empty:
            self.data[t][:] = bytes(len(self.data[t]))
        self.up[t] = True
        assert self.store is not None
        self.store.target_returned(t)


def make(k: int = 4, m: int = 2, ntargets: int = 6, nseg: int = 8,
         slots: int | None = None, rate: int = 1 << 30) -> tuple[ErasureStore, Targets]:
    g = Geometry(k, m, SEG)
    slots = slots if slots is not None else g.min_slots(nseg, ntargets)
    tg = Targets(ntargets, slots * g.frag_size)
    store = ErasureStore(g, nseg, ntargets, tg, context=b"test", rate=rate, slots=slots,
                         seed=1)
    tg.store = store
    return store, tg


@asynccontextmanager
async def running(store: ErasureStore) -> AsyncIterator[ErasureStore]:
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        yield store
        nursery.cancel_scope.cancel()


def blob(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, np.uint8).tobytes()


async def fill(store: ErasureStore, segs: range, seed: int = 0,
               life: int = 1) -> list[tuple[int, bytes]]:
    """Pieces of odd sizes packed back to back, as the segment allocator hands them out."""
    rng = np.random.default_rng(seed)
    out = []
    for seg in segs:
        off = 0
        while True:
            n = int(rng.integers(1, 40_000))
            if off + n > SEG:
                break
            data = blob(n, seed * 10_000 + len(out))
            await store.write(seg * SEG + off, data, life)
            out.append((seg * SEG + off, data))
            off += n
    return out


async def check(store: ErasureStore, pieces: list[tuple[int, bytes]]) -> None:
    for base, data in pieces:
        assert await store.read(base, len(data)) == data
        mid = len(data) // 2
        assert await store.read(base + mid, min(4096, len(data) - mid)) == \
            data[mid : mid + 4096]


async def settle(store: ErasureStore) -> None:
    await store.flush(unstage=True)
    assert not store.stages


# ----------------------------------------------------------------------------- geometry


def test_geometry_and_fragments() -> None:
    g = Geometry(4, 2, SEG)
    assert g.n == 6 and g.frag_size == SEG // 4 and g.fblocks == 64
    g3 = Geometry(3, 2, SEG)  # 1 MiB / 3 is not whole blocks: the last fragment is short
    assert g3.frag_size % BLOCK == 0 and 3 * g3.frag_size >= SEG
    assert fragments_of(SEG, 3)[-1] == (2 * g3.frag_size, SEG)
    assert g.min_slots(100, 6) == 100 and g.min_slots(100, 12) == 50


# ----------------------------------------------------------------------------- data path


async def test_round_trip_staged_and_from_targets() -> None:
    store, tg = make()
    async with running(store):
        pieces = await fill(store, range(3))
        await check(store, pieces)  # from the stages
        await settle(store)
        before = sum(tg.reads)
        await check(store, pieces)  # from the targets, data fragments only
        assert store.degraded_reads == 0 and sum(tg.reads) > before
        st = store.statistics()
        assert st["auth_failures"] == 0 and st["degraded_segments"] == 0


async def test_more_writers_than_stages() -> None:
    """8 concurrent writers of whole segments share 4 staging buffers: a waiting writer gets
    one as soon as any stage is idle, even one opened after it began waiting."""
    store, _tg = make(nseg=24, slots=24)
    segs = iter(range(24))
    data = {seg: blob(SEG, seg) for seg in range(24)}

    async def writer() -> None:
        for seg in segs:
            await store.write(seg * SEG, data[seg], 1)

    async with running(store):
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(writer)
        await settle(store)
        for seg in range(24):
            assert await store.read(seg * SEG + 12345, 4096) == data[seg][12345 : 12345 + 4096]


async def test_a_4k_read_touches_one_fragment() -> None:
    store, tg = make()
    async with running(store):
        await fill(store, range(2))
        await settle(store)
        f = store.g.frag_size
        for off in (0, 5000, f + 123, 3 * f + 40_000):
            before = list(tg.reads)
            await store.read(SEG + off, 4096)
            touched = [t for t in range(6) if tg.reads[t] != before[t]]
            assert len(touched) == 1, (off, touched)
            frag = off // f
            assert touched == [int(store.placement.target[1, frag])]
        before = list(tg.reads)
        await store.read(SEG + f - 2048, 4096)  # straddles two fragments: two targets
        assert sum(a != b for a, b in zip(tg.reads, before, strict=True)) == 2


async def test_degraded_reads_decode_from_any_k() -> None:
    store, tg = make()
    async with running(store):
        pieces = await fill(store, range(3))
        await settle(store)
        tg.down(int(store.placement.target[0, 0]))  # a data fragment's target
        tg.down(int(store.placement.target[0, 1]))  # and another: M = 2 down
        await check(store, pieces)
        assert store.degraded_reads > 0
        before = list(tg.reads)
        await store.read(0, 4096)  # fragment 0 is gone: K = 4 reads of 4 KiB
        assert sum(a != b for a, b in zip(tg.reads, before, strict=True)) == 4


async def test_more_than_m_down_fails_cleanly_then_recovers() -> None:
    store, tg = make()
    async with running(store):
        pieces = await fill(store, range(2))
        await settle(store)
        for t in (0, 1, 2):
            tg.down(t)
        with pytest.raises(TierError) as info:
            for base, data in pieces:
                await store.read(base, len(data))
        assert info.value.errno == errno.EIO
        with pytest.raises(TierError) as info:
            await store.write(2 * SEG, b"x" * 100, 1)
        assert info.value.errno == errno.EIO
        assert not store.can_open()
        assert store.statistics()["unreadable_segments"] == 2
        for t in (0, 1, 2):
            tg.back(t, empty=False)
        assert store.can_open()
        await check(store, pieces)
        more = await fill(store, range(3, 4), seed=5)
        await check(store, more)


async def test_target_lost_while_staged_costs_nothing() -> None:
    store, tg = make()
    async with running(store):
        tg.down(3)
        pieces = await fill(store, range(2))  # fragments on target 3 are missing
        assert store.degraded_writes > 0
        tg.back(3, empty=True)
        with trio.fail_after(5):
            while store.statistics()["degraded_segments"]:
                await trio.sleep(0.05)
        await settle(store)
        tg.down(0)
        tg.down(1)
        await check(store, pieces)  # needs target 3's fragments, rewritten from RAM


async def test_returning_empty_target_is_verified_and_rebuilt() -> None:
    store, tg = make()
    async with running(store):
        pieces = await fill(store, range(4))
        await settle(store)
        tg.down(2)
        await check(store, pieces)
        tg.back(2, empty=True)
        with trio.fail_after(10):
            while any(t["rebuild_backlog"] for t in store.target_statistics()):
                await trio.sleep(0.05)
        assert store.rebuilt_fragments == 4  # one fragment of each segment lived there
        tg.down(0)
        tg.down(1)  # now target 2's rebuilt fragments are needed
        await check(store, pieces)
        assert store.auth_failures == 0  # the empty target was suspect, not tampered with


async def test_fragments_move_to_a_spare_target() -> None:
    store, tg = make(ntargets=8, nseg=8, slots=8)
    store.move_after = 0.2
    async with running(store):
        pieces = await fill(store, range(5))
        await settle(store)
        on5 = int(np.count_nonzero(store.placement.target == 5))
        assert on5 > 0
        tg.down(5)
        with trio.fail_after(10):
            while store.moved_fragments < on5:
                await trio.sleep(0.05)
        assert not (store.placement.target == 5).any()
        rows = store.placement.target[:5]
        assert all(len(set(r.tolist())) == 6 for r in rows)  # still 6 distinct targets
        for t in {int(x) for x in store.placement.target[0][:2]}:
            tg.down(t)
        await check(store, pieces)


async def test_tampering_and_swapping_fragments_are_caught() -> None:
    store, tg = make()
    async with running(store):
        pieces = await fill(store, range(1))
        await settle(store)
        t0, t1 = (int(store.placement.target[0, j]) for j in (0, 1))
        s0, s1 = (int(store.placement.slot[0, j]) * store.g.frag_size for j in (0, 1))
        f = store.g.frag_size
        # swap the first blocks of fragments 0 and 1 between their targets
        a = bytes(tg.data[t0][s0 : s0 + BLOCK])
        tg.data[t0][s0 : s0 + BLOCK] = tg.data[t1][s1 : s1 + BLOCK]
        tg.data[t1][s1 : s1 + BLOCK] = a
        await check(store, pieces)  # decoded around both
        assert store.auth_failures == 2
        with trio.fail_after(10):  # both marked missing and rebuilt in the background
            while store.rebuilt_fragments < 2 or store.missing[0].any():
                await trio.sleep(0.05)
        for j in (2, 3):  # now fragments 0 and 1, rebuilt, are needed
            tg.down(int(store.placement.target[0, j]))
        await check(store, pieces)
        assert f == store.g.frag_size


def test_sealing_binds_segment_fragment_target_and_block() -> None:
    secrets = FragmentSecrets(4, 6, 64, buffer=bytearray(FragmentSecrets.nbytes(4, 6, 64)))
    s = FragmentSealer(secrets, b"ctx")
    plain = blob(2 * BLOCK, 1)
    sealed, _, _ = s.seal(1, 2, 3, 5, plain)
    snap = s.snapshot(1, 2, 5, 2)
    assert s.open(1, 2, 3, 5, sealed, snap) == plain
    for args in ((0, 2, 3, 5), (1, 1, 3, 5), (1, 2, 4, 5), (1, 2, 3, 6)):
        with pytest.raises(AuthenticationError):
            s.open(*args, sealed, snap)
    assert plain[:64] not in sealed
    older, _, _ = s.seal(1, 2, 3, 5, plain)  # rewritten: the old ciphertext is stale
    with pytest.raises(AuthenticationError):
        s.open(1, 2, 3, 5, sealed, s.snapshot(1, 2, 5, 2))
    assert s.open(1, 2, 3, 5, older, s.snapshot(1, 2, 5, 2)) == plain
    # a caller-supplied buffer (a kit memfd) is adopted as it is
    buf = bytearray(secrets._buf)
    adopted = FragmentSealer(FragmentSecrets(4, 6, 64, buffer=buf, fresh=False), b"ctx")
    assert adopted.open(1, 2, 3, 5, older, adopted.snapshot(1, 2, 5, 2)) == plain


async def test_freed_segments_are_trimmed_and_slots_reused() -> None:
    store, tg = make(nseg=4)
    async with running(store):
        await fill(store, range(4))
        await settle(store)
        assert not store.can_open()  # every slot taken (6 targets x 4 slots)
        held = sum(t["bytes"] for t in store.target_statistics())
        assert held > 4 * SEG * 1.45
        store.freed(1)
        assert store.can_open()  # the slots being trimmed count: a write waits for them
        with trio.fail_after(5):
            while sum(tg.trims) < 6 or store._trimming.any():
                await trio.sleep(0.01)
        assert sum(t["bytes"] for t in store.target_statistics()) < held - SEG
        pieces = await fill(store, range(1, 2), seed=9, life=2)  # reused, new life
        await settle(store)
        await check(store, pieces)


async def test_bytes_on_targets_stay_within_k_plus_m_over_k() -> None:
    store, _tg = make()
    async with running(store):
        pieces = await fill(store, range(6))
        await settle(store)
        stored = sum(len(d) for _, d in pieces)
        held = sum(t["bytes"] for t in store.target_statistics())
        assert held <= 1.55 * stored  # 1.5 plus at most one partial block per fragment


async def test_rebuild_is_rate_limited(autojump_clock, monkeypatch) -> None:
    from tierswap.tiers import erasure

    monkeypatch.setattr(erasure, "THREAD_CODING", 1 << 40)  # threads would race the clock
    rate = 1 << 20
    store, tg = make(rate=rate)
    async with running(store):
        await fill(store, range(4))
        await settle(store)
        tg.down(0)
        tg.back(0, empty=True)
        t0 = trio.current_time()
        with trio.fail_after(60):
            while any(t["rebuild_backlog"] for t in store.target_statistics()):
                await trio.sleep(0.01)
        rebuilt = store.repair_bytes
        assert rebuilt >= 4 * store.g.frag_size * 0.9
        # one second's burst, then `rate`
        assert trio.current_time() - t0 >= (rebuilt - rate) / rate * 0.95


# ----------------------------------------------------------------------------- model test


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_model_against_a_bytearray(data) -> None:
    """Random appends, reads, target failures (never more than M at once, returning empty
    or intact) and frees; every read must equal a plain bytearray's bytes."""
    k, m = data.draw(st.sampled_from([(2, 1), (3, 2), (4, 2)]))
    ntargets = data.draw(st.integers(k + m, k + m + 2))
    nseg = 4
    ops = data.draw(st.lists(st.tuples(st.sampled_from("wwwrrrrdbfss"), st.integers(0, 2**31)),
                             min_size=5, max_size=60))

    async def main() -> None:
        store, tg = make(k, m, ntargets, nseg, slots=nseg)
        store.move_after = 0.05
        model = bytearray(nseg * SEG)
        fills = [0] * nseg
        lives = [1] * nseg
        down: list[int] = []
        async with running(store):
            for op, x in ops:
                seg = x % nseg
                if op == "w" and fills[seg] < SEG:
                    n = min(SEG - fills[seg], 1 + x % 70_000)
                    payload = blob(n, x)
                    base = seg * SEG + fills[seg]
                    await store.write(base, payload, lives[seg])
                    model[base : base + n] = payload
                    fills[seg] += n
                elif op == "r" and fills[seg]:
                    a = x % fills[seg]
                    n = 1 + (x >> 8) % (fills[seg] - a)
                    base = seg * SEG + a
                    assert await store.read(base, n) == bytes(model[base : base + n])
                elif op == "d" and len(down) < m:
                    t = x % ntargets
                    if t not in down:
                        tg.down(t)
                        down.append(t)
                elif op == "b" and down:
                    tg.back(down.pop(0), empty=bool(x & 1))
                    # an empty return loses that target's copies: wait for the rebuild
                    # before another failure, as the redundancy would otherwise be gone
                    with trio.fail_after(30):
                        while any(s["rebuild_backlog"] for t, s in
                                  enumerate(store.target_statistics()) if tg.up[t]):
                            await trio.sleep(0.02)
                elif op == "f" and fills[seg]:
                    store.freed(seg)
                    fills[seg] = 0
                    lives[seg] += 1
                    model[seg * SEG : (seg + 1) * SEG] = bytes(SEG)
                elif op == "s":
                    await store.flush(unstage=True)
            while down:
                tg.back(down.pop(), empty=True)
            with trio.fail_after(30):
                while any(s["rebuild_backlog"] for s in store.target_statistics()):
                    await trio.sleep(0.02)
            await store.flush(unstage=True)
            for seg in range(nseg):
                if fills[seg]:
                    base = seg * SEG
                    assert await store.read(base, fills[seg]) == \
                        bytes(model[base : base + fills[seg]])
            assert store.auth_failures == 0
            event(f"decoded: {store.degraded_reads > 0}")
            event(f"rebuilt: {store.rebuilt_fragments > 0}")
            event(f"moved: {store.moved_fragments > 0}")

    trio.run(main)
