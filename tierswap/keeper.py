"""The supervisor's copy of every shard's kit (tierswap/kit.py): why a shard can die.

Holding a shard's fds keeps its FUSE connection open when the shard dies: requests it had read
but not answered stay queued in the kernel (on the fd that read them, which we hold too) until
its replacement asks for them again (FUSE_NOTIFY_RESEND). Holding its memfds keeps the RAM
arena, the slot map and the secrets of sealed tiers alive.

Alive is not enough under memory pressure: while the shard is dead nothing maps those pages, so
the kernel could swap them out, possibly to the very device whose server is restarting, and
the replacement would then wait forever for its own memory. So the keeper maps every memfd and
keeps its resident pages *locked*: `mlock2(MLOCK_ONFAULT)` on each mapping, and a sweep that
touches every page the kernel reports resident (mincore) that the keeper has not touched yet.
Pages are swept when a kit is fetched and every SWEEP_EVERY seconds (a grown arena is
swept within that); a page allocated since the last sweep is still locked by the shard's own
mlockall as long as the shard lives.

Limits: the keeper maps what it holds for as long as it holds it (address space, not memory:
only resident pages cost anything, and they are the shard's pages, not copies). Sweeping is
O(pages of the memfds) per sweep, a bitmap of 1 bit per page.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
from dataclasses import dataclass, field

import numpy as np

from tierswap.kit import Kit

log = logging.getLogger(__name__)

PAGE = 4096
SWEEP_EVERY = 0.5
MLOCK_ONFAULT = 1
MEMFD_PREFIXES = ("map", "arena.", "life.", "secrets.", "state.")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mlock2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


@dataclass
class _Mapping:
    name: str
    fd: int
    size: int = 0
    mm: mmap.mmap | None = None
    view: np.ndarray | None = None
    touched: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def remap(self) -> None:
        size = os.fstat(self.fd).st_size
        if size == self.size:
            return
        self.close()
        self.size = size
        if size == 0:
            return
        self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self.mm.madvise(getattr(mmap, "MADV_DONTDUMP", 16))
        self.view = np.frombuffer(self.mm, np.uint8)
        addr = self.view.ctypes.data
        if _libc.mlock2(addr, size, MLOCK_ONFAULT) != 0:
            log.warning("keeper: cannot lock %s: %s", self.name, os.strerror(ctypes.get_errno()))
        self.touched = np.zeros(-(-size // PAGE), bool)

    def sweep(self) -> int:
        """Touch (and so lock) the resident pages not touched yet; how many were new."""
        self.remap()
        if self.view is None:
            return 0
        npages = len(self.touched)
        vec = np.zeros(npages, np.uint8)
        if _libc.mincore(self.view.ctypes.data, self.size, vec.ctypes.data) != 0:
            return 0
        new = np.flatnonzero((vec & 1).astype(bool) & ~self.touched)
        if len(new):
            int(self.view[new * PAGE].sum())  # a read of each: faulted into our locked mapping
            self.touched[new] = True
        return len(new)

    def close(self) -> None:
        self.view = None
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        self.size = 0


class KitKeeper:
    """Per shard: the kit (fds), and locked mappings of its memfds."""

    def __init__(self) -> None:
        self.kits: dict[int, Kit] = {}
        self._maps: dict[int, list[_Mapping]] = {}

    def deposit(self, shard: int, kit: Kit) -> None:
        """Take a shard's kit (replacing the one held, whose fds are then closed)."""
        old = self.kits.pop(shard, None)
        for m in self._maps.pop(shard, []):
            m.close()
        self.kits[shard] = kit
        self._maps[shard] = [_Mapping(name, fd) for name, fd in sorted(kit.fds.items())
                             if name.startswith(MEMFD_PREFIXES)]
        self.sweep(shard)
        if old is not None:
            old.close()

    def sweep(self, shard: int | None = None) -> int:
        n = 0
        for k, maps in self._maps.items():
            if shard is None or k == shard:
                for m in maps:
                    try:
                        n += m.sweep()
                    except (OSError, ValueError) as e:
                        log.warning("keeper: shard %d %s: %s", k, m.name, e)
        return n

    def locked_bytes(self, shard: int) -> int:
        return sum(int(m.touched.sum()) * PAGE for m in self._maps.get(shard, []))

    def kit(self, shard: int) -> Kit | None:
        return self.kits.get(shard)

    def release(self, shard: int) -> None:
        """After the shard's device left swap for good: let go of everything."""
        for m in self._maps.pop(shard, []):
            m.close()
        kit = self.kits.pop(shard, None)
        if kit is not None:
            kit.close()

    def release_all(self) -> None:
        for k in list(self.kits):
            self.release(k)
