"""Memory pressure and blocking (issue 8, items 7, 8, 9 and 12), against the real lane.

* RAM-tier growth is single-flight and bounded in time, with a growth that *really* blocks:
  the arena's next pages are registered with userfaultfd, so the kernel parks the growth
  thread's page faults until the test lets them go.
* A policy pass over a million records never stalls a concurrent 4 KiB read: the pass is sliced
  and rests, so the GIL reaches the threads the readers need (asserted in the pass's CPU time).
* The map lives in a memfd and has a fixed budget: a full map is ENOSPC for the writer, never a
  signal, and nothing of it is on the state file system.
* A tier whose writes fail is avoided (the pages spill to the next tier), marked failed after
  repeated errors, and the pages it still holds can be drained.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import os
import struct
import threading
import time
from typing import Any

import pytest
import trio

import tierswap.lane as lane_mod
import tierswap.tiers.memory as memory_mod
from tests.lane.fuseproto import FILE_INO, OP, READ_IN, FuseError
from tests.lane.harness import PAGE, mixed_bytes, open_lane
from tierswap import commands
from tierswap.policy import Policy
from tierswap.tiers.base import TierError

MIB = 1 << 20


@contextlib.contextmanager
def blocked_faults(addr: int, length: int):
    """Every page fault in [addr, addr+length) blocks in the kernel until the block ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)  # userfaultfd(2)
    if fd < 0:
        pytest.fail(f"userfaultfd: {os.strerror(ctypes.get_errno())}")
    try:
        fcntl.ioctl(fd, 0xC018AA3F, bytearray(struct.pack("QQQ", 0xAA, 0, 0)))  # UFFDIO_API
        reg = bytearray(struct.pack("QQQQ", addr, length, 1, 0))  # UFFDIO_REGISTER, MISSING
        fcntl.ioctl(fd, 0xC020AA00, reg)
        yield fd
    finally:
        os.close(fd)  # wakes every parked fault: they are retried and succeed


async def test_growth_is_single_flight_and_a_full_write_gives_up_in_time(monkeypatch):
    monkeypatch.setattr(memory_mod, "GROW_WAIT", 0.5)
    async with open_lane(size=512 * MIB, mem="256M", disk=None) as rig:
        c, svc, lane = rig.client, rig.svc, rig.svc.lane
        ram = svc.tiers[0]
        assert ram.size == memory_mod.INITIAL
        inflight, peak, calls = [0], [0], [0]
        real = ram.extend_fn

        def counted(old: int, chunk: int) -> None:
            inflight[0] += 1
            calls[0] += 1
            peak[0] = max(peak[0], inflight[0])
            try:
                real(old, chunk)
            finally:
                inflight[0] -= 1

        ram.extend_fn = counted
        keep = os.urandom(PAGE)
        await c.write(0, keep)
        base = lane.arena_address(0)
        with blocked_faults(base + ram.size, ram.capacity - ram.size):
            # fill what is there: incompressible pages, one MiB at a time
            off = PAGE
            with pytest.raises(FuseError) as full:
                while off < 128 * MIB:
                    await c.write(off, os.urandom(MIB))
                    off += MIB
            assert full.value.errno == errno.ENOSPC
            # eight writers more, all at once: each gives up after GROW_WAIT, none hangs
            t0 = trio.current_time()
            errs: list[int] = []

            async def writer(i: int) -> None:
                try:
                    await c.write(256 * MIB + i * MIB, os.urandom(MIB))
                except FuseError as e:
                    errs.append(e.errno)

            async with trio.open_nursery() as n:
                for i in range(8):
                    n.start_soon(writer, i)
                # the lane keeps serving while the growth thread is parked in the kernel
                with trio.fail_after(5):
                    assert await c.read(0, PAGE) == keep
                assert inflight[0] == 1  # ... and it still is
            assert errs == [errno.ENOSPC] * 8
            assert trio.current_time() - t0 < 3 * memory_mod.GROW_WAIT + 1
            assert peak[0] == 1, "growth must be single-flight"
            assert ram.size == memory_mod.INITIAL  # nothing was added while blocked
        # the block ends: the one growth in flight completes, and writes succeed again
        with trio.fail_after(10):
            while ram.size == memory_mod.INITIAL:
                await trio.sleep(0.05)
        await c.write(256 * MIB, os.urandom(MIB))
        assert ram.size <= ram.capacity
        st = rig.stats()
        assert st.tiers[0].available_bytes == ram.size


class _ScanSpy:
    """The lane, with a note of every scan slice: (records asked for, records returned)."""

    def __init__(self, lane: Any, log: list[tuple[int, int]]) -> None:
        self._lane, self._log = lane, log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lane, name)

    def scan(self, tier: int, cursor: int, max_epoch: int = 0xFFFFFFFF,
             budget: int = 4096) -> tuple[list[Any], int, bool]:
        runs, cur, done = self._lane.scan(tier, cursor, max_epoch, budget)
        self._log.append((budget, len(runs)))
        return runs, cur, done


class _TimedMap:
    """A stand-in map of `n` one-page records for RunScan alone: each scan call takes `cost`
    seconds of trio's (mock) clock, and notes when it started."""

    def __init__(self, clock: Any, n: int, cost: float) -> None:
        self.clock, self.n, self.cost = clock, n, cost
        self.calls: list[float] = []

    def scan(self, tier: int, cursor: int, max_epoch: int,
             budget: int) -> tuple[list[tuple[Any, ...]], int, bool]:
        self.calls.append(trio.current_time())
        self.clock.jump(self.cost)
        end = min(self.n, cursor + budget)
        return [(p, 1, 0, 0, 0, 0, 0, 0, 0, b"") for p in range(cursor, end)], end, end == self.n


async def test_a_sliced_scan_rests_after_every_burst(autojump_clock):
    """RunScan gives the thread away for SCAN_REST after at most SCAN_BURST of scanning, the
    consumer's work on the records included; in between, slices follow with a checkpoint only.
    (A rest is a real sleep in trio's epoll_wait: it is when other threads get the GIL.)"""
    cost, work = 0.001, 0.0005  # seconds per slice in the lane, per record in the consumer
    lane = _TimedMap(autojump_clock, 100, cost)
    seen = []
    async for run in lane_mod.RunScan(lane, -1, 0xFFFFFFFF, 2):
        seen.append(run.start)
        autojump_clock.jump(work)
    assert seen == list(range(100))
    per_slice = cost + 2 * work
    waits = [b - a - per_slice for a, b in itertools.pairwise(lane.calls)]
    assert all(w == pytest.approx(0, abs=1e-9) or w == pytest.approx(lane_mod.SCAN_REST)
               for w in waits), waits
    rests = [i for i, w in enumerate(waits) if w > 1e-9]
    assert rests, "no rest in 50 slices"
    # between two rests: the slices of one burst (each slice ends past the burst by < 1 slice)
    for a, b in itertools.pairwise([-1, *rests]):
        assert (b - a) * per_slice < lane_mod.SCAN_BURST + per_slice
    assert len(lane.calls) - 1 - rests[-1] <= lane_mod.SCAN_BURST / per_slice + 1


STALL_BURSTS = 40  # bursts of the pass a read may wait through (a read needs ~3-6 of them)


async def test_a_policy_pass_over_a_million_records_never_stalls_a_read():
    """While a policy pass walks a million records, reads keep completing: a RAM-tier read
    from a Python thread on the side socket (its own lane thread), and a disk-tier read through
    trio, whose store read and resume run in trio worker threads. Both need the GIL between
    their steps, which the trio thread running the pass holds. Asserted is structure, not
    speed:

    * every slice asks the lane for at most SCAN_SLICE records: one bounded lock hold
      (test_lane_map checks that the lane counts the records it *visits*);
    * each reader completes reads all through the pass: between two of its reads (and from
      the pass's start or to its end) the trio thread spends at most STALL_BURSTS * SCAN_BURST
      of CPU time. The unit is the pass's own work, so a slow or busy machine does not change
      it. A pass that only checkpoints between slices starved both readers for ~1 s of its CPU
      at a time: trio's epoll_wait(0) at each checkpoint gives up the GIL and takes it back at
      once, and waking a waiter restarts its 5 ms switch-interval timer, so it never asks for
      the GIL (lane.RunScan rests instead);
    * a sanity bound: no read takes 10 s (a hang), and every read returns its page.
    """
    async with open_lane(size=8 << 30, mem="512M", disk="512M", threads=3, side=True) as rig:
        c, svc, lane = rig.client, rig.svc, rig.svc.lane
        # one page of data in each tier to read while the pass runs; the RAM page is the
        # newest record and past the others, so the demotion below never reaches it
        disk_page, ram_page, ram_at = os.urandom(PAGE), os.urandom(PAGE), 2_050_000
        await c.write(0, disk_page)
        (first,) = [r async for r in svc.runs(0)]
        await svc.move(first, [1])
        assert lane.debug_fill(0, 16, 1_000_000, 2) == 1_000_000
        await c.write(PAGE * ram_at, ram_page)
        assert rig.stats().runs >= 1_000_000
        slices: list[tuple[int, int]] = []
        svc.lane = _ScanSpy(lane, slices)  # RunScan and Policy reach the lane through svc.lane
        trio_cpu = time.pthread_getcpuclockid(threading.get_ident())  # the pass's thread
        reads: dict[str, list[float]] = {"ram": [], "disk": []}  # trio_cpu at each completion
        worst = [0.0]
        done = trio.Event()
        side = rig.side
        assert side is not None
        body = READ_IN.pack(FILE_INO, PAGE * ram_at, PAGE, 0, 0, 0, 0)

        def native_reader() -> None:  # a thread of its own: trio's business does not reach it
            while not done.is_set():
                t = time.monotonic()
                side.send(OP["READ"], FILE_INO, body)
                _u, err, data = side.recv_one()
                reads["ram"].append(time.clock_gettime(trio_cpu))
                worst[0] = max(worst[0], time.monotonic() - t)
                assert err == 0 and data == ram_page
                time.sleep(0.001)

        async def trio_reader() -> None:
            while not done.is_set():
                t = time.monotonic()
                assert await c.read(0, PAGE) == disk_page
                reads["disk"].append(time.clock_gettime(trio_cpu))
                worst[0] = max(worst[0], time.monotonic() - t)
                await trio.sleep(0.001)

        try:
            pol = Policy(svc, rig.config.policy)
            async with trio.open_nursery() as n:
                # RAM: served by the lane alone; disk: the store's read runs on trio, beside it
                n.start_soon(trio.to_thread.run_sync, native_reader)
                n.start_soon(trio_reader)
                try:
                    with trio.fail_after(30):
                        while not (reads["ram"] and reads["disk"]):
                            await trio.sleep(0.01)
                    marks = [time.clock_gettime(trio_cpu)]
                    inspected = await pol.inspect()  # one full pass over every record
                    marks.append(time.clock_gettime(trio_cpu))
                    budget = iter(range(5000))  # a demotion: a histogram pass, then moves
                    moved = await pol.demote(0, lambda: next(budget, None) is not None)
                    marks.append(time.clock_gettime(trio_cpu))
                finally:  # also when a reader or the pass fails (the nursery cancels this):
                    # the thread cannot be abandoned, it ends only when it sees `done`
                    done.set()
        finally:
            svc.lane = lane
        assert inspected["tiers"][0]["pages"] >= 1_000_000
        assert moved > 0
        # sliced: at least three passes over the million records, each slice one lock hold
        assert len(slices) >= 3 * 1_000_000 // lane_mod.SCAN_SLICE
        assert all(asked <= lane_mod.SCAN_SLICE and got <= asked for asked, got in slices)
        bound = STALL_BURSTS * lane_mod.SCAN_BURST
        gaps = {}
        for name, stamps in reads.items():
            for phase, (a, b) in zip(("inspect", "demote"), itertools.pairwise(marks),
                                     strict=True):
                pts = [a] + [x for x in stamps if a <= x <= b] + [b]
                gaps[name, phase] = gap = max(y - x for x, y in itertools.pairwise(pts))
                assert gap <= bound, (f"{name} reads waited through {gap * 1e3:.0f} ms of the "
                                      f"pass's CPU in {phase} (at most {bound * 1e3:.0f} ms)")
        assert worst[0] < 10, worst
        print("longest wait for a read, in the pass's CPU ms:",
              {f"{k[0]}/{k[1]}": round(v * 1e3) for k, v in gaps.items()})


async def test_a_full_map_is_enospc_not_a_signal(monkeypatch):
    monkeypatch.setattr(lane_mod, "MAP_BYTES_PER_PAGE", 0)
    monkeypatch.setattr(lane_mod, "MAP_EXTRA", MIB)  # room for some ten thousand runs
    monkeypatch.setattr(lane_mod, "RESERVE", MIB)

    def page(i: int) -> bytes:
        return i.to_bytes(8, "little") * (PAGE // 8)  # compresses to a few dozen bytes

    async with open_lane(size=2048 * MIB, mem="64M", disk=None) as rig:
        c = rig.client
        written = []
        with pytest.raises(FuseError) as e:
            for i in range(200_000):  # every other page: records that cannot join
                await c.write(2 * i * PAGE, page(i))
                written.append(i)
        assert e.value.errno == errno.ENOSPC
        st = rig.stats()
        assert st.enospc >= 1 and st.tiers[0].free_bytes > 0  # the map was full, not the tier
        for i in written[:: max(1, len(written) // 200)]:
            assert await c.read(2 * i * PAGE, PAGE) == page(i)
        await c.punch(0, 2 * PAGE * len(written))  # room again (the kernel discards in slices)
        await c.write(0, b"x" * PAGE)
        assert await c.read(0, 4) == b"xxxx"
        # the map is memory: a memfd, never a file under the state directory
        link = os.readlink(f"/proc/self/fd/{rig.kit.fds['map']}")
        assert link.startswith("/memfd:tierswap:map")
        assert not any((rig.tmp / "state").rglob("*.mdb"))


async def test_a_failing_tier_is_avoided_then_marked_failed_and_drained():
    async with open_lane(size=64 * MIB, mem="4M", disk="32M",
                         extra='[[tier]]\nname = "spare"\nkind = "file"\n'
                               'path = "{tmp}/spare.tier"\ncapacity = "32M"\n') as rig:
        c, svc = rig.client, rig.svc
        disk = svc.tiers[1]
        data = mixed_bytes(5, 48 * MIB)
        await c.write_all(0, data[: 24 * MIB])  # fills RAM, then the disk tier takes pages
        assert rig.stats().tiers[1].pages > 0
        real_write = disk.write
        failing = [True]

        async def eio(base, buf, life):
            if failing[0]:
                raise TierError(errno.EIO, "tier disk: injected write error")
            await real_write(base, buf, life)

        disk.write = eio  # the disk below the file tier returns EIO on every write
        await c.write_all(24 * MIB, data[24 * MIB:])  # no error: the pages spill to "spare"
        st = rig.stats()
        assert st.write_errors == 0
        assert st.tiers[1].write_errors >= 3 and st.tiers[1].failed
        assert st.tiers[2].pages > 0
        assert await c.read_all(0, len(data)) == data
        # what the failed tier still holds is readable: drain moves it elsewhere
        pol = Policy(svc, rig.config.policy)
        res = await pol.drain(commands.Drain(tier="disk"), progress=_noprogress)
        assert res["left"] == 0
        assert rig.stats().tiers[1].pages == 0
        assert await c.read_all(0, len(data)) == data


async def _noprogress(_p):
    return None
