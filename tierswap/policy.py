"""The tiering engine of one shard: demotion, promotion, cleaning, and the operator commands.

Every move is `VirtualSwapDevice.move_run`: copy a run's stored bytes to another place, then
publish with compare-and-swap, so foreground writes and discards that race with a move always
win. Background moves are rate-limited (token bucket, `policy.rate` bytes/s) and yield to
foreground I/O between runs.

Access tracking is per run, not per page: the record's epoch is its write time, refreshed when
the run is read again from a slower tier. A run read twice from a slower tier within a short
window is promoted (a clean page the kernel dropped and faulted again reads the same slot);
swap readahead reads a run once, so readahead alone does not promote.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from tierswap.config import ConfigError, PolicyConfig, format_size, parse_policy, parse_size
from tierswap.control import ControlError
from tierswap.device import DeviceError
from tierswap.slotmap import ZERO_TIER, Run

if TYPE_CHECKING:
    from tierswap.daemon import Shard
    from tierswap.tiers.base import Tier

log = logging.getLogger(__name__)

TICK = 1.0  # seconds between policy passes
READ_WINDOW = 4096  # runs remembered for "read twice" promotion
IDLE_BUCKETS = ((60, "lt_1m"), (600, "lt_10m"), (3600, "lt_1h"))
CLEAN_BELOW = 0.5  # segments at most this full are worth cleaning


class TokenBucket:
    """Byte-rate limit for background moves; foreground I/O is never limited."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.t = trio.current_time()

    async def take(self, nbytes: int) -> None:
        now = trio.current_time()
        self.tokens = min(float(self.rate), self.tokens + (now - self.t) * self.rate)
        self.t = now
        self.tokens -= nbytes
        if self.tokens < 0:
            await trio.sleep(-self.tokens / self.rate)


class Policy:
    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.device = shard.device
        self.cfg: PolicyConfig = shard.config.policy
        self.bucket = TokenBucket(self.cfg.rate)
        self.reads: OrderedDict[int, int] = OrderedDict()  # run start -> reads seen
        self.lock = trio.Lock()  # one mover at a time: background pass or operator command
        self._promote_queue: list[int] = []

    # ------------------------------------------------------------------ selection

    def tier_runs(self, tier: int) -> list[Run]:
        return list(self.device.map.iter_runs(tier))

    def coldest(self, tier: int, idle_for: float = 0.0) -> list[Run]:
        runs = self.tier_runs(tier)
        if not runs:
            return []
        epochs = np.fromiter((r.epoch for r in runs), np.int64, len(runs))
        order = np.argsort(epochs, kind="stable")
        if idle_for > 0:
            cutoff = self.device.epoch() - idle_for
            order = order[epochs[order] <= cutoff]
        return [runs[i] for i in order.tolist()]

    def _fill(self, t: Tier) -> float:
        return t.space.live_total / max(1, t.space.nseg * t.space.seg_size)

    # ------------------------------------------------------------------ background

    async def run(self) -> None:
        while True:
            await trio.sleep(TICK)
            try:
                async with self.lock:
                    await self.tick()
            except DeviceError as e:
                log.warning("policy pass stopped: %s", e.strerror or e)

    async def tick(self) -> None:
        tiers = self.device.tiers
        self._note_reads()
        if self.cfg.promote:
            await self.promote_pending()
        for i, t in enumerate(tiers[:-1]):
            if self._fill(t) > self.cfg.high_watermark:
                await self.demote(i, lambda t=t: self._fill(t) > self.cfg.low_watermark)
            if self.cfg.idle_age > 0:
                await self.demote(i, lambda: True, idle_for=self.cfg.idle_age)
        for i in range(len(tiers)):
            await self.clean(i, only_when_needed=True)

    async def demote(self, i: int, more, idle_for: float = 0.0) -> int:
        moved = 0
        if self.device.tiers[i + 1].space.draining:
            return 0
        for run in self.coldest(i, idle_for):
            if not more():
                break
            try:
                moved += await self.device.move_run(run, to=self.device.tiers[i + 1])
            except DeviceError as e:
                if e.errno == errno.ENOSPC:
                    break
                raise
            await self.bucket.take(run.nbytes)
        return moved

    def _note_reads(self) -> None:
        """Runs read from slower tiers: count them, promote the ones read twice."""
        recent = self.device.recent_reads
        promote: list[int] = []
        while recent:
            start, _tier = recent.popleft()
            n = self.reads.pop(start, 0) + 1
            if n >= 2:
                promote.append(start)
            else:
                self.reads[start] = n
                if len(self.reads) > READ_WINDOW:
                    self.reads.popitem(last=False)
        if promote:
            self.device.map.touch(promote, self.device.epoch())
            self._promote_queue = promote

    async def promote_pending(self) -> int:
        moved = 0
        for start in self._promote_queue:
            run = self.device.map.get_run(start)
            if run is None or run.tier in (0, ZERO_TIER):
                continue
            for j in range(run.tier):  # the fastest tier with room under its high watermark
                t = self.device.tiers[j]
                if t.space.draining or self._fill(t) >= self.cfg.high_watermark:
                    continue
                if t.space.free_bytes() < run.nbytes:
                    continue
                try:
                    moved += await self.device.move_run(run, to=t)
                except DeviceError:
                    continue
                await self.bucket.take(run.nbytes)
                break
        self._promote_queue = []
        return moved

    async def clean(self, i: int, only_when_needed: bool = False) -> dict[str, int]:
        """Move live pages out of sparse segments of tier i so whole segments come free."""
        t = self.device.tiers[i]
        sp = t.space
        if only_when_needed and (len(sp.free) >= 2 or sp.live_total > 0.7 * sp.available
                                 * sp.seg_size):
            return {"pages": 0}
        moved = 0
        segs = sp.sparse_segments(CLEAN_BELOW, limit=sp.available)
        by_seg = self.device.map.runs_by_segment(i, set(segs)) if segs else {}
        for seg in segs:
            for run in by_seg[seg]:
                try:
                    moved += await self.device.move_run(run, to=t)
                except DeviceError as e:
                    if e.errno == errno.ENOSPC:
                        return {"pages": moved}
                    raise
                if only_when_needed:  # background cleaning is rate-limited; `compact` is not
                    await self.bucket.take(run.nbytes)
                await trio.sleep(0)
        return {"pages": moved}

    # ------------------------------------------------------------------ operator commands

    async def handle(self, req: dict[str, Any], progress) -> Any:
        cmd = req["cmd"]
        if cmd == "migrate":
            return await self.migrate(req, progress)
        if cmd == "drain":
            return await self.drain(req, progress)
        if cmd == "undrain":
            t = self.device.tiers[self.shard.tier_index(req.get("tier", ""))]
            t.space.draining = False
            return {"tier": t.name}
        if cmd == "compact":
            return await self.compact(req)
        if cmd == "policy":
            return self.set_policy(req.get("set") or {})
        if cmd == "inspect":
            return self.inspect()
        raise ControlError(f"unknown command {cmd!r}")

    def _tier(self, name: Any) -> int:
        if not isinstance(name, str):
            raise ControlError("a tier name is required")
        return self.shard.tier_index(name)

    async def _move(self, runs: list[Run], progress, *, to: Tier | None, full: str,
                    pages: int | None = None, nbytes: int | None = None,
                    total: int | None = None, done: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        """Move runs in order until the page or byte budget is met; report progress.

        `to=None` places each run in the first tier with room (a draining tier takes nothing).
        ENOSPC becomes a ControlError naming how far it got (`full` is its wording)."""
        moved_pages, moved_bytes = done
        for run in runs:
            if pages is not None and moved_pages >= pages:
                break
            if nbytes is not None and moved_bytes >= nbytes:
                break
            n = run.npages if pages is None else min(run.npages, pages - moved_pages)
            size = run.clip(run.start, run.start + n).nbytes
            try:
                ok = await self.device.move_run(run, n, to=to)
            except DeviceError as e:
                if e.errno == errno.ENOSPC:
                    raise ControlError(full.format(moved=moved_pages)) from None
                raise
            if ok:
                moved_pages += ok
                moved_bytes += size
                await progress({"pages": moved_pages, "total": total})
        return moved_pages, moved_bytes

    async def migrate(self, req: dict[str, Any], progress) -> dict[str, int]:
        src, dst = self._tier(req.get("from")), self._tier(req.get("to"))
        if src == dst:
            raise ControlError("--from and --to name the same tier")
        want_pages, want_bytes = req.get("pages"), req.get("bytes")
        if not req.get("all") and want_pages is None and want_bytes is None:
            raise ControlError("say how much: pages, bytes or all")
        dst_tier = self.device.tiers[dst]
        if dst_tier.space.draining:
            raise ControlError(f"tier {dst_tier.name} is draining")
        async with self.lock:
            pages, nbytes = await self._move(
                self.coldest(src, float(req.get("idle_for") or 0)), progress, to=dst_tier,
                pages=want_pages, nbytes=want_bytes, total=want_pages,
                full=f"tier {dst_tier.name} is full after moving {{moved}} pages")
        return {"pages": pages, "bytes": nbytes}

    async def drain(self, req: dict[str, Any], progress) -> dict[str, int]:
        i = self._tier(req.get("tier"))
        t = self.device.tiers[i]
        t.space.draining = True
        done = (0, 0)
        async with self.lock:
            for _attempt in range(3):  # runs changed under a move are picked up again
                runs = self.tier_runs(i)
                if not runs:
                    break
                done = await self._move(
                    runs, progress, to=None, total=t.pages + t.zero_pages + done[0], done=done,
                    full=f"no other tier has room to drain {t.name} "
                         f"({{moved}} pages moved; still draining)")
        return {"pages": done[0], "bytes": done[1], "left": t.pages}

    async def compact(self, req: dict[str, Any]) -> dict[str, int]:
        i = self._tier(req.get("tier"))
        t = self.device.tiers[i]
        if not t.can_trim:
            raise ControlError(f"tier {t.name} cannot give space back (kind {t.kind})")
        before = t.extra_statistics().get("file_allocated_bytes", 0)
        async with self.lock:
            moved = (await self.clean(i))["pages"]
            sp = t.space
            for seg in sorted(sp.free):
                if seg not in sp.free:
                    continue  # a writer took it meanwhile
                # withheld while the hole is punched: a writer must not fill it under us
                sp.free.remove(seg)
                try:
                    await t.trim(seg * sp.seg_size, sp.seg_size)
                finally:
                    sp.free.append(seg)
        after = t.extra_statistics().get("file_allocated_bytes", 0)
        return {"pages": moved, "released_bytes": max(0, int(before) - int(after))}

    def set_policy(self, updates: dict[str, Any]) -> dict[str, Any]:
        typed: dict[str, Any] = {}
        for k, v in updates.items():
            if k not in {f.name for f in dataclasses.fields(PolicyConfig)}:
                raise ControlError(f"unknown policy key {k!r}")
            try:
                if k == "promote":
                    if str(v).lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ControlError(f"policy.promote: expected true or false, got {v!r}")
                    typed[k] = str(v).lower() in ("true", "1", "yes")
                elif k == "rate":
                    typed[k] = parse_size(v, "policy.rate")
                else:
                    typed[k] = float(v)
            except ValueError:
                raise ControlError(f"policy.{k}: expected a number, got {v!r}") from None
        try:
            self.cfg = parse_policy(typed, self.cfg)
        except ConfigError as e:
            raise ControlError(str(e)) from None
        self.bucket.rate = self.cfg.rate
        return dataclasses.asdict(self.cfg)

    def inspect(self) -> dict[str, Any]:
        now = self.device.epoch()
        out = []
        for i, t in enumerate(self.device.tiers):
            runs = self.tier_runs(i)
            idle = {name: 0 for _, name in IDLE_BUCKETS} | {"longer": 0}
            for r in runs:
                age = now - r.epoch
                nz = int(np.count_nonzero(r.lens))
                for limit, name in IDLE_BUCKETS:
                    if age < limit:
                        idle[name] += nz
                        break
                else:
                    idle["longer"] += nz
            s = t.statistics()
            out.append({
                "name": t.name, "kind": t.kind, "pages": t.pages, "zero_pages": t.zero_pages,
                "stored_bytes": s.stored_bytes, "capacity_bytes": s.capacity_bytes,
                "idle_pages": idle, "free_extents": s.free_extents,
                "largest_free_extent": s.largest_free_extent, "free_bytes": s.free_bytes,
                "draining": s.draining,
            })
        return {"tiers": out, "zero_pages": self.device.zero_pages,
                "policy": dataclasses.asdict(self.cfg)}


# ---------------------------------------------------------------------- supervisor side


def split_request(req: dict[str, Any], shards: int) -> list[dict[str, Any]]:
    """Give each shard its share of a counted request (pages/bytes split evenly)."""
    out = []
    for k in range(shards):
        r = dict(req)
        for key in ("pages", "bytes"):
            if isinstance(req.get(key), int):
                share, rem = divmod(req[key], shards)
                r[key] = share + (1 if k < rem else 0)
        out.append(r)
    return out


def combine_replies(req: dict[str, Any], results: list[Any]) -> Any:
    cmd = req["cmd"]
    if cmd in ("migrate", "drain", "compact"):
        keys = {k for r in results if isinstance(r, dict) for k in r}
        return {k: sum(r.get(k, 0) for r in results) for k in keys}
    if cmd == "inspect":
        tiers = []
        for j, t0 in enumerate(results[0]["tiers"]):
            t = dict(t0)
            parts = [r["tiers"][j] for r in results]
            for k in ("pages", "zero_pages", "stored_bytes", "capacity_bytes", "free_extents",
                      "free_bytes"):
                t[k] = sum(p[k] for p in parts)
            t["largest_free_extent"] = max(p["largest_free_extent"] for p in parts)
            t["idle_pages"] = {k: sum(p["idle_pages"][k] for p in parts) for k in t0["idle_pages"]}
            t["draining"] = any(p["draining"] for p in parts)
            stored = t["stored_bytes"]
            t["compression_ratio"] = t["pages"] * 4096 / stored if stored else 0.0
            tiers.append(t)
        return {"tiers": tiers, "zero_pages": sum(r["zero_pages"] for r in results),
                "policy": results[0]["policy"]}
    return results[0]


def render_inspect(res: dict[str, Any]) -> str:
    lines = [f"{'TIER':<10}{'KIND':<8}{'PAGES':>10}{'STORED':>9}{'RATIO':>7}{'<1m':>9}{'<10m':>9}"
             f"{'<1h':>9}{'older':>9}{'ZERO':>9}{'FREE EXT':>9}{'LARGEST':>9}"]
    for t in res["tiers"]:
        i = t["idle_pages"]
        lines.append(
            f"{t['name']:<10}{t['kind']:<8}{t['pages']:>10}{format_size(t['stored_bytes']):>9}"
            f"{t['compression_ratio']:>7.2f}{i['lt_1m']:>9}{i['lt_10m']:>9}{i['lt_1h']:>9}"
            f"{i['longer']:>9}{t['zero_pages']:>9}{t['free_extents']:>9}"
            f"{format_size(t['largest_free_extent']):>9}" + ("  draining" if t["draining"] else "")
        )
    lines.append(f"zero pages outside tiers: {res['zero_pages']}")
    return "\n".join(lines)
