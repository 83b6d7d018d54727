"""Tier `memory`: compressed pages in a pre-reserved, locked arena inside the daemon.

The arena is taken ahead of need, in chunks mapped with MAP_POPULATE while mlockall is in
force, so storing a page never allocates: under memory pressure the daemon cannot block on
reclaim that needs its own device (see docs/design.md, "Memory-pressure deadlock"). A grower
task maps another chunk when free room runs low, off the trio thread and only while the
daemon's memory cgroup and the host have clear headroom; when it cannot grow, writes spill
to the next tier instead of waiting. The arena never shrinks while the daemon runs.
"""

from __future__ import annotations

import logging
import mmap

import trio

from tierswap.config import Config, TierConfig
from tierswap.tiers.base import SEG_SIZE, Tier, shard_capacity

log = logging.getLogger(__name__)

CHUNK = 32 << 20  # arena growth step; a whole number of segments
INITIAL = 64 << 20  # reserved before serving
HEADROOM_RESERVE = 96 << 20  # never grow into the last this-many bytes of cgroup/host room


def host_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def cgroup_headroom() -> int | None:
    try:
        from tierswap.cgroup import own_headroom_bytes
    except ImportError:  # pragma: no cover - module always present in a full install
        return None
    try:
        return own_headroom_bytes()
    except Exception:  # a cgroup we cannot read is treated as unlimited
        return None


class MemoryTier(Tier):
    kind = "memory"

    def __init__(self, cfg: TierConfig, index: int, capacity: int) -> None:
        super().__init__(cfg, index, capacity, available=0)
        self._chunks: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._per_chunk = CHUNK // SEG_SIZE
        self.want_grow = trio.Event()
        self.grow_failures = 0
        self.headroom_fn = cgroup_headroom  # replaceable in tests
        self.host_fn = host_available

    @classmethod
    async def create(cls, cfg: TierConfig, index: int, config: Config, shard: int) -> MemoryTier:
        tier = cls(cfg, index, shard_capacity(cfg, config))
        while tier.space.available * SEG_SIZE < min(INITIAL, tier.space.nseg * SEG_SIZE):
            if not await tier.grow():
                break
        return tier

    @property
    def arena_bytes(self) -> int:
        return sum(len(m) for m in self._chunks)

    def _may_grow(self) -> bool:
        if self.space.available >= self.space.nseg:
            return False
        need = CHUNK + HEADROOM_RESERVE
        room = self.headroom_fn()
        if room is not None and room < need:
            return False
        return self.host_fn() >= need

    async def grow(self) -> bool:
        """Map and lock one more chunk; False when the budget or the machine says no."""
        if not self._may_grow():
            return False
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        count = min(self._per_chunk, self.space.nseg - self.space.available)
        try:
            # Populating faults every page in: do it where blocking on reclaim is harmless.
            m = await trio.to_thread.run_sync(
                lambda: mmap.mmap(-1, count * SEG_SIZE, flags=flags)
            )
        except OSError as e:
            self.grow_failures += 1
            log.warning("memory tier %s: cannot grow the arena: %s", self.name, e.strerror)
            return False
        self._chunks.append(m)
        self._views.append(memoryview(m))
        self.space.add_segments(count)
        return True

    async def run_grower(self) -> None:
        """Keep about two chunks of free room ahead of the writers, while allowed."""
        while True:
            await self.want_grow.wait()
            self.want_grow = trio.Event()
            while self.space.free_bytes() < 2 * CHUNK and await self.grow():
                await trio.sleep(0)
            await trio.sleep(0.05)  # at most ~20 growth attempts a second when refused

    def note_allocation(self) -> None:
        if self.space.free_bytes() < 2 * CHUNK and self.space.available < self.space.nseg:
            self.want_grow.set()

    def _slot(self, base: int, length: int) -> tuple[memoryview, int]:
        c, off = divmod(base, CHUNK)
        assert off + length <= CHUNK, "an extent never crosses a chunk"
        return self._views[c], off

    def write_nowait(self, base: int, data: bytes | memoryview) -> bool:
        view, off = self._slot(base, len(data))
        view[off : off + len(data)] = data
        return True

    def read_nowait(self, base: int, length: int) -> bytes:
        view, off = self._slot(base, length)
        return view[off : off + length].tobytes()

    async def write(self, base: int, data: bytes | memoryview) -> None:
        self.write_nowait(base, data)

    async def read(self, base: int, length: int) -> bytes:
        return self.read_nowait(base, length)

    async def aclose(self) -> None:
        for v in self._views:
            v.release()
        for m in self._chunks:
            m.close()
        self._views.clear()
        self._chunks.clear()

    def extra_statistics(self) -> dict[str, object]:
        return {"arena_bytes": self.arena_bytes, "grow_failures": self.grow_failures}
