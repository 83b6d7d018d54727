"""What of an erasure-coded store survives its process, and what a crash costs.

Kept. The remote tier lays the store's state over its kit memfd `state.T` (tierswap/kitstate.py):
lives, fills, the missing and suspect bitmaps, placement (target and slot of every fragment,
each target's slot count) and `pstale`, the segments whose parity is staged and not all on the
targets; FragmentSecrets (key, counters, tags) over `secrets.T`. The store updates them in place
and in an order that makes every prefix recoverable: `pstale` is set before a flush writes data
and cleared only once no parity column is left to write; a segment's life is set last when it
is placed and cleared first when it is freed (`adopt` undoes a half-done one); free slot lists
are derived, not kept. Not kept: connections (a replacement reconnects and treats every
fragment on a target it has not verified yet as suspect, as after any return) and the stages.

What a crash costs. The stages die with the process. A segment staged at the crash has its
data fragments on the targets (a write is acknowledged only once its data is there) but not
all its parity: at adoption its parity fragments are marked missing and the repair loop
rebuilds them from the data fragments. Until then that segment has K of its K+M fragments and
survives no target loss; nothing is lost. Safe, because parity is only redundancy and a
fragment marked missing is never read: parity that is stale or half written is never decoded
with newer data (the RAID write hole becomes missing redundancy for a while, not wrong data).
One case costs pages: a write into a data fragment whose target is away is acknowledged from
the stage; its parity is flushed with it (not when the segment idles), so it is lost only if
the process dies during a flush of that segment: its parity then counts as missing and the
pages of the absent fragment read EIO, never wrong data.

Rewritten blocks: the journal. Pieces are packed back to back (align 1), so the 4 KiB block
where one piece ends and the next begins is sealed twice: with the first piece (acknowledged),
again when the next is flushed. Its counter and tag change when it is resealed, before the
write to the target returns; a process dying in between leaves the target with the old
ciphertext or the new, and the secrets naming only the new (committing the tags after the
write instead only moves the window). So before a flush writes data blocks, the counters and
tags they had are recorded (an entry per block, its segment written last so that an entry is
valid only once complete), and the entries are cleared when the write has returned. A process
that adopts the kit finds the entries of writes in flight: *orphans*. A block with an orphan
opens under its current tag or, failing that, under the orphan's (counter 0, a block never
sealed before, opens as zeros: it held nothing acknowledged); the version that authenticates
becomes current. Each holds every byte acknowledged before the crash (one flush at a time per
segment), so either answer is right. Orphans are settled by the first read of their block; a
segment with a flush in flight had staged parity too, whose rebuild reads every data block, so
they do not linger. An orphan is also dropped once a later write of its block has landed, so a
target cannot replay an old version after newer data was acknowledged.

Bounds: the journal has twice the entries the flushes of one process can have in flight (all
data blocks of STAGES segments), 40 bytes each; the rest is for orphans. If it runs out
(orphans unresolved across repeated crashes while their targets stay away), the oldest orphan
is dropped: its block authenticates under the current tag or its fragment counts as missing
and is rebuilt from the others.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from tierswap.crypto import TAG, AuthenticationError
from tierswap.kitstate import Field
from tierswap.tiers.ecseal import FragmentSealer

if TYPE_CHECKING:
    from tierswap.tiers.erasure import ErasureStore

log = logging.getLogger(__name__)

Key = tuple[int, int, int]  # segment, fragment, block


def store_fields(n: int, inflight: int, nseg: int, ntargets: int) -> list[Field]:
    """The arrays of an erasure store with `n` fragments per segment and at most `inflight`
    data blocks being written at once."""
    entries = 2 * inflight
    return [Field("ec.life", np.uint32, (nseg,)), Field("ec.fill", np.int64, (nseg,)),
            Field("ec.missing", np.bool_, (nseg, n)), Field("ec.suspect", np.bool_, (nseg, n)),
            Field("ec.pstale", np.bool_, (nseg,)), Field("ec.target", np.int16, (nseg, n), -1),
            Field("ec.slot", np.int32, (nseg, n), -1),
            Field("ec.capacity", np.int64, (ntargets,)),
            Field("ej.seg", np.int32, (entries,), -1), Field("ej.frag", np.int16, (entries,)),
            Field("ej.block", np.int32, (entries,)), Field("ej.ctr", np.uint64, (entries,)),
            Field("ej.tag", np.uint8, (entries, TAG))]


def adopt(store: ErasureStore) -> None:
    """Take over the state a process that died left (see the module docstring): undo
    placement half made or half undone, derive the free slots, mark the parity of segments
    that had it staged missing (the repair loop rebuilds it), turn journal entries into
    orphans."""
    g, pl = store.g, store.placement
    for seg in np.flatnonzero(pl.placed() & (store.life == 0)).tolist():
        pl.release(seg)
        store.fill[seg] = 0
        store.sealer.forget(seg)
    pl.adopt()
    stale = np.flatnonzero(store.pstale & (store.life > 0))
    store.missing[stale, g.k :] |= pl.target[stale, g.k :] >= 0
    store.pstale[:] = False  # after `missing`: a crash in between only redoes this
    store.adopted_parity = len(stale) * g.m
    orphans = store.journal.adopt(store.life > 0)
    log.info("tier %s: adopted %d segment(s); %d had staged parity (rebuilt from their data); "
             "%d rewritten block(s) to settle", store.name, int(np.count_nonzero(store.life)),
             len(stale), orphans)


class RewriteJournal:
    """Prior counters and tags of data blocks being rewritten; see the module docstring.
    Synchronous, trio thread only."""

    def __init__(self, state: dict[str, np.ndarray], name: str = "remote") -> None:
        self.seg = state["ej.seg"]
        self.frag = state["ej.frag"]
        self.block = state["ej.block"]
        self.ctr = state["ej.ctr"]
        self.tag = state["ej.tag"]
        self.name = name
        self._free = np.flatnonzero(self.seg < 0)[::-1].tolist()
        self.orphans: dict[Key, list[int]] = {}
        self.dropped = 0  # orphans given up for room (see the module docstring)

    def adopt(self, live: np.ndarray) -> int:
        """Entries left by a process that died: orphans of live segments (else cleared)."""
        for j in np.flatnonzero(self.seg >= 0).tolist():
            seg = int(self.seg[j])
            if not live[seg]:
                self.seg[j] = -1
                self._free.append(j)
                continue
            self.orphans.setdefault((seg, int(self.frag[j]), int(self.block[j])), []).append(j)
        return sum(len(v) for v in self.orphans.values())

    # ------------------------------------------------------------------ in-flight writes

    def record(self, seg: int, frag: int, first: int, ctrs: np.ndarray,
               tags: np.ndarray) -> list[int]:
        """Blocks [first, first + len(ctrs)) of a data fragment, about to be resealed and
        written, had these counters and tags. Returns the entries (for `landed`)."""
        n = len(ctrs)
        while len(self._free) < n:
            self._drop_oldest()
        idx = self._free[-n:]
        del self._free[-n:]
        j = np.array(idx, np.int64)
        self.frag[j] = frag
        self.block[j] = np.arange(first, first + n)
        self.ctr[j] = ctrs
        self.tag[j] = tags
        self.seg[j] = seg  # last: an entry is valid only once all of it is written
        return idx

    def landed(self, idx: list[int], seg: int, frag: int, first: int) -> None:
        """The write of those blocks returned (or failed and the fragment is marked missing):
        the target holds the current version, or it does not matter any more."""
        if idx:
            self.seg[np.array(idx, np.int64)] = -1
            self._free.extend(idx)
        if self.orphans:
            for blk in range(first, first + len(idx)):
                self._forget((seg, frag, blk))

    def abandon(self, idx: list[int]) -> None:
        """The write was cancelled: whether it landed is unknown, so its entries become
        orphans (resolved by the next read, as after a crash)."""
        for j in idx:
            key = (int(self.seg[j]), int(self.frag[j]), int(self.block[j]))
            self.orphans.setdefault(key, []).append(j)

    # ------------------------------------------------------------------ reading

    def alternates(self, seg: int, frag: int, a: int, b: int) -> dict[int, list[tuple[int, bytes]]]:
        """Orphan versions of blocks [a, b) of a fragment: block -> [(counter, tag)]."""
        if not self.orphans:
            return {}
        out: dict[int, list[tuple[int, bytes]]] = {}
        for blk in range(a, b):
            for j in self.orphans.get((seg, frag, blk), ()):
                out.setdefault(blk, []).append((int(self.ctr[j]), self.tag[j].tobytes()))
        return out

    def open(self, sealer: FragmentSealer, seg: int, frag: int, target: int, a: int,
             raw: bytearray, snap: tuple[np.ndarray, np.ndarray],
             alts: dict[int, list[tuple[int, bytes]]]) -> bytearray:
        """`sealer.open` of blocks [a, ...) read back, trying the `alternates` of a block that
        fails under its current tag; the version that authenticates becomes current and the
        orphans of the range are settled. Raises AuthenticationError as `open` does."""
        ctrs, tags = snap[0].copy(), snap[1].copy()
        while True:
            try:
                plain = sealer.open(seg, frag, target, a, raw, (ctrs, tags))
                break
            except AuthenticationError as e:
                cands = alts.get(e.offset)
                if not cands:
                    raise
                c, tag = cands.pop()
                ctrs[e.offset - a] = c
                tags[e.offset - a] = np.frombuffer(tag, np.uint8)
        s = sealer.secrets
        for blk in alts:
            i = blk - a
            if ctrs[i] != snap[0][i] and s.ctr[seg, frag, blk] == snap[0][i]:
                # the target holds the orphan's version (and nothing resealed it meanwhile)
                sealer.commit(seg, frag, blk, ctrs[i : i + 1], tags[i : i + 1])
            self._forget((seg, frag, blk))
        return plain

    def drop(self, seg: int, frag: int | None = None) -> None:
        """The segment (or a fragment of it) was freed, reopened or rebuilt."""
        if not self.orphans:
            return
        for key in [k for k in self.orphans if k[0] == seg and (frag is None or k[1] == frag)]:
            self._forget(key)

    def _forget(self, key: Key) -> None:
        for j in self.orphans.pop(key, ()):
            self.seg[j] = -1
            self._free.append(j)

    def _drop_oldest(self) -> None:
        if not self.orphans:
            raise RuntimeError("rewrite journal full without orphans: more in flight than sized")
        key = next(iter(self.orphans))
        self._forget(key)
        self.dropped += 1
        if self.dropped == 1:
            log.warning("tier %s: rewrite journal full; unresolved blocks from an earlier "
                        "process are given up (they count as missing if they fail)", self.name)
