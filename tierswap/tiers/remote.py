"""Tier `remote`: sealed pages on one or more NBD exports, replicated, surviving target loss.

Layout. The tier's address space (its SegmentSpace, capacity = this shard's share) maps 1:1
onto every export: shard k owns bytes [k * share, (k + 1) * share) of each export, like the
file tier's file, and a byte at tier offset x is at export offset k * share + x on whichever
targets hold its segment. Sealing (tierswap.crypto) keeps lengths, so that map is exact.

Placement. A segment's `replicas` targets are chosen when the segment is opened (allocated
from empty): candidates in the rotation (s, s+1, ...) mod n, connected targets first. The
rotation spreads segments, and so reads (the first listed copy is preferred), evenly; taking
connected targets first means that with a target down new segments are still fully
replicated whenever enough others are up. Deterministic given which targets are up.

Writes are *degraded, not refused*: a piece is acknowledged when it is on every connected
target of its segment, provided that is at least one; a target that is down or fails the
write gets the segment marked missed and is repaired in the background. Refusing instead
would turn one target outage into swap write errors for every page headed here, and the
kernel answers those by keeping pages in RAM: under exactly the memory pressure that made it
swap. It is not silent: `degraded_writes`, `degraded_segments` and each target's
`resync_pending` show it, and the write is logged once per outage. With no target connected
the tier takes no new pieces at all (allocation returns nothing, so the device spills to the
next tier) and a write already placed here fails with EIO.

Reads try the segment's copies in placement order, skipping targets that are down or whose
copy is known stale; if none of those works, stale copies are tried as a last resort (the
tags held in RAM reject anything but the latest content). Data failing authentication on a
copy believed good counts in `auth_failures`; if another copy then succeeds the bad one is
marked for repair. With no copy left the read fails with EIO, never returns wrong data, and
every other page keeps being served.

Failure handling. A target whose request fails with NBDDisconnected/NBDTimeout (or whose
heartbeat does) is marked down. Its connection task reconnects with exponential backoff
(0.1 s doubling to 5 s). On return every live segment placed on it that it did not miss is
*suspect*: the target may be a server that lost its contents (restarted, replaced). The repair
task verifies suspect segments by reading back their first and last sealed blocks; failures
join the missed ones, which are copied segment by segment from a good replica (ciphertext as
is, no decryption). A segment copy excludes writes to that segment (log-structured fill means
only open segments are written, so this rarely blocks). Missed/suspect state is a bitmap per
target (one bit per segment), so it is bounded by construction and never overflows. A target
down longer than `rereplicate_after` (10 s) has its segments re-replicated onto another
connected target not already holding them, when there is one (replicas < targets): copied
from a survivor, then the placement entry is switched.

Bounds: per target one NBD connection with at most MAX_INFLIGHT requests and
MAX_INFLIGHT_BYTES of payload in flight; every request is bounded by `timeout` (5 s). The
device awaits this tier only for pieces placed here, so a slow network cannot stall the RAM
tier. Each export must be dedicated to one tierswap instance (and shard regions to shards).
"""

from __future__ import annotations

import errno
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import numpy as np
import trio

from tierswap.config import Config, TierConfig
from tierswap.crypto import BLOCK, AuthenticationError, BlockSealer
from tierswap.nbd import (
    NBDClient,
    NBDClientError,
    NBDDisconnected,
    NBDError,
    NBDHandshakeError,
    NBDTimeout,
    open_nbd_client,
)
from tierswap.tiers.base import SEG_SIZE, Tier, TierError, shard_capacity
from tierswap.tiers.segments import Piece, SegmentSpace

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0  # per NBD request and per connection attempt
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
HEARTBEAT = 1.0  # an idle connection is probed this often, so a dead target is noticed
MAX_INFLIGHT = 64
MAX_INFLIGHT_BYTES = 8 << 20
REREPLICATE_AFTER = 10.0  # seconds a target is down before its copies move elsewhere
REPAIR_PARALLEL = 4  # segment copies/verifications at once
REPAIR_BATCH = 64  # segments per repair round, so state changes are picked up between rounds
_LOST = (NBDDisconnected, NBDTimeout, trio.ClosedResourceError)


class _Target:
    """One export and what we know about it."""

    def __init__(self, index: int, url: str, nseg: int) -> None:
        self.index = index
        self.url = url
        self.client: NBDClient | None = None
        self.missed = np.zeros(nseg, bool)  # its copy of the segment is stale or absent
        self.suspect = np.zeros(nseg, bool)  # may have lost its copy while away: verify
        self.errors = 0
        self.reconnects = 0
        self.ever_connected = False
        self.down_since: float = -math.inf  # trio clock; -inf: never connected
        self.lost = trio.Event()  # set when marked down: wakes its connection task
        self.warned_degraded = False

    @property
    def up(self) -> bool:
        return self.client is not None


class _RemoteSpace(SegmentSpace):
    """The segment allocator, telling the tier when a segment is opened (to place it)."""

    def __init__(self, nseg: int, on_open: Callable[[int], None],
                 may_allocate: Callable[[], bool]) -> None:
        super().__init__(nseg, SEG_SIZE, BLOCK)
        self._on_open = on_open
        self._may_allocate = may_allocate

    def allocate(self, lens: np.ndarray) -> list[Piece]:
        if not self._may_allocate():
            return []
        pieces = super().allocate(lens)
        for p in pieces:
            if p.base & (self.seg_size - 1) == 0:  # first piece of a freshly opened segment
                self._on_open(p.base >> self.seg_shift)
        return pieces


class _SegmentGate:
    """Writes to a segment vs. a copy of it: a copy waits for the writes in flight and
    holds new ones back, so it never overwrites a newer piece with older bytes."""

    def __init__(self) -> None:
        self._writers: Counter[int] = Counter()
        self._copying: dict[int, trio.Event] = {}
        self._idle: dict[int, trio.Event] = {}

    @asynccontextmanager
    async def writing(self, seg: int) -> AsyncIterator[None]:
        while (busy := self._copying.get(seg)) is not None:
            await busy.wait()
        self._writers[seg] += 1
        try:
            yield
        finally:
            self._writers[seg] -= 1
            if not self._writers[seg]:
                del self._writers[seg]
                idle = self._idle.pop(seg, None)
                if idle is not None:
                    idle.set()

    @asynccontextmanager
    async def copying(self, seg: int) -> AsyncIterator[None]:
        while (busy := self._copying.get(seg)) is not None:
            await busy.wait()
        done = self._copying[seg] = trio.Event()
        try:
            while self._writers.get(seg):
                await self._idle.setdefault(seg, trio.Event()).wait()
            yield
        finally:
            del self._copying[seg]
            done.set()


class RemoteTier(Tier):
    kind = "remote"

    def __init__(self, cfg: TierConfig, index: int, capacity: int, shard: int) -> None:
        super().__init__(cfg, index, capacity, align=BLOCK)
        nseg = self.space.nseg
        self.space = _RemoteSpace(nseg, self._place, self._writable)
        self.shard = shard
        self.origin = shard * capacity
        self.need = (shard + 1) * capacity  # export bytes this shard needs
        self.replicas = cfg.replicas
        self.targets = [_Target(i, url, nseg) for i, url in enumerate(cfg.targets)]
        self.placement = np.full((nseg, self.replicas), -1, np.int16)
        self._life = np.zeros(nseg, np.uint32)  # bumped when a segment is (re)placed
        self.sealer = BlockSealer.for_tier(self.kind, self.name, shard, capacity)
        self._gate = _SegmentGate()
        self._nursery: trio.Nursery | None = None
        self._closing: list[NBDClient] = []  # dropped clients not yet closed
        self._repair_wake = trio.Event()
        # tunables (instance attributes so tests can shorten them)
        self.timeout = REQUEST_TIMEOUT
        self.heartbeat = HEARTBEAT
        self.backoff_max = BACKOFF_MAX
        self.rereplicate_after = REREPLICATE_AFTER
        # counters
        self.auth_failures = 0  # authentication failed on a copy believed good
        self.stale_reads = 0  # a copy known stale was tried and (rightly) rejected
        self.degraded_writes = 0  # pieces acknowledged with fewer than `replicas` copies
        self.resynced_segments = 0
        self.rereplicated_segments = 0

    @classmethod
    async def create(cls, cfg: TierConfig, index: int, config: Config, shard: int) -> RemoteTier:
        """Check every reachable export now; unreachable ones start down and are retried.

        Configuration mistakes (export too small or read-only, TLS or export name refused)
        fail here with a clear TierError rather than as a tier that silently never works.
        Connections themselves are made by `run_background`, which owns their tasks.
        """
        share = shard_capacity(cfg, config)
        need = (shard + 1) * share
        for url in cfg.targets:
            try:
                async with open_nbd_client(url, tls_ca=cfg.tls_ca,
                                           timeout=REQUEST_TIMEOUT) as c:
                    size, read_only = c.size, c.read_only
            except NBDHandshakeError as e:
                raise TierError(errno.EPROTO, f"tier {cfg.name}: {url}: {e}") from None
            except NBDClientError as e:
                log.warning("tier %s: %s unreachable at start, will retry: %s", cfg.name, url, e)
                continue
            if read_only:
                raise TierError(errno.EROFS, f"tier {cfg.name}: export {url} is read-only")
            if size < need:
                raise TierError(
                    errno.ENOSPC,
                    f"tier {cfg.name}: export {url} has {size} bytes, but shard {shard} uses "
                    f"bytes [{shard * share}, {need}) of it (capacity / shards per shard)")
        return cls(cfg, index, share, shard)

    # ------------------------------------------------------------------ placement

    def _writable(self) -> bool:
        return any(t.up for t in self.targets)

    def _place(self, seg: int) -> None:
        n = len(self.targets)
        order = [(seg + j) % n for j in range(n)]
        order.sort(key=lambda i: not self.targets[i].up)  # stable: rotation within each group
        self.placement[seg] = order[: self.replicas]
        self._life[seg] += 1
        for t in self.targets:
            t.missed[seg] = t.suspect[seg] = False

    def _live_mask(self) -> np.ndarray:
        live = self.space.live > 0
        if self.space.open_seg is not None:
            live[self.space.open_seg] = True
        return live

    def _placed_on(self, t: _Target) -> np.ndarray:
        return (self.placement == t.index).any(axis=1)

    # ------------------------------------------------------------------ data path

    async def write(self, base: int, data: bytes | memoryview) -> None:
        seg = base >> self.space.seg_shift
        if self.placement[seg, 0] < 0:  # a caller that did not go through space.allocate
            self._place(seg)
        sealed = self.sealer.seal(base, data)
        async with self._gate.writing(seg):
            placed = [self.targets[i] for i in self.placement[seg]]
            for t in placed:
                if not t.up:
                    t.missed[seg] = True
            ok = await self._write_copies([t for t in placed if t.up], base, sealed, seg)
        if not ok:
            self.counters.errors += 1
            raise TierError(errno.EIO, f"tier {self.name}: no target took the write at {base}")
        if len(ok) < self.replicas:
            self.degraded_writes += 1
            self._repair_wake.set()
            for t in placed:
                if t not in ok and not t.warned_degraded:
                    t.warned_degraded = True
                    log.warning("tier %s: writing without %s until it is back", self.name, t.url)

    async def _write_copies(self, targets: list[_Target], base: int, sealed: memoryview,
                            seg: int) -> list[_Target]:
        ok: list[_Target] = []

        async def one(t: _Target) -> None:
            if await self._write_one(t, self.origin + base, sealed, seg):
                ok.append(t)

        if len(targets) == 1:
            await one(targets[0])
        elif targets:
            async with trio.open_nursery() as n:
                for t in targets:
                    n.start_soon(one, t)
        return ok

    async def _on_target(self, t: _Target, what: str, fn) -> bool:
        """Run one request on a target; a lost connection marks it down, an error counts."""
        client = t.client
        if client is None:
            return False
        try:
            await fn(client)
            return True
        except _LOST as e:
            self._mark_down(t, client, e)
        except NBDError as e:
            t.errors += 1
            log.warning("tier %s: %s failed a %s: %s", self.name, t.url, what, e)
        return False

    async def _write_one(self, t: _Target, offset: int, data: memoryview, seg: int) -> bool:
        ok = await self._on_target(t, "write", lambda c: c.write(offset, data))
        if not ok:
            t.missed[seg] = True
        return ok

    async def read(self, base: int, length: int) -> bytes:
        seg = base >> self.space.seg_shift
        start, end = self.sealer.span(base, length)
        snap = self.sealer.snapshot(start, end)
        placed = [self.targets[i] for i in self.placement[seg] if i >= 0]
        good = [t for t in placed if t.up and not (t.missed[seg] or t.suspect[seg])]
        stale = [t for t in placed if t.up and t not in good]
        failed: list[_Target] = []
        buf = bytearray(end - start)
        for t in good + stale:
            if not await self._read_one(t, self.origin + start, buf):
                continue
            try:
                plain = self.sealer.open(start, buf, snap)
            except AuthenticationError as e:
                if t in good:
                    self.auth_failures += 1
                    failed.append(t)
                    log.error("tier %s: %s on %s", self.name, e, t.url)
                else:
                    self.stale_reads += 1
                continue
            for bad in failed:  # this copy is good: have the bad ones rewritten from it
                bad.missed[seg] = True
                self._repair_wake.set()
            return bytes(plain[base - start : base - start + length])
        self.counters.errors += 1
        raise TierError(errno.EIO, f"tier {self.name}: no readable copy of [{base}, "
                                   f"{base + length}) (segment {seg})")

    async def _read_one(self, t: _Target, offset: int, buf: bytearray) -> bool:
        return await self._on_target(t, "read", lambda c: c.readinto(offset, memoryview(buf)))

    async def trim(self, base: int, length: int) -> None:
        """Best effort NBD TRIM on every copy, of whole segments that are free right now.

        Checked under the segment gate, because a caller's idea of "free" (e.g. a snapshot of
        the free list taken before awaiting) can be stale: the segment may have been handed
        out again, and a TRIM must never race a write of new data. The sealing tags are left
        alone: a trimmed block fails authentication anyway, and a writer that reopened the
        segment may already have sealed into it.
        """
        shift = self.space.seg_shift
        for seg in range(base >> shift, -(-(base + length) >> shift)):
            lo = max(base, seg << shift)
            hi = min(base + length, (seg + 1) << shift)
            async with self._gate.copying(seg):
                if self.space.live[seg] > 0 or self.space.open_seg == seg:
                    continue
                for i in self.placement[seg]:
                    t = self.targets[i] if i >= 0 else None
                    client = t.client if t is not None else None
                    if t is None or client is None or not client.can_trim:
                        continue
                    try:
                        await client.trim(self.origin + lo, hi - lo)
                    except _LOST as e:
                        self._mark_down(t, client, e)
                    except NBDError:
                        t.errors += 1

    async def flush(self) -> None:
        for t in self.targets:
            client = t.client
            if client is not None:
                try:
                    await client.flush()
                except _LOST as e:
                    self._mark_down(t, client, e)
                except NBDError:
                    t.errors += 1

    # ------------------------------------------------------------------ health

    def _mark_down(self, t: _Target, client: NBDClient, why: BaseException) -> None:
        """Take a target out of service (once per connection; later failures are echoes)."""
        if t.client is not client:
            return
        t.client = None
        t.errors += 1
        t.down_since = trio.current_time()
        t.warned_degraded = False
        t.lost.set()
        self._repair_wake.set()
        log.warning("tier %s: target %s down: %s", self.name, t.url, why)
        if self._nursery is not None:
            try:
                self._nursery.start_soon(client.aclose)
                return
            except RuntimeError:  # background already stopped: aclose() closes the rest
                pass
        self._closing.append(client)

    async def _connect(self, t: _Target) -> NBDClient | None:
        assert self._nursery is not None
        try:
            client = await NBDClient.connect(
                t.url, nursery=self._nursery, tls_ca=self.cfg.tls_ca, timeout=self.timeout,
                max_inflight=MAX_INFLIGHT, max_inflight_bytes=MAX_INFLIGHT_BYTES)
        except (NBDClientError, OSError) as e:
            log.debug("tier %s: connecting to %s: %s", self.name, t.url, e)
            return None
        if client.size < self.need or client.read_only:
            log.error("tier %s: %s is read-only or smaller than %d bytes; not using it",
                      self.name, t.url, self.need)
            await client.aclose()
            return None
        return client

    def _admit(self, t: _Target, client: NBDClient) -> None:
        if t.ever_connected:
            t.reconnects += 1
            # It may be a server that lost everything: verify before trusting its copies.
            t.suspect |= self._placed_on(t) & self._live_mask() & ~t.missed
            log.info("tier %s: target %s is back; verifying %d segment(s), resyncing %d",
                     self.name, t.url, int(t.suspect.sum()),
                     int((t.missed & self._live_mask()).sum()))
        t.ever_connected = True
        t.lost = trio.Event()
        t.client = client
        self._repair_wake.set()

    async def _keep_connected(self, t: _Target, first_done: Callable[[], None]) -> None:
        backoff = BACKOFF_MIN
        first = True
        while True:
            client = await self._connect(t)
            if first:
                first = False
                first_done()
            if client is None:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            backoff = BACKOFF_MIN
            self._admit(t, client)
            while t.client is client:
                with trio.move_on_after(self.heartbeat):
                    await t.lost.wait()
                if t.client is not client:
                    break
                try:  # the cheapest request that proves the server still answers
                    await client.read(self.origin, 512)
                except _LOST as e:
                    self._mark_down(t, client, e)
                except NBDError:
                    t.errors += 1

    async def run_background(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Connections (reconnect with backoff, heartbeat) and repair; runs until cancelled.

        Reports started once every target had its first connection attempt, so a daemon that
        awaits `nursery.start` serves with whatever targets are reachable.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._start_background(nursery, task_status)
        finally:
            self._nursery = None

    async def _start_background(self, nursery: trio.Nursery, task_status) -> None:
        pending = len(self.targets)
        all_tried = trio.Event()

        def first_done() -> None:
            nonlocal pending
            pending -= 1
            if pending == 0:
                all_tried.set()

        for t in self.targets:
            nursery.start_soon(self._keep_connected, t, first_done)
        await all_tried.wait()
        nursery.start_soon(self._repair_loop)
        task_status.started()

    # ------------------------------------------------------------------ repair

    async def _repair_loop(self) -> None:
        while True:
            self._repair_wake = trio.Event()
            if not await self._repair_round():
                with trio.move_on_after(1.0):  # also the clock for re-replication's grace
                    await self._repair_wake.wait()

    def _work(self) -> list[tuple[str, int, _Target, _Target | None]]:
        """Up to REPAIR_BATCH jobs: (what, segment, target, destination)."""
        live = self._live_mask()
        jobs: list[tuple[str, int, _Target, _Target | None]] = []
        now = trio.current_time()
        can_move = sum(t.up for t in self.targets) > 0 and len(self.targets) > self.replicas
        for t in self.targets:
            if len(jobs) >= REPAIR_BATCH:
                break
            if t.up:
                placed = self._placed_on(t) & live
                jobs += [("verify", int(s), t, t)
                         for s in np.flatnonzero(placed & t.suspect)[:REPAIR_BATCH]]
                jobs += [("copy", int(s), t, t)
                         for s in np.flatnonzero(placed & t.missed & ~t.suspect)[:REPAIR_BATCH]]
            elif can_move and now - t.down_since >= self.rereplicate_after:
                for s in np.flatnonzero(self._placed_on(t) & live):
                    dst = self._spare(int(s))
                    if dst is not None:
                        jobs.append(("move", int(s), t, dst))
                        if len(jobs) >= REPAIR_BATCH:
                            break
        return jobs[:REPAIR_BATCH]

    def _spare(self, seg: int) -> _Target | None:
        """A connected target not holding the segment, in rotation order."""
        n = len(self.targets)
        row = set(self.placement[seg].tolist())
        for j in range(n):
            t = self.targets[(seg + j) % n]
            if t.up and t.index not in row:
                return t
        return None

    def _source(self, seg: int, exclude: _Target) -> _Target | None:
        for i in self.placement[seg]:
            t = self.targets[i]
            if t is not exclude and t.up and not (t.missed[seg] or t.suspect[seg]):
                return t
        return None

    async def _repair_round(self) -> bool:
        """Run one batch of repair jobs; True if any made progress."""
        jobs = self._work()
        progress = False
        limiter = trio.CapacityLimiter(REPAIR_PARALLEL)

        async def run(job: tuple[str, int, _Target, _Target | None]) -> None:
            nonlocal progress
            async with limiter:
                what, seg, t, dst = job
                if what == "verify":
                    done = await self._verify(seg, t)
                else:
                    assert dst is not None
                    done = await self._copy(seg, dst, moving_from=t if what == "move" else None)
                progress |= done

        async with trio.open_nursery() as n:
            for job in jobs:
                n.start_soon(run, job)
        return progress

    async def _verify(self, seg: int, t: _Target) -> bool:
        """Does the target still hold what we wrote? Check the first and last sealed block."""
        life = self._life[seg]
        start = seg << self.space.seg_shift
        last = self.sealer.last_sealed(start, start + SEG_SIZE)
        good = True
        for off in sorted({start, last} - {None}):
            if not self.sealer.is_sealed(off):
                continue
            snap = self.sealer.snapshot(off, off + BLOCK)
            buf = bytearray(BLOCK)
            if not await self._read_one(t, self.origin + off, buf):
                return False  # target trouble: retried when it is back
            try:
                self.sealer.open(off, buf, snap)
            except AuthenticationError:
                good = False
                break
        if self._life[seg] == life:
            t.suspect[seg] = False
            t.missed[seg] |= not good
        return True

    async def _copy(self, seg: int, dst: _Target, moving_from: _Target | None) -> bool:
        """Copy a segment's sealed bytes from a good replica to `dst` (as ciphertext)."""
        start = seg << self.space.seg_shift
        async with self._gate.copying(seg):
            life = self._life[seg]
            src = self._source(seg, dst)
            if src is None or not dst.up:
                return False
            last = self.sealer.last_sealed(start, start + SEG_SIZE)
            if last is not None:
                buf = bytearray(last + BLOCK - start)
                if not await self._read_one(src, self.origin + start, buf):
                    return False
                if not await self._write_one(dst, self.origin + start, memoryview(buf), seg):
                    return False
            if self._life[seg] != life:
                return True
            dst.missed[seg] = dst.suspect[seg] = False
            if moving_from is None:
                self.resynced_segments += 1
            else:
                row = self.placement[seg]
                if moving_from.index in row and dst.index not in row:
                    row[row == moving_from.index] = dst.index
                    moving_from.missed[seg] = moving_from.suspect[seg] = False
                    self.rereplicated_segments += 1
        return True

    # ------------------------------------------------------------------ lifecycle, stats

    async def aclose(self) -> None:
        clients, self._closing = self._closing, []
        for t in self.targets:
            if t.client is not None:
                clients.append(t.client)
                t.client = None
        for client in clients:
            await client.aclose()

    def extra_statistics(self) -> dict[str, object]:
        live = self._live_mask()
        targets = []
        degraded = np.zeros_like(live)
        for t in self.targets:
            placed = self._placed_on(t) & live
            behind = placed & (t.missed | t.suspect)
            degraded |= behind if t.up else placed
            targets.append({"url": t.url, "up": t.up, "errors": t.errors,
                            "reconnects": t.reconnects,
                            "resync_pending": int(np.count_nonzero(behind))})
        return {
            "targets": targets,
            "replicas": self.replicas,
            "auth_failures": self.auth_failures,
            "stale_reads": self.stale_reads,
            "degraded_writes": self.degraded_writes,
            "degraded_segments": int(np.count_nonzero(degraded)),
            "resynced_segments": self.resynced_segments,
            "rereplicated_segments": self.rereplicated_segments,
        }
