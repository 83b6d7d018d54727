"""Log-structured space inside a tier: fixed segments, append-only fill, free by live count.

A request's compressed pages are packed back to back into the open segment (one copy or one
write per segment touched), so storage has no per-page rounding and a batch is one contiguous
extent. A freed page only lowers its segment's live byte count; a segment whose count reaches
zero goes back to the free list. Partly live segments are reclaimed by moving their pages
(cleaning), which is the same primitive as migration.

Reuse is deferred while a read that may still target the segment is in flight: a reader takes
a generation number before its first await and the segment is only handed out again once no
read from an older generation remains. All methods are synchronous (trio thread only).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Pages [a, b) of a batch placed at byte location `base` (all in one segment)."""

    a: int
    b: int
    base: int
    nbytes: int


@dataclass(frozen=True)
class SpaceStatistics:
    segments: int  # usable now (memory tiers grow)
    free_segments: int
    live_bytes: int
    capacity_bytes: int
    largest_free_extent: int  # bytes of the longest run of adjacent free segments
    free_extents: int


class SegmentSpace:
    def __init__(self, nseg: int, seg_size: int, align: int = 1, available: int | None = None):
        self.nseg = nseg
        self.seg_size = seg_size
        self.seg_shift = seg_size.bit_length() - 1
        assert 1 << self.seg_shift == seg_size, "segment size must be a power of two"
        self.align = align
        self.live = np.zeros(nseg, np.int64)
        self.live_total = 0
        self.available = nseg if available is None else available
        # pop() takes the lowest segment first, which keeps a file tier compact
        self.free: list[int] = list(range(self.available - 1, -1, -1))
        self.open_seg: int | None = None
        self.fill = 0
        self.draining = False
        self._gen = 0
        self._readers: collections.Counter[int] = collections.Counter()
        self._pending: collections.deque[tuple[int, int]] = collections.deque()

    # ------------------------------------------------------------ growth (memory tier)

    def add_segments(self, count: int) -> range:
        new = range(self.available, min(self.nseg, self.available + count))
        self.free[:0] = reversed(new)  # after the existing free ones, lowest first
        self.available = new.stop
        return new

    # ------------------------------------------------------------ allocation

    def free_bytes(self) -> int:
        room = self.seg_size - self.fill if self.open_seg is not None else 0
        return len(self.free) * self.seg_size + room

    def allocate(self, lens: np.ndarray) -> list[Piece]:
        """Place a prefix of the pages with lengths `lens`; returns the pieces (maybe none).

        The caller sends the remaining pages to the next tier. Space is counted live at once;
        `release` undoes it if the write to the tier then fails.
        """
        pieces: list[Piece] = []
        if self.draining or len(lens) == 0:
            return pieces
        cum = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=cum[1:])
        a = 0
        n = len(lens)
        while a < n:
            if self.open_seg is None:
                if not self.free:
                    break
                self.open_seg = self.free.pop()
                self.fill = 0
            room = self.seg_size - self.fill
            # pages [a, b) fit when cum[b] - cum[a] <= room
            b = int(np.searchsorted(cum, cum[a] + room, side="right")) - 1
            if b <= a:
                self._close_open()
                continue
            nbytes = int(cum[b] - cum[a])
            base = (self.open_seg << self.seg_shift) + self.fill
            pieces.append(Piece(a, b, base, nbytes))
            self.live[self.open_seg] += nbytes
            self.live_total += nbytes
            self.fill += -(-nbytes // self.align) * self.align if nbytes else 0
            if self.fill >= self.seg_size:
                self._close_open()
            a = b
        return pieces

    def _close_open(self) -> None:
        seg = self.open_seg
        self.open_seg = None
        self.fill = 0
        if seg is not None and self.live[seg] == 0:
            self._retire(seg)

    # ------------------------------------------------------------ freeing

    def release_one(self, base: int, nbytes: int) -> None:
        """Free one stored extent (the common case: a request's run or two)."""
        if nbytes <= 0:
            return
        seg = base >> self.seg_shift
        live = int(self.live[seg]) - nbytes
        assert live >= 0, "live byte count went negative"
        self.live[seg] = live
        self.live_total -= nbytes
        if live == 0 and seg != self.open_seg:
            self._retire(seg)

    def release(self, bases: np.ndarray, nbytes: np.ndarray) -> None:
        """Free stored extents (vectorised over runs/pages): lower live counts, retire empties."""
        nb = np.asarray(nbytes, np.int64)
        keep = nb > 0  # an empty extent frees nothing (and must not retire a segment twice)
        if not keep.all():
            bases, nb = np.asarray(bases)[keep], nb[keep]
        if len(nb) == 0:
            return
        segs = np.asarray(bases, np.int64) >> self.seg_shift
        touched, inv = np.unique(segs, return_inverse=True)
        dec = np.bincount(inv, weights=nb).astype(np.int64)
        self.live[touched] -= dec
        self.live_total -= int(dec.sum())
        assert (self.live[touched] >= 0).all(), "live byte count went negative"
        for seg in touched[self.live[touched] == 0].tolist():
            if seg != self.open_seg:
                self._retire(seg)

    def _retire(self, seg: int) -> None:
        self._gen += 1
        self._pending.append((self._gen, seg))
        self._release_pending()

    def _release_pending(self) -> None:
        oldest = min(self._readers) if self._readers else self._gen + 1
        while self._pending and self._pending[0][0] <= oldest:
            _, seg = self._pending.popleft()
            if self.live[seg] == 0:  # may have been refilled? never: pending segs are not open
                self.free.append(seg)

    # ------------------------------------------------------------ read guards

    def begin_read(self) -> int:
        g = self._gen
        self._readers[g] += 1
        return g

    def end_read(self, g: int) -> None:
        self._readers[g] -= 1
        if self._readers[g] == 0:
            del self._readers[g]
            self._release_pending()

    # ------------------------------------------------------------ inspection

    def sparse_segments(self, max_live_fraction: float, limit: int) -> list[int]:
        """Closed, partly live segments with the least live data: cleaning candidates."""
        idx = np.flatnonzero(
            (self.live[: self.available] > 0)
            & (self.live[: self.available] <= max_live_fraction * self.seg_size)
        )
        if self.open_seg is not None:
            idx = idx[idx != self.open_seg]
        order = np.argsort(self.live[idx], kind="stable")[:limit]
        return idx[order].tolist()

    def statistics(self) -> SpaceStatistics:
        free = np.zeros(self.available, bool)
        if self.free:
            free[np.array(self.free)] = True
        # runs of adjacent free segments
        padded = np.concatenate([[False], free, [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(padded))
        lengths = edges[1::2] - edges[::2]
        return SpaceStatistics(
            segments=self.available,
            free_segments=len(self.free),
            live_bytes=self.live_total,
            capacity_bytes=self.nseg * self.seg_size,
            largest_free_extent=int(lengths.max()) * self.seg_size if len(lengths) else 0,
            free_extents=len(lengths),
        )
