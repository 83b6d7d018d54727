"""The virtual slot map: page index -> where the page lives, as one LMDB record per *run*.

A run is a range of consecutive virtual pages written by one request into one place: a tier
and a contiguous byte range there. Page i of a run starts at ``base + sum(lens[:i])`` and is
``lens[i]`` bytes long; ``lens[i] == 0`` is a zero page (no storage), ``lens[i] == PAGE_SIZE`` a
page stored raw because it did not compress. Keeping one record per run instead of one per
page is what brings the map under ~3 bytes per stored page for swap's large writes.

Record layout (little-endian):  key   = first page index, u64 big-endian (so LMDB orders it)
                                 value = tier u8 | flags u8 | npages u16 | epoch u32 | base u64
                                         | lens u16[npages]
Runs never overlap. There is no reverse index: finding the runs stored in given segments (to
clean them) is one scan of the map, done rarely and off the I/O path; an index entry per run
would cost more than the run record's own overhead (measured: ~35 of ~120 bytes per run).

Concurrency: every method is synchronous and runs on the trio thread; callers rely on "no
await between lookup and the use of its result" for the memory tier (see
docs/design.md, "Concurrency rules"). LMDB is opened without its lock file: one process owns it.
The map holds nothing of value across restarts (the kernel's swap state dies with the daemon),
so it is opened with sync off and truncated at start.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import lmdb
import numpy as np

ZERO_TIER = 255  # a run of zero pages only: no storage anywhere
MAX_RUN = 512  # pages per record, so a record stays well inside one LMDB page
# Runs of this many pages are not grown further by joining: rewriting a record costs its size,
# and past this the per-page share of a record's overhead is already below half a byte.
JOIN_BELOW = 64
_HDR = struct.Struct("<BBHIQ")
_KEY = struct.Struct(">Q")


def total(lens: np.ndarray) -> int:
    """Sum of stored lengths; plain Python below ~32 items, where numpy's call costs more."""
    return sum(lens.tolist()) if len(lens) < 32 else int(lens.sum(dtype=np.int64))


class Run(NamedTuple):
    start: int  # first virtual page
    tier: int  # index into the device's tier list, or ZERO_TIER
    base: int  # byte location of page `start` in the tier
    lens: np.ndarray  # uint16 stored length per page
    epoch: int = 0  # coarse time of the last write or promotion-worthy read

    @property
    def npages(self) -> int:
        return len(self.lens)

    @property
    def end(self) -> int:
        return self.start + len(self.lens)

    @property
    def nbytes(self) -> int:
        return total(self.lens)

    def offsets(self) -> np.ndarray:
        """Byte offset of each page relative to `base` (int64, length npages + 1)."""
        out = np.zeros(len(self.lens) + 1, np.int64)
        np.cumsum(self.lens, out=out[1:])
        return out

    def clip(self, first: int, last: int) -> Run:
        """The part of this run inside [first, last), with its base moved accordingly."""
        a, b = max(first, self.start) - self.start, min(last, self.end) - self.start
        if a == 0 and b == len(self.lens):
            return self
        skip = total(self.lens[:a])
        return Run(self.start + a, self.tier, self.base + skip, self.lens[a:b], self.epoch)


def encode(run: Run, flags: int = 0) -> bytes:
    return _HDR.pack(run.tier, flags, len(run.lens), run.epoch, run.base) + run.lens.astype(
        "<u2", copy=False
    ).tobytes()


def decode(key: bytes, value: bytes) -> Run:
    tier, _flags, n, epoch, base = _HDR.unpack_from(value)
    lens = np.frombuffer(value, "<u2", n, _HDR.size)
    return Run(_KEY.unpack(key)[0], tier, base, lens, epoch)


@dataclass(frozen=True)
class MapStatistics:
    runs: int
    map_bytes: int  # bytes LMDB uses for the map (pages in use x page size)
    map_size: int  # fixed LMDB map size


class SlotMap:
    """Ordered run map over LMDB: one record per run of pages."""

    def __init__(self, path: Path, map_size: int, seg_shift: int) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in ("data.mdb", "lock.mdb"):
            (path / name).unlink(missing_ok=True)
        # Fixed map size: LMDB never grows the mapping, so the map cannot take memory beyond
        # what was budgeted; a full map fails writes with ENOSPC instead.
        self.env = lmdb.open(
            str(path), map_size=map_size, max_dbs=1, sync=False, metasync=False, lock=False,
            writemap=True, meminit=False, readahead=False, subdir=True, mode=0o600,
        )
        self.runs = self.env.open_db(b"runs")
        self.seg_shift = seg_shift
        self.map_size = map_size

    def close(self) -> None:
        self.env.close()

    # ------------------------------------------------------------------ lookups

    @staticmethod
    def _overlapping(cur: lmdb.Cursor, first: int, last: int) -> list[Run]:
        """Whole runs that overlap pages [first, last), in page order."""
        k_first = _KEY.pack(first)
        begin: bytes | None = None
        if cur.set_range(k_first):
            begin = cur.key()
            if begin != k_first and cur.prev():
                before = decode(cur.key(), cur.value())
                if before.end > first:
                    begin = cur.key()
        elif cur.last():
            before = decode(cur.key(), cur.value())
            begin = cur.key() if before.end > first else None
        out: list[Run] = []
        if begin is None or not cur.set_key(begin):
            return out
        for key, value in cur:
            if _KEY.unpack(key)[0] >= last:
                break
            out.append(decode(key, value))
        return out

    def lookup(self, first: int, last: int) -> list[Run]:
        """Runs overlapping pages [first, last), clipped to it, in page order."""
        with self.env.begin(db=self.runs) as txn:
            return [r.clip(first, last) for r in self._overlapping(txn.cursor(), first, last)]

    def get_run(self, start: int) -> Run | None:
        with self.env.begin(db=self.runs) as txn:
            v = txn.get(_KEY.pack(start))
            return None if v is None else decode(_KEY.pack(start), v)

    def runs_by_segment(self, tier: int, segs: set[int]) -> dict[int, list[Run]]:
        """The runs of `tier` stored in each of `segs` (runs never span segments): one scan."""
        out: dict[int, list[Run]] = {s: [] for s in segs}
        for run in self.iter_runs(tier):
            seg = run.base >> self.seg_shift
            if seg in out and run.lens.any():
                out[seg].append(run)
        return out

    def runs_in_segment(self, tier: int, seg: int) -> list[Run]:
        return self.runs_by_segment(tier, {seg})[seg]

    def iter_runs(self, tier: int | None = None):
        """All runs (of one tier), in page order; for inspection and policy scans."""
        with self.env.begin(db=self.runs) as txn:
            for key, value in txn.cursor():
                run = decode(key, value)
                if tier is None or run.tier == tier:
                    yield run

    # ------------------------------------------------------------------ updates

    def _put(self, txn: lmdb.Transaction, run: Run) -> None:
        txn.put(_KEY.pack(run.start), encode(run), db=self.runs)

    def _delete(self, txn: lmdb.Transaction, run: Run) -> None:
        txn.delete(_KEY.pack(run.start), db=self.runs)

    def replace(self, first: int, last: int, new: list[Run]) -> list[Run]:
        """Drop pages [first, last) from the map, then insert `new` (which must lie inside).

        Returns the dropped pieces so the caller can release their storage. Runs that straddle
        the range are cut; the right-hand remainder gets a new key and base.
        """
        removed: list[Run] = []
        with self.env.begin(write=True) as txn:
            overlapping = self._overlapping(txn.cursor(db=self.runs), first, last)
            for run in overlapping:
                self._delete(txn, run)
                removed.append(run.clip(first, last))
                if run.start < first:
                    self._put(txn, run.clip(run.start, first))
                if run.end > last:
                    self._put(txn, run.clip(last, run.end))
            for run in new:
                self._put(txn, run)
            if new:  # swap writes ascending slots: joining on the left catches nearly all
                self._merge_at(txn, new[0].start)
        return removed

    def _merge_at(self, txn: lmdb.Transaction, boundary: int) -> None:
        """Join the runs that meet at page `boundary` when they are one contiguous extent.

        The kernel swaps out neighbouring slots in separate small requests; packed back to back
        in one segment they form one run, and one record costs far less than several."""
        cur = txn.cursor(db=self.runs)
        if not cur.set_key(_KEY.pack(boundary)):
            return
        r_key, r_val = cur.item()
        if not cur.prev():
            return
        l_key, l_val = cur.item()
        # header fields only: most neighbours fail these checks
        l_tier, _, l_n, _, _ = _HDR.unpack_from(l_val)
        r_tier, _, r_n, _, _ = _HDR.unpack_from(r_val)
        if (l_tier != r_tier or l_n >= JOIN_BELOW or l_n + r_n > MAX_RUN
                or _KEY.unpack(l_key)[0] + l_n != boundary):
            return
        left, right = decode(l_key, l_val), decode(r_key, r_val)
        if left.tier != ZERO_TIER:
            end = left.base + left.nbytes
            if end != right.base:
                return
            last = end + right.nbytes - 1
            if right.nbytes and (left.base >> self.seg_shift) != (last >> self.seg_shift):
                return  # a run never spans segments
        merged = Run(left.start, left.tier, left.base, np.concatenate([left.lens, right.lens]),
                     max(left.epoch, right.epoch))
        self._delete(txn, left)
        self._delete(txn, right)
        self._put(txn, merged)

    def relocate(self, old: Run, new: list[Run]) -> bool:
        """Replace record `old` by `new` (same pages), only if the map still holds exactly `old`.

        This compare-and-swap is what makes migration safe against a concurrent overwrite or
        discard: the mover copies, then commits only if nobody changed the run meanwhile.
        """
        key = _KEY.pack(old.start)
        with self.env.begin(write=True) as txn:
            cur = txn.get(key, db=self.runs)
            if cur is None:
                return False
            now = decode(key, cur)
            same = now.tier == old.tier and now.base == old.base
            if not same or not np.array_equal(now.lens, old.lens):
                return False
            self._delete(txn, now)
            for run in new:
                self._put(txn, run)
        return True

    def touch(self, starts: list[int], epoch: int) -> None:
        """Record a read of these runs (coarse epoch in the record header)."""
        with self.env.begin(write=True, db=self.runs) as txn:
            for s in starts:
                k = _KEY.pack(s)
                v = txn.get(k)
                if v is not None:
                    b = bytearray(v)
                    struct.pack_into("<I", b, 4, epoch)
                    txn.put(k, bytes(b))

    def statistics(self) -> MapStatistics:
        """Bytes of LMDB pages the map occupies now (not the file's high-water mark)."""
        with self.env.begin() as txn:
            st = txn.stat(self.runs)
            used = (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * st["psize"]
            runs = st["entries"]
        return MapStatistics(runs, used, self.map_size)


def runs_for_pages(start: int, tier: int, base: int, lens: np.ndarray, epoch: int) -> list[Run]:
    """Cut a contiguous placement into records of at most MAX_RUN pages."""
    out = []
    offs = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offs[1:])
    for a in range(0, len(lens), MAX_RUN):
        b = min(a + MAX_RUN, len(lens))
        out.append(Run(start + a, tier, base + int(offs[a]), lens[a:b], epoch))
    return out

