"""Tier `remote`: sealed pages on one or more NBD exports, replicated, surviving target loss.

Layout. The tier's address space (its space in the lane, capacity = this shard's share) maps 1:1
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

State across a crash. Placement, the segment lives and each target's missed/suspect bitmaps
are numpy views of the kit memfd `state.T`, the sealing key, nonce reservation, counters and
tags are in `secrets.T` (tierswap/kitstate.py, crypto.py; erasure coding: tiers/ecstate.py),
so a shard that replaces a dead one adopts them and reads every page its predecessor wrote.
Each is updated before the I/O that relies on it, so any instant of death leaves a state to
continue from. Connection state is not kept: the replacement reconnects, and since a target may
have lost its contents while no process of ours watched, its first connection counts as a
return (its segments are suspect until verified), exactly as after an outage.

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
from tierswap.kit import Kit
from tierswap.kitstate import Field, Layout, claim
from tierswap.nbd import (
    NBDClient,
    NBDClientError,
    NBDDisconnected,
    NBDError,
    NBDHandshakeError,
    NBDTimeout,
    open_nbd_client,
)
from tierswap.tiers.base import SEG_SHIFT, SEG_SIZE, Store, TierError, shard_capacity
from tierswap.tiers.ecseal import FragmentSecrets
from tierswap.tiers.erasure import ErasureStore, Geometry
from tierswap.tiers.ratelimit import ByteRate

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

    def __init__(self, index: int, url: str, missed: np.ndarray, suspect: np.ndarray) -> None:
        self.index = index
        self.url = url
        self.client: NBDClient | None = None
        # one bit per segment, views of the tier's state (a kit memfd): only ever updated in
        # place, never rebound
        self.missed = missed  # its copy of the segment is stale or absent
        self.suspect = suspect  # may have lost its copy while away: verify
        self.errors = 0
        self.reconnects = 0
        self.ever_connected = False
        self.down_since: float = -math.inf  # trio clock; -inf: never connected
        self.lost = trio.Event()  # set when marked down: wakes its connection task
        self.warned_degraded = False

    @property
    def up(self) -> bool:
        return self.client is not None


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


class RemoteTier(Store):
    kind = "remote"

    def __init__(self, cfg: TierConfig, index: int, capacity: int, shard: int,
                 shards: int = 1, kit: Kit | None = None) -> None:
        super().__init__(cfg, index, capacity)
        nseg = self.nseg
        # replicas seal whole 4 KiB blocks, so the lane starts each batch on one; erasure
        # coding packs pieces back to back (its fragments are sealed block by block)
        self.align = BLOCK if cfg.erasure is None else 1
        self.errors = 0
        self.shard = shard
        self.shards = shards
        self.origin = shard * capacity
        self.need = (shard + 1) * capacity  # export bytes this shard needs
        self.replicas = cfg.replicas
        self.context = f"tierswap/{self.kind}/{self.name}/shard{shard}"
        # the state a replacement shard needs is in the kit's state.<index> (kitstate.py)
        # (a tier a dead process served must be adopted: never silently started afresh)
        served = kit is not None and kit.has(f"life.{index}")
        region, state = self._layout(cfg, nseg).open(kit, f"state.{index}", self.context,
                                                      adopt=True if served else None)
        self.adopted = region is not None and region.adopted  # made by a process now dead
        self._placed_life = state["placed_life"]  # the lane's segment life we placed for
        self._life = state["life"]  # bumped when a segment is (re)placed
        if cfg.erasure is None:
            self.placement = state["placement"]
            self.targets = [_Target(i, url, state["missed"][i], state["suspect"][i])
                            for i, url in enumerate(cfg.targets)]
            self.sealer = BlockSealer.for_tier(self.kind, self.name, shard, capacity, kit,
                                               index, adopt=self.adopted)
        else:  # the store keeps its own per-fragment state; these stay unused
            self.placement = np.full((nseg, self.replicas), -1, np.int16)
            self.targets = [_Target(i, url, np.zeros(nseg, bool), np.zeros(nseg, bool))
                            for i, url in enumerate(cfg.targets)]
            # (with erasure coding the store seals per fragment: this one is a single block)
            self.sealer = BlockSealer(BLOCK, self.context.encode())
        self.repair_rate = ByteRate(cfg.repair_rate)
        self.store: ErasureStore | None = None
        if cfg.erasure is not None:
            self._init_erasure(cfg, nseg, shard, kit, state)
        if region is not None:
            region.commit()  # last: everything it names is initialised
        if self.adopted:
            log.info("tier %s: adopted the state of shard %d's previous process; every target "
                     "is verified as it connects", self.name, shard)
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

    @staticmethod
    def _layout(cfg: TierConfig, nseg: int) -> Layout:
        n = len(cfg.targets)
        fields = [Field("life", np.uint32, (nseg,)), Field("placed_life", np.uint32, (nseg,))]
        if cfg.erasure is None:
            return Layout("remote/replicas/1", [
                *fields, Field("placement", np.int16, (nseg, cfg.replicas), -1),
                Field("missed", np.bool_, (n, nseg)), Field("suspect", np.bool_, (n, nseg))])
        g = Geometry(*cfg.erasure, SEG_SIZE)
        return Layout(f"remote/erasure-{g.k}+{g.m}/1", [
            *fields, Field("slots_fixed", np.uint8, (n,)),
            *ErasureStore.fields(g, nseg, n)])

    @classmethod
    async def create(cls, cfg: TierConfig, index: int, config: Config, shard: int,
                     kit: Kit | None = None) -> RemoteTier:
        """Check every reachable export now; unreachable ones start down and are retried.

        Configuration mistakes (export too small or read-only, TLS or export name refused)
        fail here with a clear TierError rather than as a tier that silently never works.
        Connections themselves are made by `run_background`, which owns their tasks.
        """
        share = shard_capacity(cfg, config)
        need = (shard + 1) * share
        sizes: dict[int, int] = {}
        if cfg.erasure is not None:
            g = Geometry(*cfg.erasure, SEG_SIZE)
            need = (shard + 1) * g.min_slots(share // SEG_SIZE, len(cfg.targets)) * g.frag_size
        for i, url in enumerate(cfg.targets):
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
            if size < need and cfg.erasure is not None:
                raise TierError(
                    errno.ENOSPC,
                    f"tier {cfg.name}: export {url} has {size} bytes; erasure {cfg.erasure[0]}"
                    f"+{cfg.erasure[1]} over {len(cfg.targets)} targets needs at least "
                    f"{need // (shard + 1)} per shard ({config.shards} shard(s))")
            if size < need:
                raise TierError(
                    errno.ENOSPC,
                    f"tier {cfg.name}: export {url} has {size} bytes, but shard {shard} uses "
                    f"bytes [{shard * share}, {need}) of it (capacity / shards per shard)")
            sizes[i] = size
        tier = cls(cfg, index, share, shard, config.shards, kit)
        if tier.store is not None:
            for i, size in sizes.items():
                tier._export_seen(i, size)
        return tier

    # ------------------------------------------------------------------ erasure coding

    def _init_erasure(self, cfg: TierConfig, nseg: int, shard: int, kit: Kit | None,
                      state: dict[str, np.ndarray]) -> None:
        """Erasure coding: the store does the coding, this tier only moves its bytes."""
        assert cfg.erasure is not None
        g = Geometry(*cfg.erasure, SEG_SIZE)
        self.min_slots = g.min_slots(nseg, len(cfg.targets))
        self.slots_fixed = state["slots_fixed"]  # export size seen: region fixed
        secrets = None
        if kit is not None:
            size = FragmentSecrets.nbytes(nseg, g.n, g.fblocks)
            region = claim(kit, f"secrets.{self.index}", size,
                           f"fragmentsecrets/1/{nseg}x{g.n}x{g.fblocks}/{self.context}",
                           adopt=self.adopted)
            secrets = FragmentSecrets(nseg, g.n, g.fblocks, buffer=region.payload,
                                      fresh=not region.adopted)
            region.commit()
        self.store = ErasureStore(
            g, nseg, len(cfg.targets), self, slots=self.min_slots, rate=cfg.repair_rate,
            name=self.name, context=self.context.encode(), secrets=secrets, state=state,
            adopted=self.adopted)
        # where this shard's region starts on each target follows from its slot count
        self.frag_base = [shard * int(c) * g.frag_size for c in self.store.placement.capacity]

    def _export_seen(self, i: int, size: int) -> None:
        """The first size seen fixes the target's slots (all it offers, up to one per
        segment) and so where this shard's region starts on it."""
        assert self.store is not None
        if self.slots_fixed[i]:
            return
        g = self.store.g
        slots = max(self.min_slots, min(self.store.nseg, size // self.shards // g.frag_size))
        self.frag_base[i] = self.shard * slots * g.frag_size
        self.store.set_slots(i, slots)
        self.slots_fixed[i] = True

    def _opened(self, seg: int) -> None:
        self._life[seg] += 1  # the store places the segment on its first write of this life

    def is_up(self, t: int) -> bool:
        return self.targets[t].up

    async def frag_read(self, t: int, offset: int, buf: memoryview) -> bool:
        at = self.frag_base[t] + offset
        return await self._on_target(self.targets[t], "read", lambda c: c.readinto(at, buf))

    async def frag_write(self, t: int, offset: int, data: memoryview) -> bool:
        at = self.frag_base[t] + offset
        return await self._on_target(self.targets[t], "write", lambda c: c.write(at, data))

    async def frag_trim(self, t: int, offset: int, length: int) -> bool:
        client = self.targets[t].client
        if client is None or not client.can_trim:
            return False
        at = self.frag_base[t] + offset
        return await self._on_target(self.targets[t], "trim", lambda c: c.trim(at, length))

    # ------------------------------------------------------------------ placement

    def available(self) -> bool:
        """Whether the tier can take new pages now (else the lane spills past it): with no
        target connected (erasure: too few for a segment), it cannot."""
        if self.store is not None:
            return self.store.can_open()
        return any(t.up for t in self.targets)

    def freed(self, seg: int, life: int) -> None:
        """The lane gave segment `seg` (of that life) back to its free set."""
        if self.store is not None and self._placed_life[seg] == life:
            self.store.freed(seg)
            self._placed_life[seg] = 0

    def _new_life(self, seg: int, life: int) -> None:
        """The first write of a segment the lane opened afresh: place it now."""
        if self.store is not None:
            if self._placed_life[seg]:  # its last life's fragments were not given back yet
                self.store.freed(seg)
            self._opened(seg)
        else:
            self._place(seg)
        self._placed_life[seg] = life

    def _place(self, seg: int) -> None:
        n = len(self.targets)
        order = [(seg + j) % n for j in range(n)]
        order.sort(key=lambda i: not self.targets[i].up)  # stable: rotation within each group
        self.placement[seg] = order[: self.replicas]
        self._life[seg] += 1
        for t in self.targets:
            t.missed[seg] = t.suspect[seg] = False

    def _live_mask(self) -> np.ndarray:
        if self.space is None:
            return np.zeros(self.nseg, bool)
        return self.space.live_mask()

    def _placed_on(self, t: _Target) -> np.ndarray:
        return (self.placement == t.index).any(axis=1)

    # ------------------------------------------------------------------ data path

    async def write(self, base: int, data: bytes | memoryview, life: int = 0) -> None:
        seg = base >> SEG_SHIFT
        if self._placed_life[seg] != life or (self.store is None and self.placement[seg, 0] < 0):
            self._new_life(seg, life)
        if self.store is not None:
            try:
                return await self.store.write(base, data, int(self._life[seg]))
            except TierError:
                self.errors += 1
                raise
        sealed = self.sealer.seal(base, data)
        async with self._gate.writing(seg):
            placed = [self.targets[i] for i in self.placement[seg]]
            for t in placed:
                if not t.up:
                    t.missed[seg] = True
            ok = await self._write_copies([t for t in placed if t.up], base, sealed, seg)
        if not ok:
            self.errors += 1
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
        if self.store is not None:
            try:
                return await self.store.read(base, length)
            except TierError:
                self.errors += 1
                raise
        seg = base >> SEG_SHIFT
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
        self.errors += 1
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
        segment may already have sealed into it. (Erasure coding trims a segment's fragment
        slots when it is freed, so there is nothing left to do here.)
        """
        if self.store is not None:
            return
        shift = SEG_SHIFT
        live = self._live_mask()
        for seg in range(base >> shift, -(-(base + length) >> shift)):
            lo = max(base, seg << shift)
            hi = min(base + length, (seg + 1) << shift)
            async with self._gate.copying(seg):
                if live[seg]:
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
        if self.store is not None:
            await self.store.flush()
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
        if self.store is not None:
            self.store.target_lost(t.index)
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
        need = self.need
        if self.store is not None:
            if not self.slots_fixed[t.index]:
                self._export_seen(t.index, client.size)
            need = self.frag_base[t.index] + int(self.store.placement.capacity[t.index]) * \
                self.store.g.frag_size
        if client.size < need or client.read_only:
            log.error("tier %s: %s is read-only or smaller than %d bytes; not using it",
                      self.name, t.url, need)
            await client.aclose()
            return None
        return client

    def _admit(self, t: _Target, client: NBDClient) -> None:
        # after an adoption, a target's first connection is a return too: it may have lost
        # its contents while no process of ours was watching
        returning = t.ever_connected or self.adopted
        if t.ever_connected:
            t.reconnects += 1
        if returning and self.store is not None:
            t.client = client  # up before the store looks: it may queue a rewrite at once
            self.store.target_returned(t.index)
            log.info("tier %s: target %s is back; verifying its fragments", self.name, t.url)
        elif returning:
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
                    await client.read(self.frag_base[t.index] if self.store else self.origin,
                                      512)
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
        if self.store is not None:
            self.store.move_after = self.rereplicate_after
            await nursery.start(self.store.run)
        else:
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
        start = seg << SEG_SHIFT
        last = self.sealer.last_sealed(start, start + SEG_SIZE)
        good = True
        for off in sorted(o for o in (start, last) if o is not None):
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
        start = seg << SEG_SHIFT
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
                await self.repair_rate.take(len(buf))
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
        if self.store is not None:
            return {"targets": [{"url": t.url, "up": t.up, "errors": t.errors,
                                 "reconnects": t.reconnects, **ts}
                                for t, ts in zip(self.targets, self.store.target_statistics(),
                                                 strict=True)],
                    **self.store.statistics()}
        live = self._live_mask()
        targets = []
        degraded = np.zeros_like(live)
        held = self.sealer.sealed_bytes(SEG_SIZE)
        for t in self.targets:
            placed = self._placed_on(t) & live
            behind = placed & (t.missed | t.suspect)
            degraded |= behind if t.up else placed
            pending = int(np.count_nonzero(behind))
            targets.append({"url": t.url, "up": t.up, "errors": t.errors,
                            "reconnects": t.reconnects, "resync_pending": pending,
                            "rebuild_backlog": pending if t.up else int(placed.sum()),
                            "fragments": int(placed.sum()),
                            "bytes": int(held[placed & ~t.missed].sum())})
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
