"""The tiering engine of one shard: demotion, promotion, cleaning, and the operator commands.

Every move is `LaneService.move`: copy a record's stored bytes to another place, then publish
with compare-and-swap on the record (its generation included), so foreground writes and
discards that race with a move always win. Background moves are rate-limited (token bucket,
`policy.rate` bytes/s) and yield to foreground I/O between records.

Nothing here holds the map for long: the map is read in slices (`LaneService.runs`, at most a
few thousand records per slice, a checkpoint between slices and a real sleep every few ms, so
the GIL reaches the worker threads that slow-tier reads need), and "coldest first" is found
with a histogram of record ages (log2 buckets) instead of sorting every record, so a pass over
millions of records needs neither memory nor a long stall. FUSE requests never wait for any of
it: the lane serves them on its own threads. After a tier's demotion target is full (ENOSPC),
demotion from that tier backs off (BACKOFF_MIN doubling to BACKOFF_MAX) instead of rescanning
every tick.

Access tracking is per record: its epoch is its write time, refreshed when it is read again
from a slower tier. A record read twice from a slower tier within a short window is promoted
(a clean page the kernel dropped and faulted again reads the same slot); swap readahead reads a
record once, so readahead alone does not promote.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from tierswap import commands
from tierswap._lane import FLAG_RECOMPRESSED
from tierswap.config import (
    MIN_POLICY_RATE,
    Compression,
    ConfigError,
    PolicyConfig,
    parse_policy,
    parse_size,
)
from tierswap.control import ControlError
from tierswap.lane import NoRoom, RunInfo, RunScan
from tierswap.tiers.base import SEG_SIZE, Store, TierError

if TYPE_CHECKING:
    from tierswap.lane import LaneService

log = logging.getLogger(__name__)

TICK = 1.0  # seconds between policy passes
READ_WINDOW = 4096  # records remembered for "read twice" promotion
IDLE_BUCKETS = ((60, "lt_1m"), (600, "lt_10m"), (3600, "lt_1h"))
CLEAN_BELOW = 0.5  # segments at most this full are worth cleaning
BACKOFF_MIN, BACKOFF_MAX = 1.0, 60.0
RECOMPRESS_RATE = 128 << 20  # bytes/s of original pages fed to background recompression
RECOMPRESS_BATCH = 100_000  # records per policy pass
EPOCH_MAX = 0xFFFFFFFF


class Preempted(Exception):
    """A background pass gave way to an operator command waiting for the policy lock."""


class TokenBucket:
    """Byte-rate limit for background moves; foreground I/O is never limited.

    A pass that ran out of tokens sleeps, but never past a change: `set_rate` wakes it to
    recompute its wait at the new rate, and `wake` (called by every operator command) makes a
    sleeper that holds `yield_to` (the policy lock) give way by raising Preempted, so no
    command ever waits on a background pass's sleep. The rate is at least
    config.MIN_POLICY_RATE, so one run's worth of debt costs a fraction of a second.
    """

    def __init__(self, rate: int, *, yield_to: trio.Lock | None = None) -> None:
        self.rate = max(rate, MIN_POLICY_RATE)
        self.tokens = float(self.rate)
        self.t = trio.current_time()
        self._yield_to = yield_to
        self._wake = trio.Event()

    def _refill(self) -> None:
        now = trio.current_time()
        self.tokens = min(float(self.rate), self.tokens + (now - self.t) * self.rate)
        self.t = now

    def set_rate(self, rate: int) -> None:
        self._refill()  # tokens earned so far count at the old rate
        self.rate = max(rate, MIN_POLICY_RATE)
        self.wake()

    def wake(self) -> None:
        """Wake a sleeping `take` to look again (new rate, or a command waiting for the lock)."""
        self._wake.set()

    async def take(self, nbytes: int) -> None:
        self._refill()
        self.tokens -= nbytes
        while self.tokens < 0:
            self._wake = trio.Event()
            with trio.move_on_after(-self.tokens / self.rate):
                await self._wake.wait()
            if self._yield_to is not None and self._yield_to.statistics().tasks_waiting:
                raise Preempted
            self._refill()


def _always() -> bool:
    return True


def _age_bucket(age: int) -> int:
    return max(0, age).bit_length()  # 0: age 0; b: age in [2^(b-1), 2^b)


class Coldest:
    """`async for run in policy.coldest(tier)`: a histogram pass, then one sliced pass per
    non-empty age bucket, oldest first (a class, so leaving the loop early needs no clean-up).
    A record moved away or rewritten meanwhile is simply not seen again."""

    def __init__(self, policy: Policy, tier: int, idle_for: float) -> None:
        self._p, self._tier, self._idle = policy, tier, idle_for
        self._buckets: list[int] | None = None
        self._scan: RunScan | None = None
        self._now = 0
        self._floor = EPOCH_MAX

    def __aiter__(self) -> Coldest:
        return self

    async def __anext__(self) -> RunInfo:
        if self._buckets is None:
            self._now, hist = await self._p._histogram(self._tier)
            self._floor = int(self._now - self._idle) if self._idle > 0 else EPOCH_MAX
            self._buckets = sorted(hist, reverse=True)
        while True:
            if self._scan is not None:
                try:
                    return await self._scan.__anext__()
                except StopAsyncIteration:
                    self._scan = None
            if not self._buckets:
                raise StopAsyncIteration
            b = self._buckets.pop(0)
            # bucket b holds ages [2^(b-1), 2^b): epochs <= now - 2^(b-1) are this old or older
            max_epoch = min(self._floor, self._now - ((1 << (b - 1)) if b else 0))
            self._scan = self._p.svc.runs(self._tier, max_epoch)


class Policy:
    def __init__(self, service: LaneService, cfg: PolicyConfig) -> None:
        self.svc = service
        self.lane = service.lane
        self.cfg = cfg
        self.lock = trio.Lock()  # one mover at a time: background pass or operator command
        self.bucket = TokenBucket(self.cfg.rate, yield_to=self.lock)
        self.recompress_bucket = TokenBucket(RECOMPRESS_RATE, yield_to=self.lock)
        self.reads: OrderedDict[int, int] = OrderedDict()  # record start -> reads seen
        self._promote_queue: list[tuple[int, int]] = []
        self._backoff: dict[int, tuple[float, float]] = {}  # tier -> (until, current delay)

    # ------------------------------------------------------------------ facts

    @property
    def ntiers(self) -> int:
        return len(self.svc.tiers)

    def _tier_stats(self, i: int) -> dict[str, Any]:
        stats: dict[str, Any] = self.lane.statistics()["tiers"][i]
        return stats

    def _fill(self, i: int) -> float:
        s = self._tier_stats(i)
        return s["live_bytes"] / max(1, s["capacity_segments"] * SEG_SIZE)

    def _above_low(self, i: int) -> bool:
        """Demotion goes on while this holds (the watermark as it is now: `policy` may move it)."""
        return self._fill(i) > self.cfg.low_watermark

    def _tier(self, name: Any) -> int:
        if not isinstance(name, str):
            raise ControlError("a tier name is required")
        try:
            return self.svc.tier_index(name)
        except KeyError:
            raise ControlError(f"no tier named {name!r}") from None

    async def _histogram(self, tier: int) -> tuple[int, Counter[int]]:
        """Stored bytes of `tier` by log2 age bucket (one sliced pass)."""
        now = self.lane.epoch()
        hist: Counter[int] = Counter()
        async for r in self.svc.runs(tier):
            hist[_age_bucket(now - r.epoch)] += max(r.nbytes, 1)
        return now, hist

    def coldest(self, tier: int, idle_for: float = 0.0) -> Coldest:
        """Records of `tier`, coldest age bucket first (within a bucket in page order), only
        those idle at least `idle_for` seconds. One sliced pass per non-empty bucket."""
        return Coldest(self, tier, idle_for)

    # ------------------------------------------------------------------ background

    async def run(self) -> None:
        while True:
            await trio.sleep(TICK)
            try:
                async with self.lock:
                    await self.tick()
            except (TierError, OSError) as e:
                log.warning("policy pass stopped: %s", e.strerror or e)
            except Preempted:  # an operator command has the lock now; the next pass goes on
                pass

    async def tick(self) -> None:
        self._note_reads()
        if self.cfg.promote:
            await self.promote_pending()
        now = trio.current_time()
        for i in range(self.ntiers - 1):
            until, _delay = self._backoff.get(i, (0.0, 0.0))
            if now < until:
                continue
            if self._fill(i) > self.cfg.high_watermark:
                await self.demote(i, partial(self._above_low, i))
            if self.cfg.idle_age > 0:
                await self.demote(i, _always, idle_for=self.cfg.idle_age)
        for i in range(self.ntiers):
            await self.clean(i, only_when_needed=True)
        for i in range(self.ntiers):
            await self.recompress(i)

    def _recompress_to(self, i: int) -> Compression | None:
        return self.svc.tiers[i].cfg.recompress

    async def recompress(self, i: int, *, budget: int = RECOMPRESS_BATCH) -> int:
        """Cold records of tier i, recompressed in place at the tier's `recompress` codec (zram's
        recompression: write fast, keep small). Each record is tried once (a flag in the map);
        the bytes are kept only when smaller. Rate-limited, and the coding itself runs at
        SCHED_IDLE priority, so foreground work always comes first."""
        target = self._recompress_to(i)
        if target is None:
            return 0
        t = self.svc.tiers[i]
        max_epoch = self.lane.epoch() - int(t.cfg.recompress_after)
        done = 0
        async for run in self.svc.runs(i, max_epoch):
            if run.flags & FLAG_RECOMPRESSED or run.nbytes == 0:
                continue
            try:
                await self.svc.move(run, [i], recompress=target)
            except NoRoom:
                break
            await self.recompress_bucket.take(run.npages * 4096)
            done += 1
            if done >= budget:
                break
        return done

    def _note_full(self, i: int) -> None:
        _until, delay = self._backoff.get(i, (0.0, 0.0))
        delay = min(BACKOFF_MAX, max(BACKOFF_MIN, delay * 2))
        self._backoff[i] = (trio.current_time() + delay, delay)

    async def demote(self, i: int, more: Callable[[], bool], idle_for: float = 0.0) -> int:
        moved = 0
        if self._tier_stats(i + 1)["draining"]:
            return 0
        async for run in self.coldest(i, idle_for):
            if not more():
                break
            try:
                moved += await self.svc.move(run, [i + 1], recompress=self._recompress_to(i + 1))
            except NoRoom:
                self._note_full(i)
                break
            await self.bucket.take(run.nbytes)
        else:
            self._backoff.pop(i, None)
        return moved

    def _note_reads(self) -> None:
        """Records read from slower tiers: count them, promote the ones read twice."""
        promote: list[tuple[int, int]] = []
        for start, gen, _tier in self.lane.take_recent():
            n = self.reads.pop(start, 0) + 1
            if n >= 2:
                promote.append((start, gen))
            else:
                self.reads[start] = n
                if len(self.reads) > READ_WINDOW:
                    self.reads.popitem(last=False)
        if promote:
            epoch = self.lane.epoch()
            for start, gen in promote:
                self.lane.touch(start, gen, epoch)
            self._promote_queue = promote

    async def promote_pending(self) -> int:
        moved = 0
        for start, gen in self._promote_queue:
            t = self.lane.get_run(start)
            if t is None:
                continue
            run = RunInfo._make(t)
            if run.start != start or run.gen != gen or run.tier == 0 or run.tier >= self.ntiers:
                continue
            for j in range(run.tier):  # the fastest tier with room under its high watermark
                s = self._tier_stats(j)
                if s["draining"] or s["failed"] or self._fill(j) >= self.cfg.high_watermark:
                    continue
                if s["free_bytes"] < run.nbytes:
                    continue
                try:
                    moved += await self.svc.move(run, [j])
                except (NoRoom, TierError):
                    continue
                await self.bucket.take(run.nbytes)
                break
        self._promote_queue = []
        return moved

    def _sparse_segments(self, i: int) -> set[int]:
        live_b, _free, open_seg = self.lane.segments(i)
        live = np.frombuffer(live_b, np.int64)
        idx = np.flatnonzero((live > 0) & (live <= CLEAN_BELOW * SEG_SIZE))
        return {int(s) for s in idx if s != open_seg}

    async def clean(self, i: int, only_when_needed: bool = False) -> dict[str, int]:
        """Move live pages out of sparse segments of tier i so whole segments come free."""
        s = self._tier_stats(i)
        if only_when_needed and (s["free_segments"] >= 2
                                 or s["live_bytes"] > 0.7 * s["segments"] * SEG_SIZE):
            return {"pages": 0}
        segs = self._sparse_segments(i)
        moved = 0
        if not segs:
            return {"pages": 0}
        async for run in self.svc.runs(i):
            if run.nbytes == 0 or run.segment not in segs:
                continue
            try:
                moved += await self.svc.move(run, [i])
            except NoRoom:
                break
            if only_when_needed:  # background cleaning is rate-limited; `compact` is not
                await self.bucket.take(run.nbytes)
        return {"pages": moved}

    # ------------------------------------------------------------------ operator commands

    async def handle(self, req: commands.Request, progress) -> Any:
        """An operator command, already parsed and checked (tierswap.commands)."""
        self.bucket.wake()  # a background pass asleep on the lock we may need gives way
        self.recompress_bucket.wake()
        if isinstance(req, commands.Migrate):
            return await self.migrate(req, progress)
        if isinstance(req, commands.Drain):
            return await self.drain(req, progress)
        if isinstance(req, commands.Undrain):
            i = self._tier(req.tier)
            self.lane.set_draining(i, False)
            return {"tier": self.svc.tiers[i].name}
        if isinstance(req, commands.Compact):
            return await self.compact(req)
        if isinstance(req, commands.SetPolicy):
            return self.set_policy(dict(req.updates))
        if isinstance(req, commands.Inspect):
            return await self.inspect()
        raise ControlError(f"unknown command {req.cmd!r}")

    async def _move_all(self, runs, progress, *, to: list[int], full: str,
                        pages: int | None = None, nbytes: int | None = None,
                        total: int | None = None,
                        done: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        """Move records in order until the page or byte budget is met; report progress.
        NoRoom becomes a ControlError naming how far it got (`full` is its wording)."""
        moved_pages, moved_bytes = done
        async for run in runs:
            if pages is not None and moved_pages >= pages:
                break
            if nbytes is not None and moved_bytes >= nbytes:
                break
            try:
                ok = await self.svc.move(run, to)
            except NoRoom:
                raise ControlError(full.format(moved=moved_pages)) from None
            if ok:
                moved_pages += ok
                moved_bytes += run.nbytes
                await progress({"pages": moved_pages, "total": total})
        return moved_pages, moved_bytes

    async def migrate(self, req: commands.Migrate, progress) -> dict[str, int]:
        src, dst = self._tier(req.src), self._tier(req.dst)
        want_pages, want_bytes = req.pages, req.bytes
        name = self.svc.tiers[dst].name
        if self._tier_stats(dst)["draining"]:
            raise ControlError(f"tier {name} is draining")
        async with self.lock:
            pages, nbytes = await self._move_all(
                self.coldest(src, req.idle_for), progress, to=[dst],
                pages=want_pages, nbytes=want_bytes, total=want_pages,
                full=f"tier {name} is full after moving {{moved}} pages")
        return {"pages": pages, "bytes": nbytes}

    async def drain(self, req: commands.Drain, progress) -> dict[str, int]:
        i = self._tier(req.tier)
        name = self.svc.tiers[i].name
        self.lane.set_draining(i, True)
        others = [j for j in range(self.ntiers) if j != i]
        done = (0, 0)
        async with self.lock:
            for _attempt in range(3):  # records changed under a move are picked up again
                s = self._tier_stats(i)
                if s["pages"] + s["zero_pages"] == 0:
                    break
                done = await self._move_all(
                    self.svc.runs(i), progress, to=others,
                    total=s["pages"] + s["zero_pages"] + done[0], done=done,
                    full=f"no other tier has room to drain {name} "
                         f"({{moved}} pages moved; still draining)")
        return {"pages": done[0], "bytes": done[1], "left": self._tier_stats(i)["pages"]}

    async def compact(self, req: commands.Compact) -> dict[str, int]:
        i = self._tier(req.tier)
        t = self.svc.tiers[i]
        if not isinstance(t, Store) or not t.can_trim:
            raise ControlError(f"tier {t.name} cannot give space back (kind {t.kind})")
        before = _allocated(t)
        async with self.lock:
            moved = (await self.clean(i))["pages"]
            _live, free, _open = self.lane.segments(i)
            for seg in np.flatnonzero(np.frombuffer(free, np.uint8)).tolist():
                # withheld while the hole is punched: a writer must not fill it under us
                if not self.lane.take_segment(i, seg):
                    continue  # a writer took it meanwhile
                try:
                    await t.trim(seg * SEG_SIZE, SEG_SIZE)
                finally:
                    self.lane.give_segment(i, seg)
        return {"pages": moved, "released_bytes": max(0, before - _allocated(t))}

    def set_policy(self, updates: Any) -> dict[str, Any]:
        """Apply `policy KEY=VALUE` updates (strings from the CLI, or typed JSON values)."""
        if not isinstance(updates, dict):
            raise ControlError("policy: expected an object of KEY: VALUE settings")
        typed: dict[str, Any] = {}
        keys = {f.name for f in dataclasses.fields(PolicyConfig)}
        for k, v in updates.items():
            if k not in keys:
                raise ControlError(f"unknown policy key {str(k)[:64]!r}")
            if not isinstance(v, str | int | float | bool):
                raise ControlError(f"policy.{k}: expected a value, got {type(v).__name__}")
            try:
                if k == "promote":
                    if str(v).lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ControlError(f"policy.promote: expected true or false, got {v!r}")
                    typed[k] = str(v).lower() in ("true", "1", "yes")
                elif k == "rate":
                    typed[k] = parse_size(v, "policy.rate")
                else:
                    typed[k] = float(v)
            except ConfigError as e:
                raise ControlError(str(e)) from None
            except (ValueError, OverflowError):
                raise ControlError(f"policy.{k}: expected a number, got {str(v)[:64]!r}") from None
        try:
            self.cfg = parse_policy(typed, self.cfg)
        except ConfigError as e:
            raise ControlError(str(e)) from None
        self.bucket.set_rate(self.cfg.rate)
        return dataclasses.asdict(self.cfg)

    async def inspect(self) -> dict[str, Any]:
        out = []
        stats = self.svc.statistics()
        for i, s in enumerate(stats.tiers):
            now = self.lane.epoch()
            idle = {name: 0 for _, name in IDLE_BUCKETS} | {"longer": 0}
            async for r in self.svc.runs(i):
                age = now - r.epoch
                for limit, name in IDLE_BUCKETS:
                    if age < limit:
                        idle[name] += r.nonzero
                        break
                else:
                    idle["longer"] += r.nonzero
            out.append({
                "name": s.name, "kind": s.kind, "pages": s.pages, "zero_pages": s.zero_pages,
                "stored_bytes": s.stored_bytes, "capacity_bytes": s.capacity_bytes,
                "idle_pages": idle, "free_extents": s.free_extents,
                "largest_free_extent": s.largest_free_extent, "free_bytes": s.free_bytes,
                "draining": s.draining,
            })
        zero_outside = stats.zero_pages - sum(s.zero_pages for s in stats.tiers)
        return {"tiers": out, "zero_pages": zero_outside, "policy": dataclasses.asdict(self.cfg)}


def _allocated(t: Any) -> int:
    v = t.extra_statistics().get("file_allocated_bytes", 0)
    return v if isinstance(v, int) else 0
