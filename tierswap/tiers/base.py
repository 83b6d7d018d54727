"""The tier contract: what a tier provides, and what the lane does for it.

A tier is one of two things:

* a **memory** tier: an arena of locked RAM (tiers/memory.py) that the native lane reads and
  writes itself, on its own threads, without Python;
* a **store**: bytes somewhere slower (a file, NBD targets) that trio reads and writes when the
  lane hands it a job (tiers/file.py, tiers/remote.py).

The lane owns every tier's *space* (1 MiB segments, allocation, live counts, read guards) and
the map, so a store is only a byte store at tier offsets, in the manner of an nbdkit plugin: a
handful of calls, all-or-nothing, with capabilities derived from what is implemented.

    class Store:
        kind: str                          # config kind
        align: int = 4096                  # the lane starts each batch on this boundary
        @classmethod async def create(cls, cfg, index, config, shard, kit) -> Store
        async def read(base, length) -> bytes       # required; all or raise TierError
        async def write(base, data, life) -> None   # required; all or raise TierError
        async def trim(base, length) -> None        # optional: can_trim; compact gives room back
        async def run_background(task_status)       # optional: reconnect, repair
        def available() -> bool                     # optional (default True): False = take no
                                                    # new pages now (the lane spills past it)
        def extra_statistics() -> StoreStatistics   # optional: typed per-kind numbers
        async def aclose() -> None                  # optional

`data` is a view of the lane's buffer lent for the call only: it is released when write returns,
and a store must not keep it (or a buffer export of it) beyond that.

`life` is the segment's allocation counter (the lane bumps it each time a segment is opened
from free): a store with per-segment state (remote placement) resets that state when it sees a
new life. Reads never run on bytes a segment no longer holds: the lane keeps a read guard from
the lookup until the job is finished (docs/design.md, "Concurrency rules").

Sealing (AES-GCM) is a wrapper over a store's raw I/O, like an nbdkit filter over a plugin:
see `BlockSealer` in tierswap/crypto.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from tierswap.config import Config, TierConfig
from tierswap.errors import TierError as TierError  # the tiers raise it; re-exported

if TYPE_CHECKING:
    from tierswap.kit import Kit

SEG_SIZE = 1 << 20
SEG_SHIFT = 20




@dataclass(frozen=True)
class TierStatistics:
    """One tier of one shard, as the lane and the store see it (summed across shards by
    commands.py). Counts are pages, sizes are bytes."""

    name: str
    kind: str
    compression: str
    pages: int  # non-zero pages held
    zero_pages: int  # zero pages recorded in runs of this tier
    stored_bytes: int  # live bytes in the tier's space
    capacity_bytes: int
    available_bytes: int  # usable now (a memory tier grows into its capacity)
    free_bytes: int
    segments: int
    free_segments: int
    largest_free_extent: int
    free_extents: int
    draining: bool
    failed: bool
    pages_in: int
    pages_out: int
    promotions: int
    demotions: int
    bytes_moved: int
    read_errors: int
    write_errors: int
    extra: dict[str, Any] = field(default_factory=dict)


class SpaceView:
    """What a store may know about its space, read from the lane (never written by the store):
    which segments hold live bytes, and each segment's life counter (shared memory)."""

    def __init__(self, lane: Any, index: int, life: np.ndarray) -> None:
        self._lane = lane
        self.index = index
        self.life = life  # uint32 per segment, written by the lane
        self.nseg = len(life)

    def live_mask(self) -> np.ndarray:
        live, _free, open_seg = self._lane.segments(self.index)
        mask = np.zeros(self.nseg, bool)
        arr = np.frombuffer(live, np.int64)
        mask[: len(arr)] = arr > 0
        if open_seg >= 0:
            mask[open_seg] = True
        return mask


class Store(ABC):
    """A tier whose bytes trio reads and writes (see the module docstring)."""

    kind: ClassVar[str]
    align: int = 4096  # per store: a remote tier in erasure mode packs pieces (1)

    def __init__(self, cfg: TierConfig, index: int, capacity: int) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.index = index
        self.capacity = capacity
        self.nseg = capacity // SEG_SIZE
        self.space: SpaceView | None = None  # attached by the lane service

    @classmethod
    @abstractmethod
    async def create(cls, cfg: TierConfig, index: int, config: Config, shard: int,
                     kit: Kit | None) -> Store:
        """Open (and check) this shard's share of the tier."""

    @abstractmethod
    async def read(self, base: int, length: int) -> bytes: ...

    @abstractmethod
    async def write(self, base: int, data: bytes | memoryview, life: int) -> None: ...

    async def trim(self, base: int, length: int) -> None:
        raise NotImplementedError

    @property
    def can_trim(self) -> bool:
        return type(self).trim is not Store.trim

    def available(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None

    def extra_statistics(self) -> dict[str, Any]:
        return {}


def shard_capacity(cfg: TierConfig, config: Config) -> int:
    """Each shard owns an equal, segment-aligned share of every tier."""
    return (cfg.capacity // config.shards) // SEG_SIZE * SEG_SIZE
