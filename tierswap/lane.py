"""The trio side of the native lane: one shard's data path as the control plane sees it.

The lane (tierswap/native/, module tierswap._lane) serves every FUSE request on native threads.
This module builds it from the configuration and the shard's kit, and runs what the lane asks
of trio:

* **jobs**: a request that needs a slow tier (file, remote) arrives on the lane's eventfd;
  `_run_job` does its byte I/O with the store (`await store.read/write`) and resumes it in a
  worker thread, where the lane decodes, publishes and replies on the fd that read it. A store
  error is reported with the failing tier, so the lane can spill the pages to the next tier.
* **growth**: memory tiers grow their arena when the lane asks (tiers/memory.py).
* **the map reserve**: the LMDB map lives in a memfd; pages LMDB may touch next are allocated
  ahead (RESERVE bytes beyond its high-water mark), so a map write never faults in new memory
  on the I/O path.
* **availability**: a store that cannot take pages now (no remote target up) is set offline in
  the lane, which then spills past it.

Bounds: jobs in flight are bounded by the lane's job pool (`jobs`), worker threads for resuming
them by RESUME_THREADS, the map by its fixed size. Nothing here allocates per page.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import trio

import tierswap._lane as _lane
from tierswap.config import MAP_BYTES_PER_PAGE, PAGE_SIZE, Compression, Config
from tierswap.errors import StartError, TierswapError
from tierswap.kit import Kit
from tierswap.tiers import tier_class
from tierswap.tiers.base import (
    SEG_SHIFT,
    SEG_SIZE,
    SpaceView,
    Store,
    TierError,
    TierStatistics,
    shard_capacity,
)
from tierswap.tiers.memory import MemoryTier

log = logging.getLogger(__name__)

MAP_EXTRA = 16 << 20
RESERVE = 16 << 20  # map bytes allocated ahead of LMDB's high-water mark
RESERVE_CHECK = 0.25  # seconds between looks at the map's high-water mark
RESUME_THREADS = 2
JOBS = 24  # job pool: lane threads + requests parked with trio
OFFLINE_CHECK = 0.5
SCAN_SLICE = 256  # map records per slice of a scan (one lock hold; a checkpoint after each)
SCAN_BURST = 0.005  # seconds a sliced scan (and its consumer) runs before it rests
SCAN_REST = 0.001  # seconds of a rest: trio sleeps in epoll, the GIL is free for other threads
ZERO_TIER = _lane.ZERO_TIER


class RunInfo(NamedTuple):
    """A map record as the lane reports it (`lane.scan`, `lane.get_run`, `Move.run`)."""

    start: int  # first page
    npages: int
    tier: int  # ZERO_TIER for zero runs
    base: int  # byte address in the tier's space
    gen: int  # write generation: which publish made it
    epoch: int  # coarse seconds (CLOCK_BOOTTIME) of its last write or promotion-worthy read
    nbytes: int  # stored bytes
    flags: int
    nonzero: int  # pages that are not zero pages
    lens: bytes  # u16 stored length per page

    @property
    def segment(self) -> int:
        return self.base >> SEG_SHIFT


class RunScan:
    """`async for run in RunScan(...)`: a sliced scan of the map (see LaneService.runs). A
    class, not an async generator, so that leaving the loop early needs no clean-up.

    Between slices there is a checkpoint, and after every SCAN_BURST seconds of scanning (the
    consumer's work on the records included) a rest of SCAN_REST seconds. The rest is what lets
    the store and resume worker threads of slow-tier requests (trio.to_thread) run: a
    checkpoint alone releases the GIL only for trio's epoll_wait(0) and takes it back at once,
    and each release wakes a waiting thread, whose 5 ms switch-interval timer then starts over,
    so with two or more waiters none ever asks for the GIL and they starve for as long as the
    pass runs (seconds over a million records). The pass costs SCAN_REST/SCAN_BURST more time.
    """

    def __init__(self, lane: Any, tier: int, max_epoch: int, budget: int) -> None:
        self._lane, self._tier, self._max, self._budget = lane, tier, max_epoch, budget
        self._cursor = 0
        self._buf: list[Any] = []
        self._done = False
        self._first = True
        self._since = 0.0  # trio.current_time() of the last rest (or of the first slice)

    def __aiter__(self) -> RunScan:
        return self

    async def __anext__(self) -> RunInfo:
        while not self._buf:
            if self._done:
                raise StopAsyncIteration
            if self._first:
                self._since = trio.current_time()
            elif trio.current_time() - self._since >= SCAN_BURST:
                await trio.sleep(SCAN_REST)  # other threads' turn with the GIL
                self._since = trio.current_time()
            else:
                await trio.sleep(0)  # a checkpoint between slices
            self._first = False
            runs, self._cursor, self._done = self._lane.scan(self._tier, self._cursor,
                                                             self._max, self._budget)
            self._buf = runs[::-1]
        return RunInfo._make(self._buf.pop())


class NoRoom(TierswapError):
    """No destination tier has room for a move (ENOSPC)."""


@dataclass(frozen=True)
class LaneStatistics:
    """One shard's data path. Counts are requests or pages as named; sizes are bytes."""

    size_bytes: int
    stored_pages: int  # non-zero pages held in any tier
    zero_pages: int  # zero pages (in ZERO_TIER runs and inside tier runs)
    stored_bytes: int
    orig_bytes: int  # stored_pages * 4096
    runs: int
    metadata_bytes: int  # LMDB pages holding the map
    map_high_water: int
    reads: int
    writes: int
    discards: int
    read_errors: int
    write_errors: int
    enospc: int
    native: int  # requests answered by the lane alone
    forwarded: int  # requests that needed trio (slow tiers, growth)
    rmw: int
    rmw_conflicts: int
    corrupt: int
    threads_running: int
    tiers: tuple[TierStatistics, ...]


async def _write_lent(store: Store, base: int, view: memoryview, life: int) -> None:
    """`store.write` of a view of the lane's own buffer (a job's or a move's), released when
    the write returns or fails. The lane refuses to resume a job or finish a move while its
    buffer is exported, and a view left to the garbage collector stays exported for as long
    as anything refers to it: trio before 0.34 kept the function a worker thread ran (and so
    a file tier's view) until the OS scheduled that thread again, after the task had resumed.
    A store must not keep `data` past its write; if it exported it further and kept that,
    release() raises BufferError here, naming the fault instead of wedging the lane."""
    with view:
        await store.write(base, view, life)


def map_size_for(share: int) -> int:
    npages = share // PAGE_SIZE
    return (npages * MAP_BYTES_PER_PAGE + MAP_EXTRA + (1 << 20) - 1) >> 20 << 20


class LaneService:
    """Builds and runs one shard's lane; see the module docstring."""

    def __init__(self, config: Config, shard: int, kit: Kit, lane: Any,
                 tiers: list[MemoryTier | Store], map_fd: int, map_size: int) -> None:
        self.config = config
        self.shard = shard
        self.kit = kit
        self.lane = lane
        self.tiers = tiers
        self.map_fd = map_fd
        self.map_size = map_size
        self._reserved = 0
        self._resume = trio.CapacityLimiter(RESUME_THREADS)
        self._grow_wanted = [trio.Event() for _ in tiers]
        self.lost = trio.Event()  # every lane thread has ended: the connection is gone
        self.jobs_done = 0
        self.job_errors = 0

    @property
    def size(self) -> int:
        return self.config.size // self.config.shards

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    @classmethod
    async def open(cls, config: Config, shard: int, kit: Kit,
                   fuse_fds: Sequence[int]) -> LaneService:
        """Open the stores, the arenas and the map; adopt what the kit holds (a restart)."""
        share = config.size // config.shards
        map_size = map_size_for(share)
        fresh = not kit.has("map")
        map_fd = kit.memfd("map")
        tiers: list[MemoryTier | Store] = []
        specs: list[dict[str, Any]] = []
        try:
            for i, tcfg in enumerate(config.tiers):
                cap = shard_capacity(tcfg, config)
                if tcfg.kind == "memory":
                    mt = MemoryTier(tcfg, i, cap, kit)
                    tiers.append(mt)
                    specs.append(mt.lane_spec())
                    continue
                store = await tier_class(tcfg.kind).create(tcfg, i, config, shard, kit)
                tiers.append(store)
                life = kit.mapped(f"life.{i}", max(4, store.nseg * 4))
                c = tcfg.compression
                specs.append({"kind": "store", "codec": c.algorithm, "level": c.level,
                              "nseg": store.nseg, "available": store.nseg, "align": store.align,
                              "life": life})
            st = os.stat(f"/proc/self/fd/{map_fd}")
            try:
                lane = _lane.Lane(
                    fds=list(fuse_fds), size=share, map_path=f"/proc/self/fd/{map_fd}",
                    map_size=map_size, fresh=fresh, tiers=specs, uid=os.getuid(),
                    gid=os.getgid(), mtime_ns=st.st_mtime_ns, jobs=JOBS)
            except _lane.LaneError as e:  # e.g. a kept map this configuration cannot place
                raise StartError(f"shard {shard}: {e}") from None
        except BaseException:
            for t in tiers:
                if isinstance(t, Store):
                    await t.aclose()
            raise
        svc = cls(config, shard, kit, lane, tiers, map_fd, map_size)
        for t in tiers:
            if isinstance(t, MemoryTier):
                t.lane = lane
            else:
                life_map = kit.mapped(f"life.{t.index}", max(4, t.nseg * 4))
                t.space = SpaceView(lane, t.index, np.frombuffer(life_map, np.uint32))
        await svc._reserve_map()
        for t in tiers:
            if isinstance(t, MemoryTier):
                await t.prepare()
        return svc

    # ------------------------------------------------------------------ background work

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve jobs, growth, the map reserve and store availability until cancelled."""
        async with trio.open_nursery() as nursery:
            for t in self.tiers:
                if isinstance(t, MemoryTier):
                    nursery.start_soon(t.run_grower, partial(self._wanted, t.index))
                elif hasattr(t, "run_background"):
                    await nursery.start(t.run_background)
            nursery.start_soon(self._map_reserver)
            nursery.start_soon(self._availability)
            nursery.start_soon(self._serve_jobs, nursery)
            task_status.started()

    def _wanted(self, index: int) -> trio.Event:
        ev = self._grow_wanted[index]
        if ev.is_set():
            ev = self._grow_wanted[index] = trio.Event()
        return ev

    async def _serve_jobs(self, nursery: trio.Nursery) -> None:
        efd = self.lane.eventfd
        while True:
            await trio.lowlevel.wait_readable(efd)
            for job in self.lane.take_jobs():
                nursery.start_soon(self._run_job, job)
            mask = self.lane.take_grow()
            for i in range(len(self.tiers)):
                if mask & (1 << i):
                    self._grow_wanted[i].set()
            if self.lane.running == 0 and not self.lost.is_set():
                gone = self.lane.conn_gone
                log.error("shard %d: the FUSE connection is gone (%s)", self.shard,
                          os.strerror(gone) if gone > 0 else "closed")
                self.lost.set()

    async def _run_job(self, job: Any) -> None:
        err, failed = 0, -1
        if job.kind == "grow":
            for t in self.tiers:
                if isinstance(t, MemoryTier):
                    await t.grow_for_write()
        else:
            with memoryview(job) as buf:
                for write, tier, base, length, offset, life in job.ops:
                    store = self.tiers[tier]
                    assert isinstance(store, Store)
                    try:
                        if write:
                            await _write_lent(store, base, buf[offset : offset + length], life)
                        else:
                            data = await store.read(base, length)
                            if len(data) != length:
                                raise TierError(errno.EIO, f"tier {store.name}: short read")
                            buf[offset : offset + length] = data
                    except TierError as e:
                        err, failed = e.errno or errno.EIO, tier
                        self.job_errors += 1
                        log.warning("tier %s: %s", store.name, e.strerror or e)
                        break
                    except Exception as e:  # a store bug must fail one request, not the shard
                        err, failed = errno.EIO, tier
                        self.job_errors += 1
                        log.exception("tier %s failed unexpectedly: %s", store.name, e)
                        break
        await trio.to_thread.run_sync(partial(job.resume, err, failed), limiter=self._resume,
                                      abandon_on_cancel=False)
        self.jobs_done += 1

    async def _reserve_map(self) -> None:
        """Keep RESERVE bytes of the map memfd allocated beyond LMDB's high-water mark."""
        hw = self.lane.statistics()["map_high_water"]
        want = min(self.map_size, -(-(hw + RESERVE) // SEG_SIZE) * SEG_SIZE)
        if want > self._reserved:
            old = self._reserved
            await trio.to_thread.run_sync(os.posix_fallocate, self.map_fd, old, want - old)
            self._reserved = want

    async def _map_reserver(self) -> None:
        while True:
            try:
                await self._reserve_map()
            except OSError as e:
                log.warning("shard %d: cannot allocate the map reserve: %s", self.shard,
                            e.strerror or e)
            await trio.sleep(RESERVE_CHECK)

    async def _availability(self) -> None:
        """Store state the lane needs: can it take pages now; which segments came back free
        (a store with per-segment state, like remote placement, gives their room back)."""
        state: dict[int, bool] = {}
        while True:
            for t in self.tiers:
                if isinstance(t, Store):
                    off = not t.available()
                    if state.get(t.index) != off:
                        self.lane.set_offline(t.index, off)
                        state[t.index] = off
                    freed = getattr(t, "freed", None)
                    if freed is not None:
                        for seg, life in self.lane.take_freed(t.index):
                            freed(seg, life)
            await trio.sleep(OFFLINE_CHECK)

    # ------------------------------------------------------------------ moves

    def runs(self, tier: int, max_epoch: int = 0xFFFFFFFF, *, budget: int = SCAN_SLICE) -> RunScan:
        """Every record of `tier` (-1: all) with epoch <= max_epoch, in page order, read in
        slices of at most `budget` records with a checkpoint between slices and a rest after
        every SCAN_BURST (see RunScan): the lane's lock is held for one slice at a time, and
        neither trio nor the worker threads of slow-tier requests stall on a large map."""
        return RunScan(self.lane, tier, max_epoch, budget)

    async def move(self, run: RunInfo, to: Sequence[int], *,
                   recompress: Compression | None = None) -> int:
        """Move map record `run` to the first tier of `to` with room; pages moved (0 when the
        record changed meanwhile: foreground I/O always wins). Raises NoRoom when no tier of
        `to` has room, TierError when a store fails.

        The one mover: demotion, promotion, cleaning, migrate, drain and compact all come here.
        Bytes move as stored unless `recompress` names a codec (kept only when smaller).
        """
        mv = self.lane.move(run.start, run.gen)
        if mv is None:
            return 0
        try:
            cur = RunInfo._make(mv.run)
            if mv.store:
                src = self.tiers[cur.tier]
                assert isinstance(src, Store)
                data = await src.read(cur.base, cur.nbytes)
                with memoryview(mv) as buf:
                    buf[:] = data
            if recompress is not None:
                await trio.to_thread.run_sync(mv.recompress, recompress.algorithm,
                                              recompress.level, limiter=self._resume)
            ops = mv.allocate(list(to))
            if ops is None:
                raise NoRoom(errno.ENOSPC, "no tier has room")
            if ops:
                with memoryview(mv) as buf:
                    for tier, base, length, offset, life in ops:
                        dst = self.tiers[tier]
                        assert isinstance(dst, Store)
                        await _write_lent(dst, base, buf[offset : offset + length], life)
            return cur.npages if mv.commit() else 0
        finally:
            mv.abort()  # a no-op after commit; otherwise gives back the pin and any allocation

    # ------------------------------------------------------------------ lifecycle

    def start(self, resend: bool = False) -> None:
        self.lane.start()
        if resend:
            rc = self.lane.resend()
            if rc:
                log.warning("shard %d: FUSE_NOTIFY_RESEND failed: %s", self.shard,
                            os.strerror(rc))

    async def close(self) -> None:
        """Stop the threads, close the stores, then the lane (a lane already closed, as a
        test that inspects the map afterwards does, is left as it is)."""
        if not self.lane.closed:
            await trio.to_thread.run_sync(self.lane.stop)
        for t in self.tiers:
            if isinstance(t, Store):
                await t.aclose()
        self.lane.close()

    # ------------------------------------------------------------------ statistics

    def tier_index(self, name: str) -> int:
        for t in self.tiers:
            if t.name == name:
                return t.index
        raise KeyError(name)

    def statistics(self) -> LaneStatistics:
        d = self.lane.statistics()
        tiers = []
        for t, s in zip(self.tiers, d["tiers"], strict=True):
            extra = t.extra_statistics()
            tiers.append(TierStatistics(
                name=t.name, kind=t.kind, compression=str(t.cfg.compression),
                pages=s["pages"], zero_pages=s["zero_pages"], stored_bytes=s["live_bytes"],
                capacity_bytes=s["capacity_segments"] * SEG_SIZE,
                available_bytes=s["segments"] * SEG_SIZE, free_bytes=s["free_bytes"],
                segments=s["segments"], free_segments=s["free_segments"],
                largest_free_extent=s["largest_free_extent"], free_extents=s["free_extents"],
                draining=bool(s["draining"]), failed=bool(s["failed"]), pages_in=s["pages_in"],
                pages_out=s["pages_out"], promotions=s["promotions"], demotions=s["demotions"],
                bytes_moved=s["bytes_moved"], read_errors=s["read_errors"],
                write_errors=s["write_errors"], extra=extra))
        stored = sum(t.pages for t in tiers)
        return LaneStatistics(
            size_bytes=self.size, stored_pages=stored,
            zero_pages=d["zero_pages"] + sum(t.zero_pages for t in tiers),
            stored_bytes=sum(t.stored_bytes for t in tiers), orig_bytes=stored * PAGE_SIZE,
            runs=d["runs"], metadata_bytes=d["map_bytes"], map_high_water=d["map_high_water"],
            reads=d["reads"], writes=d["writes"], discards=d["discards"],
            read_errors=d["read_errors"], write_errors=d["write_errors"], enospc=d["enospc"],
            native=d["native"], forwarded=d["forwarded"], rmw=d["rmw"],
            rmw_conflicts=d["rmw_conflicts"], corrupt=d["corrupt"],
            threads_running=d["threads_running"], tiers=tuple(tiers))
