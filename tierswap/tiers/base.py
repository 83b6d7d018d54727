"""The tier interface: a byte store with a segment allocator on top.

In the manner of nbdkit plugins a tier is a handful of calls: `write` and `read` of one
contiguous extent (all or an exception, never partial), `trim` to give room back, `flush`.
What a tier can do is derived from what it implements (`can_trim`). Tiers are created only
through `async create()`, looked up by config kind in `KINDS`. Moving pages between two tiers
is read-from-one, write-to-the-other: the migration primitive lives in device.py.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from tierswap.codec import Codec
from tierswap.config import Config, TierConfig
from tierswap.tiers.segments import SegmentSpace

SEG_SIZE = 1 << 20


class TierError(OSError):
    """An I/O failure inside a tier; the device answers the request with this errno."""


@dataclass
class TierCounters:
    pages_in: int = 0  # pages written into this tier (foreground and moves)
    pages_out: int = 0  # pages read from it
    promotions: int = 0  # pages moved up into this tier
    demotions: int = 0  # pages moved down into this tier
    bytes_moved: int = 0  # bytes moved into this tier by migration
    errors: int = 0


@dataclass(frozen=True)
class TierStatistics:
    name: str
    kind: str
    pages: int
    zero_pages: int
    stored_bytes: int
    capacity_bytes: int
    available_bytes: int  # room usable now (a memory tier grows into its capacity)
    free_bytes: int
    segments: int
    free_segments: int
    largest_free_extent: int
    free_extents: int
    draining: bool
    counters: dict[str, int]
    extra: dict[str, object]


class Tier(ABC):
    kind: ClassVar[str]

    def __init__(self, cfg: TierConfig, index: int, capacity: int, *, align: int = 1,
                 available: int | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.index = index
        self.codec = Codec(cfg.compression)
        nseg = capacity // SEG_SIZE
        self.space = SegmentSpace(nseg, SEG_SIZE, align, available)
        self.pages = 0  # non-zero pages held
        self.zero_pages = 0  # zero pages recorded in runs of this tier
        self.counters = TierCounters()

    @classmethod
    @abstractmethod
    async def create(cls, cfg: TierConfig, index: int, config: Config, shard: int) -> Tier:
        """Open (and prepare) the tier's share for one shard."""

    @abstractmethod
    async def write(self, base: int, data: bytes | memoryview) -> None: ...

    @abstractmethod
    async def read(self, base: int, length: int) -> bytes: ...

    def write_nowait(self, base: int, data: bytes | memoryview) -> bool:
        """Store without awaiting when the tier can (memory); False means use `write`."""
        return False

    def note_allocation(self) -> None:  # noqa: B027 - a hook, empty unless a tier needs it
        """Called after space was taken from this tier (the memory tier wakes its grower)."""

    def read_nowait(self, base: int, length: int) -> bytes | None:
        """Copy out without awaiting when the tier can (memory); None means use `read`."""
        return None

    async def trim(self, base: int, length: int) -> None:
        raise NotImplementedError

    @property
    def can_trim(self) -> bool:
        return type(self).trim is not Tier.trim

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def extra_statistics(self) -> dict[str, object]:
        return {}

    def statistics(self) -> TierStatistics:
        s = self.space.statistics()
        return TierStatistics(
            name=self.name, kind=self.kind, pages=self.pages, zero_pages=self.zero_pages,
            stored_bytes=s.live_bytes, capacity_bytes=s.capacity_bytes,
            available_bytes=s.segments * self.space.seg_size, free_bytes=self.space.free_bytes(),
            segments=s.segments, free_segments=s.free_segments,
            largest_free_extent=s.largest_free_extent, free_extents=s.free_extents,
            draining=self.space.draining, counters=dataclasses.asdict(self.counters),
            extra=self.extra_statistics(),
        )


def shard_capacity(cfg: TierConfig, config: Config) -> int:
    """Each shard owns an equal, segment-aligned share of every tier."""
    return (cfg.capacity // config.shards) // SEG_SIZE * SEG_SIZE
