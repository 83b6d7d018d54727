"""Tier `memory`: compressed pages in a locked RAM arena that the native lane reads and writes.

The arena is one memfd of the tier's capacity, mapped once (MAP_SHARED) by the lane and grown
from the front in CHUNK steps: a growth extends the memfd and faults the new pages into the
lane's mapping (MADV_POPULATE_WRITE, which allocates them), so the pages are resident and
locked (mlockall) before the lane may place a byte there. Storing a page is then a memcpy into
memory the daemon already holds: under memory pressure the lane never waits for reclaim that
might need its own device (docs/design.md, "Memory-pressure deadlock"). Because the arena is a
memfd in the shard's kit, it outlives a crashed shard (tierswap/kit.py).

Growth is single-flight: one growth at a time per tier, shared by the background grower and by
every write that found every tier full; they all wait for the same result, for at most
GROW_WAIT seconds. The worker thread doing the growth may block on reclaim (that is why it is a
thread) and cannot be cancelled, so nothing is started while one is in flight, the arena never
exceeds the capacity (checked before and after the await), and growth happens only while the
daemon's memory cgroup and the host have headroom for the chunk plus a reserve. When the arena
cannot grow, writes spill to the next tier. The arena never shrinks while the shard runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import trio

from tierswap.config import TierConfig
from tierswap.kit import Kit
from tierswap.tiers.base import SEG_SIZE

log = logging.getLogger(__name__)

CHUNK = 32 << 20  # growth step; a whole number of segments
INITIAL = 64 << 20  # grown before serving
HEADROOM_RESERVE = 96 << 20  # never grow into the last this-many bytes of cgroup/host room
GROW_WAIT = 2.0  # seconds a full write waits for growth before it gets ENOSPC


def host_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def cgroup_headroom() -> int | None:
    from tierswap.cgroup import own_headroom_bytes

    try:
        return own_headroom_bytes()
    except Exception:  # a cgroup we cannot read is treated as unlimited
        return None


class MemoryTier:
    kind = "memory"

    def __init__(self, cfg: TierConfig, index: int, capacity: int, kit: Kit) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.index = index
        self.capacity = capacity // SEG_SIZE * SEG_SIZE
        self.nseg = self.capacity // SEG_SIZE
        self.fd = kit.memfd(f"arena.{index}")
        self.size = os.fstat(self.fd).st_size  # grown so far (a restart keeps it)
        if self.size > self.capacity or self.size % SEG_SIZE:
            raise ValueError(f"tier {self.name}: the kit's arena does not fit the configuration")
        self.life = np.frombuffer(kit.mapped(f"life.{index}", max(4, self.nseg * 4)), np.uint32)
        self.lane: Any = None
        self.grow_failures = 0
        self.growths = 0
        self._inflight: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self.headroom_fn: Callable[[], int | None] = cgroup_headroom  # replaceable in tests
        self.host_fn: Callable[[], int] = host_available
        self.extend_fn: Callable[[int, int], None] = self._extend  # runs in a worker thread

    def lane_spec(self) -> dict[str, Any]:
        c = self.cfg.compression
        return {"kind": "memory", "codec": c.algorithm, "level": c.level, "nseg": self.nseg,
                "available": self.size // SEG_SIZE, "align": 1, "arena_fd": self.fd,
                "life": self.life, "grow_below": 2 * CHUNK}

    # ------------------------------------------------------------------ growth

    def may_grow(self) -> bool:
        if self.size >= self.capacity:
            return False
        need = CHUNK + HEADROOM_RESERVE
        room = self.headroom_fn()
        if room is not None and room < need:
            return False
        return self.host_fn() >= need

    def _extend(self, old: int, chunk: int) -> None:
        """Worker thread: make [old, old + chunk) of the arena real, resident and locked: the
        memfd grows, and writing every page through the lane's mapping allocates it there
        (MADV_POPULATE_WRITE; mlockall locks what it faults in). This is where growth may
        block on reclaim."""
        os.ftruncate(self.fd, old + chunk)
        self.lane.populate(self.index, old, chunk)

    def request_growth(self) -> trio.Event:
        """Start a growth unless one is in flight; the event is set when it has finished (or
        at once when the arena may not grow). Growth runs in the grower's nursery, never in a
        caller's cancel scope: its worker thread cannot be cancelled, and a write waiting for
        room must be able to give up after GROW_WAIT without waiting for the thread."""
        if self._inflight is not None:
            return self._inflight
        ev = trio.Event()
        if self._nursery is None or not self.may_grow():
            ev.set()
            return ev
        self._inflight = ev
        self._nursery.start_soon(self._grow_once, ev)
        return ev

    async def _grow_once(self, ev: trio.Event | None = None) -> bool:
        try:
            if not self.may_grow():  # re-checked here: conditions change while we wait
                return False
            old = self.size
            chunk = min(CHUNK, self.capacity - old)
            try:
                await trio.to_thread.run_sync(self.extend_fn, old, chunk,
                                              abandon_on_cancel=False)
            except OSError as e:
                self.grow_failures += 1
                log.warning("memory tier %s: cannot grow the arena: %s", self.name,
                            e.strerror or e)
                with contextlib.suppress(OSError):  # give back what a half-done growth took
                    os.ftruncate(self.fd, old)
                return False
            self.size = old + chunk
            self.growths += 1
            self.lane.add_segments(self.index, chunk // SEG_SIZE)
            return True
        finally:
            if ev is not None:
                self._inflight = None
                ev.set()

    async def grow_for_write(self) -> None:
        """A write found every tier full: wait at most GROW_WAIT for the growth in flight (or
        a new one). The write then places again, and gets ENOSPC if there is still no room."""
        with trio.move_on_after(GROW_WAIT):
            await self.request_growth().wait()

    async def prepare(self) -> None:
        """Before serving: the initial reserve (a restarted shard already has it)."""
        while self.size < min(INITIAL, self.capacity):
            if not await self._grow_once():
                break

    async def run_grower(self, wanted: Callable[[], trio.Event]) -> None:
        """Keep about two chunks of room ahead of the writers, while allowed. `wanted()` is the
        event the lane service sets when the lane asks for growth."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                while True:
                    await wanted().wait()
                    while self.may_grow():
                        st = self.lane.statistics()["tiers"][self.index]
                        if st["free_bytes"] >= 2 * CHUNK:
                            break
                        before = self.size
                        await self.request_growth().wait()
                        if self.size == before:  # refused or failed: try again later
                            break
                    await trio.sleep(0.05)  # at most ~20 attempts a second when refused
            finally:
                self._nursery = None

    def extra_statistics(self) -> dict[str, Any]:
        return {"arena_bytes": self.size, "grow_failures": self.grow_failures,
                "growths": self.growths}
