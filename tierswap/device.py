"""The virtual swap device: byte I/O from FUSE -> pages -> slot map -> tiers.

This is where a page goes. A write is cut into 4 KiB pages; zero pages are recorded in the map
only; the others are compressed as one batch off the trio thread and packed into the first
tier with room (spilling to the next ones, ENOSPC when none has room); then the map is updated
in one LMDB transaction and the replaced pages' space is released. A read resolves the map,
copies memory-tier bytes at once, awaits the other tiers, and decompresses as one batch.

Concurrency rules (the daemon is one trio thread; see docs/design.md):
* Map lookups and updates are synchronous. Between a lookup and copying bytes out of a memory
  tier there is no await, so the bytes cannot be freed and reused under the reader.
* Reads from tiers that await take a read guard on the tier's space before the first await;
  a segment freed meanwhile is not reused until those reads are done.
* A write's space is allocated (synchronously), filled (may await), then published in the map
  (synchronously). Two in-flight writes to the same page end with either one, as on any block
  device; migration publishes with compare-and-swap (`SlotMap.relocate`), so a page
  overwritten or discarded mid-move keeps the new content.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

import lmdb
import numpy as np
import trio
import zstandard as zstd

from tierswap.config import PAGE_SIZE
from tierswap.slotmap import MAX_RUN, ZERO_TIER, Run, SlotMap, runs_for_pages
from tierswap.tiers.base import Tier, TierError

log = logging.getLogger(__name__)

# Pages per request above which compression/decompression runs in a worker thread.
THREAD_PAGES = 8
RECENT_READS = 4096  # bounded record of runs read from slower tiers, for promotion
GROW_WAIT = 2.0  # seconds a write may wait for a RAM tier to grow when nothing else has room


class DeviceError(OSError):
    """Answer the FUSE request with this errno."""


@dataclass(frozen=True)
class DeviceStatistics:
    size_bytes: int
    stored_pages: int
    zero_pages: int
    stored_bytes: int
    orig_bytes: int  # uncompressed size of stored non-zero pages
    runs: int
    metadata_bytes: int
    reads: int
    writes: int
    discards: int
    read_errors: int
    write_errors: int
    enospc: int


class VirtualSwapDevice:
    def __init__(self, size: int, slotmap: SlotMap, tiers: list[Tier], threads: int = 2) -> None:
        if size % PAGE_SIZE:
            raise ValueError("device size must be a multiple of the page size")
        self.size = size
        self.npages = size // PAGE_SIZE
        self.map = slotmap
        self.tiers = tiers
        self.zero_pages = 0  # pages in ZERO_TIER runs
        # Threads for zstd; a bounded limiter is also the bound on requests being coded at once.
        self.limiter = trio.CapacityLimiter(threads)
        self.t0 = time.monotonic()
        self.recent_reads: deque[tuple[int, int]] = deque(maxlen=RECENT_READS)
        self.reads = self.writes = self.discards = 0
        self.read_errors = self.write_errors = self.enospc = 0

    def epoch(self) -> int:
        """Coarse clock for the map (seconds since the daemon started)."""
        return int(time.monotonic() - self.t0)

    # -------------------------------------------------------------------------- helpers

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DeviceError(errno.EINVAL, "I/O beyond the end of the device")

    def _account(self, runs: list[Run], sign: int) -> None:
        for run in runs:
            nonzero = int(np.count_nonzero(run.lens))
            if run.tier == ZERO_TIER:
                self.zero_pages += sign * run.npages
            else:
                tier = self.tiers[run.tier]
                tier.pages += sign * nonzero
                tier.zero_pages += sign * (run.npages - nonzero)

    def _release(self, removed: list[Run]) -> None:
        """Give the space of pages that left the map back to their tiers."""
        self._account(removed, -1)
        by_tier: dict[int, list[Run]] = {}
        for r in removed:
            if r.tier != ZERO_TIER:
                by_tier.setdefault(r.tier, []).append(r)
        for t, runs in by_tier.items():
            space = self.tiers[t].space
            if len(runs) <= 8:
                for r in runs:
                    space.release_one(r.base, r.nbytes)
                continue
            bases = np.fromiter((r.base for r in runs), np.int64, len(runs))
            sizes = np.fromiter((r.nbytes for r in runs), np.int64, len(runs))
            space.release(bases, sizes)

    async def _coded(self, fn, *args, pages: int):
        if pages <= THREAD_PAGES:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # -------------------------------------------------------------------------- write

    async def write(self, offset: int, data: bytes) -> int:
        self._check(offset, len(data))
        if not data:
            return 0
        self.writes += 1
        try:
            await self._write(offset, data)
        except DeviceError as e:
            self.write_errors += 1
            if e.errno == errno.ENOSPC:
                self.enospc += 1
            raise
        return len(data)

    async def _write(self, offset: int, data: bytes) -> None:
        head = offset % PAGE_SIZE
        tail = (offset + len(data)) % PAGE_SIZE
        if head or tail:  # partial pages: read-modify-write the edge pages
            first = offset - head
            last = offset + len(data) + (PAGE_SIZE - tail if tail else 0)
            buf = bytearray(await self.read(first, last - first))
            buf[head : head + len(data)] = data
            data, offset = bytes(buf), first
        first = offset // PAGE_SIZE
        n = len(data) // PAGE_SIZE
        pages = np.frombuffer(data, np.uint8).reshape(n, PAGE_SIZE)
        nonzero = pages.view(np.uint64).any(axis=1)
        lens = np.zeros(n, np.uint16)
        blob = b""
        k = int(nonzero.sum())
        epoch = self.epoch()
        if k:
            target = self._first_open_tier()
            if target is None and await self._grow_for(1):  # full, but a RAM tier may grow
                target = self._first_open_tier()
            if target is None:
                raise DeviceError(errno.ENOSPC, "every tier is full")
            sel = pages if k == n else pages[nonzero]
            clens, blob = await self._coded(target.codec.compress, sel, pages=k)
            lens[nonzero] = clens
            try:
                new = await self.store(first, lens, blob, epoch, 0)
            except DeviceError as e:
                if e.errno != errno.ENOSPC or not await self._grow_for(int(lens.sum())):
                    raise
                new = await self.store(first, lens, blob, epoch, 0)
        else:
            new = [Run(first + a, ZERO_TIER, 0, lens[a : a + MAX_RUN], epoch)
                   for a in range(0, n, MAX_RUN)]
        # publish: no await from here to the end
        try:
            removed = self.map.replace(first, first + n, new)
        except lmdb.MapFullError:
            self._release_runs(new)
            raise DeviceError(errno.ENOSPC, "the slot map is full") from None
        self._account(new, +1)
        self._release(removed)

    async def _grow_for(self, nbytes: int) -> bool:
        """Every tier is full but a RAM tier may still grow: wait (briefly) for that.

        Only here does a write wait on growth; normally the grower keeps room ahead and full
        tiers spill. The wait is bounded, so a machine that cannot give memory gets ENOSPC.
        """
        grew = False
        with trio.move_on_after(GROW_WAIT):
            for t in self.tiers:
                grow = getattr(t, "grow", None)
                while grow is not None and not t.space.draining and t.space.free_bytes() < nbytes:
                    if not await grow():
                        break
                    grew = True
        return grew

    def _first_open_tier(self, start: int = 0) -> Tier | None:
        for t in self.tiers[start:]:
            if not t.space.draining and t.space.free_bytes() > 0:
                return t
        return None

    async def store(self, first: int, lens: np.ndarray, blob: bytes | memoryview, epoch: int,
                    start_tier: int, only: Tier | None = None) -> list[Run]:
        """Place pages (stored lengths `lens`, bytes `blob`) into tiers; return their runs.

        Tries tiers from `start_tier` on in order (or only `only`); all or nothing: on failure
        every piece placed so far is released and DeviceError raised.
        """
        offs = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=offs[1:])
        mv = memoryview(blob)
        placed: list[tuple[Tier, int, int, int]] = []  # tier, page a, page b, base
        a = 0
        n = len(lens)
        candidates = [only] if only is not None else self.tiers[start_tier:]
        try:
            for tier in candidates:
                if a == n:
                    break
                pieces = tier.space.allocate(lens[a:])
                tier.note_allocation()
                for p in pieces:
                    placed.append((tier, a + p.a, a + p.b, p.base))
                for p in pieces:
                    chunk = mv[offs[a + p.a] : offs[a + p.b]]
                    if p.nbytes and not tier.write_nowait(p.base, chunk):
                        await tier.write(p.base, chunk)
                if pieces:
                    done = a + pieces[-1].b
                    tier.counters.pages_in += int(np.count_nonzero(lens[a:done]))
                    a = done
            if a < n:
                if not lens[a:].any():  # only zero pages left: they need no room
                    placed.append((None, a, n, 0))  # type: ignore[arg-type]
                else:
                    raise DeviceError(errno.ENOSPC, "every tier is full")
        except BaseException as e:
            for tier, pa, pb, base in placed:
                if tier is not None:
                    tier.space.release(np.array([base]), np.array([int(offs[pb] - offs[pa])]))
            if isinstance(e, TierError):
                raise DeviceError(e.errno or errno.EIO, str(e)) from None
            raise
        runs: list[Run] = []
        for tier, pa, pb, base in placed:
            tid = ZERO_TIER if tier is None else tier.index
            runs += runs_for_pages(first + pa, tid, base, lens[pa:pb], epoch)
        return runs

    # -------------------------------------------------------------------------- read

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if not length:
            return b""
        self.reads += 1
        first = offset // PAGE_SIZE
        last = -(-(offset + length) // PAGE_SIZE)
        out = np.zeros((last - first, PAGE_SIZE), np.uint8)
        try:
            await self.read_pages(first, last, out)
        except DeviceError:
            self.read_errors += 1
            raise
        skip = offset - first * PAGE_SIZE
        if skip == 0 and length == out.nbytes:
            return out.tobytes()
        return out.reshape(-1)[skip : skip + length].tobytes()

    async def read_pages(self, first: int, last: int, out: np.ndarray) -> None:
        runs = self.map.lookup(first, last)
        jobs: list[tuple[Run, bytes]] = []
        waits: list[tuple[Run, Tier, int]] = []
        # --- no await in this loop: memory-tier bytes are copied before anything can free them
        for run in runs:
            if run.tier == ZERO_TIER:
                continue
            nbytes = run.nbytes
            if nbytes == 0:
                continue
            tier = self.tiers[run.tier]
            tier.counters.pages_out += int(np.count_nonzero(run.lens))
            blob = tier.read_nowait(run.base, nbytes)
            if blob is not None:
                jobs.append((run, blob))
            else:
                waits.append((run, tier, tier.space.begin_read()))
                if run.tier > 0:
                    self.recent_reads.append((run.start, run.tier))
        # --- from here on awaits are fine
        try:
            for run, tier, _g in waits:
                try:
                    jobs.append((run, await tier.read(run.base, run.nbytes)))
                except TierError as e:
                    raise DeviceError(e.errno or errno.EIO, str(e)) from None
        finally:
            for _run, tier, g in waits:
                tier.space.end_read(g)
        if not jobs:
            return
        npages = sum(int(np.count_nonzero(r.lens)) for r, _ in jobs)

        def decode() -> None:
            for run, blob in jobs:
                a = run.start - first
                self.tiers[run.tier].codec.decompress_into(blob, run.lens, out[a : a + run.npages])

        try:
            await self._coded(decode, pages=npages)
        except zstd.ZstdError as e:
            log.error("corrupt page data in pages %d..%d: %s", first, last, e)
            raise DeviceError(errno.EIO, "corrupt page data") from None

    # -------------------------------------------------------------------------- discard

    async def discard(self, offset: int, length: int) -> None:
        """Forget a byte range: whole pages leave the map, partial edges are zero-filled."""
        self._check(offset, length)
        self.discards += 1
        a = -(-offset // PAGE_SIZE)
        b = (offset + length) // PAGE_SIZE
        if a >= b:  # no whole page inside the range
            if length:
                await self.write(offset, bytes(length))
            return
        if offset < a * PAGE_SIZE:
            await self.write(offset, bytes(a * PAGE_SIZE - offset))
        if offset + length > b * PAGE_SIZE:
            await self.write(b * PAGE_SIZE, bytes(offset + length - b * PAGE_SIZE))
        self.discard_pages(a, b)

    def discard_pages(self, first: int, last: int) -> None:
        try:
            removed = self.map.replace(first, last, [])
        except lmdb.MapFullError:  # splitting a run needs a page; the pages stay stored
            raise DeviceError(errno.ENOSPC, "the slot map is full") from None
        self._release(removed)

    # -------------------------------------------------------------------------- migration

    async def move_run(self, run: Run, npages: int | None = None, *,
                       to: Tier | None = None, start_tier: int = 0) -> int:
        """Move the first `npages` pages of the whole map record `run` to another place.

        The copy goes to tier `to`, or to the first tier from `start_tier` on with room (a
        draining tier takes nothing). Bytes move as stored (compressed writeback: no
        recompression). Published with compare-and-swap: if the run changed meanwhile
        (overwritten, discarded, split) nothing is published and 0 is returned. Raises
        DeviceError(ENOSPC) when no destination has room.
        """
        n = run.npages if npages is None else min(npages, run.npages)
        part = run.clip(run.start, run.start + n) if n < run.npages else run
        src = self.tiers[run.tier]
        nbytes = part.nbytes
        blob = src.read_nowait(part.base, nbytes) if nbytes else b""
        if blob is None:
            g = src.space.begin_read()
            try:
                blob = await src.read(part.base, nbytes)
            except TierError as e:
                raise DeviceError(e.errno or errno.EIO, str(e)) from None
            finally:
                src.space.end_read(g)
        new = await self.store(part.start, part.lens, blob, part.epoch, start_tier, only=to)
        rest = [run.clip(part.end, run.end)] if n < run.npages else []
        if not self.map.relocate(run, new + rest):
            self._release_runs(new)
            return 0
        # the pages left `src`: account them there, and in their new places
        self._release([part])
        self._account(new, +1)
        for r in new:
            dst = self.tiers[r.tier] if r.tier != ZERO_TIER else None
            if dst is None:
                continue
            dst.counters.bytes_moved += r.nbytes
            moved = int(np.count_nonzero(r.lens))
            if r.tier < run.tier:
                dst.counters.promotions += moved
            elif r.tier > run.tier:
                dst.counters.demotions += moved
        return n

    def _release_runs(self, runs: list[Run]) -> None:
        """Give back space of runs that were stored but never published."""
        for r in runs:
            if r.tier != ZERO_TIER and r.nbytes:
                self.tiers[r.tier].space.release(np.array([r.base]), np.array([r.nbytes]))

    # -------------------------------------------------------------------------- stats

    def statistics(self) -> DeviceStatistics:
        ms = self.map.statistics()
        stored = sum(t.pages for t in self.tiers)
        zero = self.zero_pages + sum(t.zero_pages for t in self.tiers)
        return DeviceStatistics(
            size_bytes=self.size,
            stored_pages=stored,
            zero_pages=zero,
            stored_bytes=sum(t.space.live_total for t in self.tiers),
            orig_bytes=stored * PAGE_SIZE,
            runs=ms.runs,
            metadata_bytes=ms.map_bytes,
            reads=self.reads,
            writes=self.writes,
            discards=self.discards,
            read_errors=self.read_errors,
            write_errors=self.write_errors,
            enospc=self.enospc,
        )


# Worst case for the map is one page per run: ~40 bytes of record and LMDB node, doubled for
# half-full B-tree pages. The map is fixed at this size; swap's large writes use a tiny part.
MAP_BYTES_PER_PAGE = 96
MAP_EXTRA = 16 << 20


async def open_device(config, shard: int) -> VirtualSwapDevice:
    """Build one shard's device: its slot map under state_dir and its share of every tier."""
    from tierswap.tiers import tier_class
    from tierswap.tiers.base import SEG_SIZE

    share = config.size // config.shards
    npages = share // PAGE_SIZE
    map_size = (npages * MAP_BYTES_PER_PAGE + MAP_EXTRA + (1 << 20) - 1) >> 20 << 20
    shard_dir = config.state_dir / f"shard{shard}"
    shard_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(shard_dir, 0o700)  # mkdir's mode is cut by the umask; the map is private
    map_dir = shard_dir / "map"
    slotmap = SlotMap(map_dir, map_size, SEG_SIZE.bit_length() - 1)
    tiers: list[Tier] = []
    try:
        for i, tcfg in enumerate(config.tiers):
            tiers.append(await tier_class(tcfg.kind).create(tcfg, i, config, shard))
    except BaseException:
        for t in tiers:
            await t.aclose()
        slotmap.close()
        raise
    return VirtualSwapDevice(share, slotmap, tiers)
