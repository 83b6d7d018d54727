"""Erasure-coded byte store over several targets: K data + M parity fragments per segment.

The store knows nothing of NBD or of the segment allocator. Its whole interface:

* ``await write(base, data, life)``: store bytes at tier offset ``base``; ``life`` is the
  allocation counter of the segment holding ``base`` (bumped each time the segment is opened
  from free), so a new life means "the segment was reused: place it anew".
* ``await read(base, length)``; ``freed(seg)``: the segment holds nothing any more.
* ``can_open()``: may a new segment be placed now (the allocator's gate).
* ``target_lost(t)`` / ``target_returned(t)`` / ``set_slots(t, n)`` from the transport, which
  does the byte I/O per target (`Transport`), and ``run()``: the background work.

Layout. A segment (1 MiB of tier address space) is cut into K contiguous data fragments of
F = ceil(1 MiB / K) bytes (block-rounded): fragment i holds segment bytes [iF, (i+1)F). Parity
fragment p (zfec, systematic Reed-Solomon) holds at byte j the code of the K data bytes at j.
Contiguous rather than striped, so a run of compressed pages (almost always well under F)
lives in one fragment and a read touches one target; the code is byte-wise, so any column
range can be encoded or decoded on its own (a degraded 4 KiB read reads 4 KiB from K others).
Each fragment sits in a slot of F bytes on its target (tierswap.tiers.placement).

Writes go through a *stage*: the plaintext of a segment being filled, in one of STAGES
preallocated buffers. A write copies into the stage, then waits for a flush that covers it;
one flush at a time per segment (group commit: writes that arrive during a flush share the
next one), so a block rewritten (pieces are packed back to back, two pieces can share a 4
KiB block) always lands in order. A flush seals the dirty data blocks and writes each
fragment's run of them to its target. Parity of the columns every data fragment has filled
(full stripes) is final, and goes out in the same flush; the partial rest is written when
the segment goes idle (PARITY_IDLE) or closes (another segment was opened). So parity is
written once per column in the usual case: write amplification stays at (K+M)/K instead of
rewriting parity per piece. Until parity is out the stage is the redundancy: a target lost
while a segment is staged costs nothing, its fragments are rewritten from RAM. A write is
acknowledged when its data is on its data fragment's target, or that fragment is marked
missing while at least K fragments of the segment are intact; with more than M of the
segment's targets unusable it fails with EIO.

Reads of a staged segment are served from the stage. Otherwise each data fragment touched is
read directly (no decoding); if its target is down, the fragment missing or failing
authentication, the same column range is read from K other fragments and decoded. Fewer
than K readable: EIO, never wrong data.

Repair, in the background and rate-limited (``rate``, bytes/s): fragments of a returning
target are *suspect* (the server may have restarted empty) and verified by reading back their
first and last sealed block; missing fragments on up targets are rebuilt in place (decoded
from K others, sealed for the target, written); fragments on a target down longer than
``move_after`` move to a spare target (one not holding the segment, better of two by free
slots), when there are more targets than K+M. A rebuild commits its tags and placement only
if the segment did not change meanwhile.

State and crashes. Everything but the stages is in arrays a kit memfd holds, written before
the I/O that depends on it, so a replacement shard adopts the store as the dead one left it;
what a crash costs (the parity of staged segments, for a while) and why that is safe:
tiers/ecstate.py.

Bounds: STAGES x (segment) bytes of staging, REPAIR_PARALLEL rebuilds of one fragment's
worth each (reads of K fragments), a trim queue no longer than the slot count. All per-
segment state is in arrays sized at start.
"""

from __future__ import annotations

import errno
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import trio
import zfec

from tierswap.crypto import BLOCK, AuthenticationError
from tierswap.kitstate import Field, Layout
from tierswap.tiers.base import TierError
from tierswap.tiers.ecseal import FragmentSealer, FragmentSecrets
from tierswap.tiers.ecstate import RewriteJournal, adopt, store_fields
from tierswap.tiers.placement import Placement
from tierswap.tiers.ratelimit import ByteRate

log = logging.getLogger(__name__)

STAGES = 4  # segments staged at once (one being filled, others draining or idle)
PARITY_IDLE = 0.5  # seconds without writes after which a stage's parity is written
STAGE_WAIT = 10.0  # seconds a write waits for a staging buffer before failing
REPAIR_PARALLEL = 2
REPAIR_BATCH = 64
TICK = 0.1
THREAD_CODING = 256 << 10  # bytes of input from which zfec runs in a worker thread (~0.5 ms)


class Transport(Protocol):
    """Byte I/O on one target; offsets are relative to this store's region there. A False
    return means the request failed (the transport has already logged and counted it)."""

    def is_up(self, t: int) -> bool: ...

    async def frag_read(self, t: int, offset: int, buf: memoryview) -> bool: ...

    async def frag_write(self, t: int, offset: int, data: memoryview) -> bool: ...

    async def frag_trim(self, t: int, offset: int, length: int) -> bool: ...


@dataclass(frozen=True)
class Geometry:
    k: int
    m: int
    seg_size: int

    @property
    def n(self) -> int:
        return self.k + self.m

    @property
    def fblocks(self) -> int:
        return -(-self.seg_size // BLOCK // self.k)

    @property
    def frag_size(self) -> int:
        return self.fblocks * BLOCK

    def min_slots(self, nseg: int, ntargets: int) -> int:
        """Slots each of `ntargets` equal targets must offer to hold `nseg` full segments."""
        return min(nseg, -(-nseg * self.n // ntargets))


class _Stage:
    """The plaintext of one segment being written, and what of it the targets lack."""

    def __init__(self, g: Geometry) -> None:
        self.buf = bytearray(g.k * g.frag_size)
        self.zero = np.frombuffer(self.buf, np.uint8)
        self.dirty = np.zeros((g.k, g.fblocks), bool)  # data blocks not yet written
        self.pdirty = np.zeros(g.fblocks, bool)  # parity columns stale on the targets
        self.redo = np.zeros(g.n, bool)  # fragments to write whole (rebuild from RAM)
        self.reset(-1)

    def reset(self, seg: int) -> None:
        self.seg = seg
        self.zero[:] = 0
        self.dirty[:] = False
        self.pdirty[:] = False
        self.redo[:] = False
        self.gen = self.done = 0
        self.want_parity = False
        self.flushing = False
        self.flushed = trio.Event()
        self.ready = trio.Event()
        self.writers = 0
        self.last = 0.0
        self.closing = False
        self.dead = False

    @property
    def clean(self) -> bool:
        return not (self.dirty.any() or self.pdirty.any() or self.redo.any())

    @property
    def idle(self) -> bool:
        return not (self.writers or self.flushing)


def _extents(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of True in a 1-d bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


class ErasureStore:
    def __init__(self, geometry: Geometry, nseg: int, ntargets: int, transport: Transport,
                 *, context: bytes, rate: int, slots: int, name: str = "remote",
                 secrets: FragmentSecrets | None = None, seed: int | None = None,
                 state: dict[str, np.ndarray] | None = None, adopted: bool = False) -> None:
        """`state`: the arrays of `fields()` (in a kit memfd, so that they outlive the
        process); `adopted`: they hold what a process that died left (tiers/ecstate.py)."""
        g = self.g = geometry
        self.nseg = nseg
        self.ntargets = ntargets
        self.io = transport
        self.name = name
        if state is None:
            state = Layout("ec", self.fields(g, nseg, ntargets)).allocate()
        self.placement = Placement(nseg, g.k, g.m, ntargets, seed=seed,
                                   target=state["ec.target"], slot=state["ec.slot"],
                                   capacity=state["ec.capacity"])
        if not adopted:
            for t in range(ntargets):
                self.placement.set_capacity(t, slots)
        self.sealer = FragmentSealer(
            secrets or FragmentSecrets(nseg, g.n, g.fblocks), context)
        self.encoder = zfec.Encoder(g.k, g.n)
        self.decoder = zfec.Decoder(g.k, g.n)
        self.life = state["ec.life"]  # life of the current placement; 0: none
        self.fill = state["ec.fill"]  # bytes of the segment written so far (end)
        self.missing = state["ec.missing"]  # the target lacks this fragment
        self.suspect = state["ec.suspect"]  # may have lost it while away: verify
        self.pstale = state["ec.pstale"]  # staged parity not all on the targets yet
        self.journal = RewriteJournal(state, name)
        self.down_since = np.full(ntargets, -math.inf)
        self.stages: dict[int, _Stage] = {}
        self._pool = [_Stage(g) for _ in range(STAGES)]
        self._pool_changed = trio.Event()
        self._waiting = 0  # writers waiting for a staging buffer
        self._kick = trio.Event()  # wakes the stage loop
        self._repair_wake = trio.Event()  # wakes the repair loop
        self._trims: deque[tuple[int, int]] = deque()
        self._trimming = np.zeros(ntargets, np.int64)  # slots queued or being trimmed
        self._trim_wake = trio.Event()
        self._trimmed = trio.Event()
        self.rate = ByteRate(rate)
        self.move_after = 10.0
        # counters
        self.auth_failures = 0
        self.degraded_reads = 0  # reads served by decoding
        self.degraded_writes = 0  # writes acknowledged with a fragment of theirs missing
        self.rebuilt_fragments = 0
        self.moved_fragments = 0
        self.repair_bytes = 0
        self.adopted_parity = 0  # parity fragments marked missing at adoption
        if adopted:
            adopt(self)

    @staticmethod
    def fields(g: Geometry, nseg: int, ntargets: int) -> list[Field]:
        """The store's state, as arrays a kit memfd can hold (tiers/ecstate.py)."""
        return store_fields(g.n, g.k * g.fblocks * STAGES, nseg, ntargets)

    # ------------------------------------------------------------------ helpers

    def _up(self) -> list[bool]:
        return [self.io.is_up(t) for t in range(self.ntargets)]

    def _ext(self, seg: int, frag: int) -> int:
        """Blocks of fragment `frag` that hold anything (data: its share of the fill;
        parity: as far as the first data fragment reaches)."""
        f = self.g.frag_size
        start = frag * f if frag < self.g.k else 0
        return min(self.g.fblocks, max(0, -(-(int(self.fill[seg]) - start) // BLOCK)))

    def _usable(self, seg: int, frag: int) -> bool:
        t = int(self.placement.target[seg, frag])
        return t >= 0 and not self.missing[seg, frag] and self.io.is_up(t)

    def _intact(self, seg: int) -> int:
        return sum(self._usable(seg, j) for j in range(self.g.n))

    def _where(self, seg: int, frag: int) -> tuple[int, int]:
        return (int(self.placement.target[seg, frag]),
                int(self.placement.slot[seg, frag]) * self.g.frag_size)

    def set_slots(self, t: int, slots: int) -> None:
        self.placement.set_capacity(t, min(self.nseg, slots))

    def can_open(self) -> bool:
        """Could a segment be placed now (slots being trimmed count as free: a write waits
        for them)? The allocator asks this before opening a segment here."""
        up = self._up()
        have = [t for t in range(self.ntargets)
                if self.placement.free_slots(t) or self._trimming[t]]
        return len(have) >= self.g.n and sum(up[t] for t in have) >= self.g.k

    # ------------------------------------------------------------------ segment lives

    def _open(self, seg: int, life: int) -> None:
        if self.life[seg]:
            self.freed(seg)
            if self.life[seg]:
                raise TierError(errno.EIO, f"tier {self.name}: segment {seg} reused while "
                                           f"a flush of its previous life runs")
        up = self._up()
        targets = self.placement.choose(seg, up)
        if targets is None:
            raise TierError(errno.EIO, f"tier {self.name}: fewer than {self.g.k} targets up "
                                       f"(or no room) for segment {seg}")
        self.sealer.forget(seg)
        self.journal.drop(seg)
        self.fill[seg] = 0
        self.missing[seg] = [not up[t] for t in targets]
        self.suspect[seg] = False
        self.pstale[seg] = False
        self.placement.assign(seg, targets)
        self.life[seg] = life  # last: a process dying before this leaves it unplaced

    def freed(self, seg: int) -> None:
        """The segment holds nothing any more: give its slots back (trimmed first)."""
        if not self.life[seg]:
            return
        st = self.stages.get(seg)
        if st is not None:
            if not st.idle:  # a flush is writing into its slots: the last one out frees
                st.dead = True
                return
            self._unstage(st)
        self.life[seg] = 0  # first: a process dying after this has it undone (ecstate.adopt)
        self.fill[seg] = 0
        self.sealer.forget(seg)
        self.journal.drop(seg)
        self.missing[seg] = self.suspect[seg] = self.pstale[seg] = False
        for t, slot in self.placement.release(seg):
            if self.io.is_up(t):
                self._trims.append((t, slot))
                self._trimming[t] += 1
                self._trim_wake.set()
            else:
                self.placement.give_back(t, slot)

    def _unstage(self, st: _Stage) -> None:
        del self.stages[st.seg]
        st.seg = -1
        self._pool.append(st)
        self._pool_changed.set()
        self._pool_changed = trio.Event()

    # ------------------------------------------------------------------ writing

    async def write(self, base: int, data: bytes | memoryview, life: int) -> None:
        seg, off = divmod(base, self.g.seg_size)
        n = len(data)
        if self.life[seg] != life:
            await self._reopen(seg, life)
        st = await self._stage(seg)  # counts us as a writer: the stage stays
        try:
            st.buf[off : off + n] = data
            self.fill[seg] = max(int(self.fill[seg]), off + n)
            self._mark(st, off, off + n)
            if self.missing[seg, : self.g.k].any():
                # a data fragment is not on its target: until parity is, the stage is its
                # only copy, and a stage dies with the process (tiers/ecstate.py)
                st.want_parity = True
            st.gen += 1
            await self._flush(st, st.gen)
        finally:
            st.writers -= 1
            st.last = trio.current_time()
            self._after_io(st)
        if self.life[seg] != life:
            raise TierError(errno.EIO, f"tier {self.name}: segment {seg} freed under a write")
        if self._intact(seg) < self.g.k:
            raise TierError(errno.EIO, f"tier {self.name}: more than {self.g.m} targets of "
                                       f"segment {seg} unavailable")
        frags = {(x // self.g.frag_size) for x in (off, off + n - 1)}
        if any(not self._usable(seg, i) for i in frags):
            self.degraded_writes += 1

    async def _reopen(self, seg: int, life: int) -> None:
        """A new life of `seg`: wait out a background flush of the old one, then place it."""
        with trio.move_on_after(STAGE_WAIT):
            while (old := self.stages.get(seg)) is not None and not old.idle:
                old.dead = True
                await trio.sleep(0.005)
        if self.life[seg] != life:
            self.freed(seg)
            with trio.move_on_after(STAGE_WAIT):  # slots of freed segments come back trimmed
                while (self.placement.choose(seg, self._up()) is None
                       and self._trimming.any()):
                    await self._trimmed.wait()
            # Another write of this life may have opened it while we waited: opening it again
            # would free (unplace) the segment under that write's flush.
            if self.life[seg] != life:
                self._open(seg, life)

    def _mark(self, st: _Stage, a: int, b: int) -> None:
        self.pstale[st.seg] = True  # before any of it is written (tiers/ecstate.py)
        f = self.g.frag_size
        for i in range(a // f, (b - 1) // f + 1):
            lo, hi = max(a, i * f) - i * f, min(b, (i + 1) * f) - i * f
            st.dirty[i, lo // BLOCK : -(-hi // BLOCK)] = True
            st.pdirty[lo // BLOCK : -(-hi // BLOCK)] = True

    def _after_io(self, st: _Stage) -> None:
        if st.dead and st.idle and self.stages.get(st.seg) is st:
            st.dead = False
            seg = st.seg
            self._unstage(st)
            self.freed(seg)
        else:
            self._kick.set()

    async def _stage(self, seg: int) -> _Stage:
        """The stage of `seg`, created (and loaded, if the segment was written before) when
        there is none; the caller is counted in `writers` and must decrement it."""
        st = self.stages.get(seg)
        if st is None:
            for other in self.stages.values():
                other.closing = True  # a new segment is being filled: finish the others
            self._kick.set()
            self._waiting += 1  # while anyone waits, every idle stage is released
            try:
                with trio.move_on_after(STAGE_WAIT):
                    while not self._pool and seg not in self.stages:
                        await self._pool_changed.wait()
            finally:
                self._waiting -= 1
            st = self.stages.get(seg)
        if st is None:
            if not self._pool:
                raise TierError(errno.EIO, f"tier {self.name}: no staging buffer free "
                                           f"(segments stuck with targets down)")
            st = self._pool.pop()
            st.reset(seg)
            st.last = trio.current_time()
            self.stages[seg] = st
            st.writers += 1
            if self.fill[seg]:  # written before, then unstaged: bring its bytes back
                try:
                    await self._load(st)
                except BaseException:
                    st.writers -= 1
                    self._unstage(st)
                    st.ready.set()
                    raise
            st.ready.set()
            return st
        st.writers += 1
        if not st.ready.is_set():
            await st.ready.wait()
            if self.stages.get(seg) is not st:
                st.writers -= 1
                raise TierError(errno.EIO, f"tier {self.name}: segment {seg} could not be "
                                           f"staged")
        return st

    async def _load(self, st: _Stage) -> None:
        seg, f = st.seg, self.g.frag_size
        for i in range(self.g.k):
            ext = self._ext(seg, i)
            if ext:
                st.buf[i * f : i * f + ext * BLOCK] = await self._read_frag(seg, i, 0, ext)

    async def _flush(self, st: _Stage, gen: int) -> None:
        """Return once a flush that started after generation `gen` was marked has ended."""
        while st.done < gen:
            if st.flushing:
                await st.flushed.wait()
                continue
            st.flushing = True
            done = st.flushed
            upto = st.gen
            dirty, st.dirty = st.dirty, np.zeros_like(st.dirty)
            redo, st.redo = st.redo, np.zeros_like(st.redo)
            pdirty = None
            if st.want_parity or redo[self.g.k :].any():
                st.want_parity = False
                pdirty, st.pdirty = st.pdirty, np.zeros_like(st.pdirty)
            elif (final := self._final_columns(st.seg)) and st.pdirty[:final].any():
                pdirty = np.zeros_like(st.pdirty)  # full stripes: their parity is final now
                pdirty[:final] = st.pdirty[:final]
                st.pdirty[:final] = False
            try:
                await self._write_stage(st, dirty, pdirty, redo)
                st.done = max(st.done, upto)
                if not st.pdirty.any() and self.stages.get(st.seg) is st:
                    self.pstale[st.seg] = False  # every parity column written (or missing)
            except BaseException:
                st.dirty |= dirty
                st.redo |= redo
                if pdirty is not None:
                    st.pdirty |= pdirty
                raise
            finally:
                st.flushing = False
                st.flushed = trio.Event()
                done.set()

    def _final_columns(self, seg: int) -> int:
        """Leading parity blocks whose columns every data fragment has filled: appends
        never touch them again, so their parity can be written once, with the data."""
        g = self.g
        fill = int(self.fill[seg])
        if fill >= g.seg_size:
            return g.fblocks
        return min(g.fblocks, max(0, (fill - (g.k - 1) * g.frag_size) // BLOCK))

    async def _write_stage(self, st: _Stage, dirty: np.ndarray, pdirty: np.ndarray | None,
                           redo: np.ndarray) -> None:
        g, seg, f = self.g, st.seg, self.g.frag_size
        jobs: list[tuple[int, int, memoryview]] = []  # fragment, first block, plaintext
        buf = memoryview(st.buf)
        for i in range(g.k):
            blocks = dirty[i]
            if redo[i]:
                blocks = np.zeros(g.fblocks, bool)
                blocks[: self._ext(seg, i)] = True
            elif self.missing[seg, i] or not blocks.any():
                continue  # missing: kept in the stage, rebuilt whole when its target can
            for a, b in _extents(blocks):
                jobs.append((i, a, buf[i * f + a * BLOCK : i * f + b * BLOCK]))
        pext = self._ext(seg, g.k)
        if pdirty is not None:
            cols = pdirty.copy()
            cols[pext:] = False
            want = [j for j in range(g.k, g.n) if redo[j] or not self.missing[seg, j]]
            if redo[g.k :].any():
                cols[:pext] = True
            for a, b in _extents(cols) if cols.any() else ():
                lo, hi = a * BLOCK, b * BLOCK
                parity = await self._code([bytes(buf[i * f + lo : i * f + hi])
                                           for i in range(g.k)], tuple(want))
                for j, p in zip(want, parity, strict=True):
                    if redo[j] or not self.missing[seg, j]:
                        jobs.append((j, a, memoryview(p)))
        failed: set[int] = set()

        async def one(frag: int, first: int, plain: memoryview) -> None:
            t, at = self._where(seg, frag)
            if not self.io.is_up(t):
                failed.add(frag)
                return
            entries: list[int] = []
            if frag < g.k:  # data: the versions the target may hold until this returns
                nb = len(plain) // BLOCK
                s = self.sealer.secrets
                entries = self.journal.record(seg, frag, first,
                                              s.ctr[seg, frag, first : first + nb],
                                              s.tags[seg, frag, first : first + nb])
            try:
                sealed, _c, _t = self.sealer.seal(seg, frag, t, first, plain)
                if not await self.io.frag_write(t, at + first * BLOCK, memoryview(sealed)):
                    failed.add(frag)
                    self.missing[seg, frag] = True  # before the journal lets go of it
            except BaseException:
                self.journal.abandon(entries)
                raise
            self.journal.landed(entries, seg, frag, first)

        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(one, *job)
        for frag in failed:
            self.missing[seg, frag] = True
        if failed:
            self._repair_wake.set()
        for frag in np.flatnonzero(redo).tolist():
            if frag not in failed and (frag < g.k or pdirty is not None):
                if self.missing[seg, frag]:
                    self.rebuilt_fragments += 1
                self.missing[seg, frag] = self.suspect[seg, frag] = False

    async def flush(self, *, unstage: bool = False) -> None:
        """Write everything staged, parity included; with `unstage`, also release the stages
        whose segments are intact (later reads then go to the targets)."""
        for st in list(self.stages.values()):
            if not st.ready.is_set():
                continue
            st.want_parity = True
            st.gen += 1
            try:
                await self._flush(st, st.gen)
            finally:
                self._after_io(st)
            if (unstage and st.idle and st.clean and self.stages.get(st.seg) is st
                    and self._intact(st.seg) >= self.g.k):
                self._unstage(st)

    async def _code(self, blocks: list[bytes], want: tuple[int, ...]) -> list[bytes]:
        if not want:
            return []
        if len(blocks[0]) * len(blocks) >= THREAD_CODING:
            return await trio.to_thread.run_sync(self.encoder.encode, blocks, want)
        return self.encoder.encode(blocks, want)

    # ------------------------------------------------------------------ reading

    async def read(self, base: int, length: int) -> bytes:
        seg, off = divmod(base, self.g.seg_size)
        if not self.life[seg]:
            raise TierError(errno.EIO, f"tier {self.name}: segment {seg} holds nothing")
        st = self.stages.get(seg)
        if st is not None and st.ready.is_set():
            return bytes(st.buf[off : off + length])
        f = self.g.frag_size
        out = []
        for i in range(off // f, (off + length - 1) // f + 1):
            lo, hi = max(off, i * f) - i * f, min(off + length, (i + 1) * f) - i * f
            a, b = lo // BLOCK, -(-hi // BLOCK)
            plain = await self._read_frag(seg, i, a, b)
            out.append(bytes(plain[lo - a * BLOCK : hi - a * BLOCK]))
        return out[0] if len(out) == 1 else b"".join(out)

    async def _read_one(self, seg: int, frag: int, a: int, b: int) -> bytearray | None:
        """Blocks [a, b) of one fragment from its target, authenticated; None if that fails.
        A block a process that died was rewriting opens under either version
        (tiers/ecstate.py); the one that authenticates is kept."""
        t, at = self._where(seg, frag)
        snap = self.sealer.snapshot(seg, frag, a, b - a)
        alts = self.journal.alternates(seg, frag, a, b)
        raw = bytearray((b - a) * BLOCK)
        if ((snap[0].any() or alts)
                and not await self.io.frag_read(t, at + a * BLOCK, memoryview(raw))):
            return None
        try:
            if not alts:
                return self.sealer.open(seg, frag, t, a, raw, snap)
            return self.journal.open(self.sealer, seg, frag, t, a, raw, snap, alts)
        except AuthenticationError as e:
            if not self.suspect[seg, frag]:
                self.auth_failures += 1
                log.error("tier %s: block %d of fragment %d of segment %d on target %d "
                          "failed authentication", self.name, e.offset, frag, seg, t)
            self.missing[seg, frag] = True
            self._repair_wake.set()
            return None

    async def _read_frag(self, seg: int, frag: int, a: int, b: int) -> bytearray:
        if self._usable(seg, frag):
            plain = await self._read_one(seg, frag, a, b)
            if plain is not None:
                return plain
        return await self._decode(seg, frag, a, b)

    async def _decode(self, seg: int, want: int, a: int, b: int) -> bytearray:
        """Blocks [a, b) of fragment `want`, computed from K other fragments."""
        g = self.g
        life = self.life[seg]
        cands = [j for j in range(g.n) if j != want and self._usable(seg, j)]
        cands.sort(key=lambda j: bool(self.suspect[seg, j]))  # verified ones first
        got: dict[int, bytearray] = {}
        while len(got) < g.k and cands:
            batch, cands = cands[: g.k - len(got)], cands[g.k - len(got) :]

            async def one(j: int) -> None:
                plain = await self._read_one(seg, j, a, b)
                if plain is not None:
                    got[j] = plain

            async with trio.open_nursery() as nursery:
                for j in batch:
                    nursery.start_soon(one, j)
        if len(got) < g.k or self.life[seg] != life:
            raise TierError(errno.EIO, f"tier {self.name}: fewer than {g.k} fragments of "
                                       f"segment {seg} readable")
        nums = sorted(got)
        data = self.decoder.decode([bytes(got[j]) for j in nums], nums)
        self.degraded_reads += 1
        if want < g.k:
            return bytearray(data[want])
        return bytearray(self.encoder.encode(data, (want,))[0])

    # ------------------------------------------------------------------ target health

    def target_lost(self, t: int) -> None:
        self.down_since[t] = trio.current_time()
        self._repair_wake.set()

    def target_returned(self, t: int) -> None:
        """A target is back: anything it held may be gone (a restarted memory server)."""
        on = self.placement.target == t
        for seg, st in self.stages.items():  # staged: rewrite its fragments from RAM
            st.redo |= on[seg]
            self.missing[seg] |= on[seg]
        self.suspect |= on & ~self.missing
        self._kick.set()
        self._repair_wake.set()

    # ------------------------------------------------------------------ background

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stage_loop)
            nursery.start_soon(self._repair_loop)
            nursery.start_soon(self._trim_loop)
            task_status.started()

    async def _stage_loop(self) -> None:
        """Parity for idle or closing stages; closing stages that are done go back."""
        while True:
            with trio.move_on_after(TICK):
                await self._kick.wait()
            self._kick = trio.Event()
            now = trio.current_time()
            for st in list(self.stages.values()):
                if self.stages.get(st.seg) is not st:
                    continue  # unstaged (even reused for another segment) during an earlier flush
                if not st.ready.is_set() or not st.idle:
                    continue
                st.closing |= self._waiting > 0
                if st.redo.any() or ((st.closing or now - st.last >= PARITY_IDLE)
                                     and not st.clean):
                    st.want_parity = True
                    st.gen += 1
                    try:
                        await self._flush(st, st.gen)
                    finally:
                        self._after_io(st)
                if (st.closing and st.idle and st.clean and self.stages.get(st.seg) is st
                        and self._intact(st.seg) >= self.g.k):
                    self._unstage(st)

    async def _trim_loop(self) -> None:
        while True:
            while not self._trims:
                await self._trim_wake.wait()
                self._trim_wake = trio.Event()
            t, slot = self._trims.popleft()
            try:
                await self.io.frag_trim(t, slot * self.g.frag_size, self.g.frag_size)
            finally:
                self.placement.give_back(t, slot)
                self._trimming[t] -= 1
                self._trimmed.set()
                self._trimmed = trio.Event()

    def _jobs(self) -> list[tuple[str, int, int]]:
        g = self.g
        tgt = self.placement.target.astype(np.int64)
        placed = tgt >= 0
        upv = np.array([*self._up(), False])
        up = upv[tgt] & placed
        staged = np.zeros(self.nseg, bool)
        staged[list(self.stages)] = True
        jobs: list[tuple[str, int, int]] = []
        for what, mask in (("verify", up & self.suspect & ~self.missing),
                           ("rebuild", up & self.missing)):
            mask = mask & ~staged[:, None]
            segs, frags = np.nonzero(mask)
            jobs += [(what, int(s), int(j)) for s, j in zip(segs[:REPAIR_BATCH],
                                                            frags[:REPAIR_BATCH], strict=True)]
        if self.ntargets > g.n:
            since = np.append(self.down_since, math.inf)[tgt]
            late = placed & ~up & (trio.current_time() - since >= self.move_after)
            segs, frags = np.nonzero(late & ~staged[:, None])
            jobs += [("move", int(s), int(j)) for s, j in zip(segs[:REPAIR_BATCH],
                                                             frags[:REPAIR_BATCH], strict=True)]
        for seg, st in self.stages.items():  # staged: rewrite from RAM, no decoding
            st.redo |= up[seg] & self.missing[seg]
        return jobs[:REPAIR_BATCH]

    async def _repair_loop(self) -> None:
        while True:
            if not await self._repair_round():
                with trio.move_on_after(1.0):
                    await self._repair_wake.wait()
                self._repair_wake = trio.Event()

    async def _repair_round(self) -> bool:
        """One batch of repair jobs, REPAIR_PARALLEL at a time; True if any made progress."""
        progress = False
        limiter = trio.CapacityLimiter(REPAIR_PARALLEL)

        async def run(what: str, seg: int, frag: int) -> None:
            nonlocal progress
            async with limiter:
                if what == "verify":
                    progress |= await self._verify(seg, frag)
                else:
                    progress |= await self._rebuild(seg, frag, move=what == "move")

        async with trio.open_nursery() as nursery:
            for job in self._jobs():
                nursery.start_soon(run, *job)
        return progress

    async def _verify(self, seg: int, frag: int) -> bool:
        life = self.life[seg]
        last = self.sealer.last_sealed(seg, frag)
        good = True
        for blk in sorted({0, last} if last is not None else set()):
            if await self._read_one(seg, frag, blk, blk + 1) is None:
                if not self.io.is_up(self._where(seg, frag)[0]):
                    return False  # the target went away again: verify when it is back
                good = False
                break
        if self.life[seg] == life and self.suspect[seg, frag]:
            self.suspect[seg, frag] = False
            self.missing[seg, frag] |= not good
        return True

    async def _rebuild(self, seg: int, frag: int, *, move: bool) -> bool:
        """Decode fragment `frag` from K others and write it in place or to a spare."""
        life = self.life[seg]
        t, slot = int(self.placement.target[seg, frag]), int(self.placement.slot[seg, frag])
        if move:
            spare = self.placement.spare(seg, self._up())
            if spare is None:
                return False
            t, slot = spare, self.placement.take(spare)
        committed = False
        try:
            ext = self._ext(seg, frag)
            try:
                plain = await self._decode(seg, frag, 0, ext) if ext else bytearray()
            except TierError:
                return False
            await self.rate.take(len(plain))
            if self.life[seg] != life or seg in self.stages or not self.io.is_up(t):
                return False
            sealed, ctrs, tags = self.sealer.seal(seg, frag, t, 0, plain, commit=False)
            if ext and not await self.io.frag_write(t, slot * self.g.frag_size,
                                                     memoryview(sealed)):
                return False
            if self.life[seg] != life or seg in self.stages:
                return False
            if move:
                old_t, old_slot = self.placement.move(seg, frag, t, slot)
                self.placement.give_back(old_t, old_slot)
                self.moved_fragments += 1
            self.sealer.forget(seg, frag)
            self.sealer.commit(seg, frag, 0, ctrs, tags)
            self.journal.drop(seg, frag)
            self.missing[seg, frag] = self.suspect[seg, frag] = False
            self.rebuilt_fragments += 1
            self.repair_bytes += len(sealed)
            committed = True
            return True
        finally:
            if move and not committed:
                self.placement.give_back(t, slot)

    # ------------------------------------------------------------------ statistics

    def target_statistics(self) -> list[dict[str, int]]:
        """Per target: fragments placed on it, bytes it holds for us, rebuild backlog."""
        tgt = self.placement.target
        held = self.sealer.sealed_counts() * BLOCK
        out = []
        for t in range(self.ntargets):
            on = tgt == t
            behind = on & (self.missing | self.suspect)
            out.append({
                "fragments": int(np.count_nonzero(on)),
                "bytes": int(held[on & ~self.missing].sum()),
                "rebuild_backlog": int(np.count_nonzero(on if not self.io.is_up(t)
                                                        else behind)),
                "slots": int(self.placement.capacity[t]),
                "free_slots": self.placement.free_slots(t),
            })
        return out

    def statistics(self) -> dict[str, object]:
        tgt = self.placement.target.astype(np.int64)
        placed = tgt >= 0
        upv = np.array([*self._up(), False])
        ok = placed & upv[tgt] & ~self.missing
        live = placed.any(axis=1)
        intact = ok.sum(axis=1)
        return {
            "erasure": f"{self.g.k}+{self.g.m}",
            "auth_failures": self.auth_failures,
            "degraded_reads": self.degraded_reads,
            "degraded_writes": self.degraded_writes,
            "degraded_segments": int(np.count_nonzero(
                live & ((intact < self.g.n) | self.suspect.any(axis=1)))),
            "unreadable_segments": int(np.count_nonzero(live & (intact < self.g.k))),
            "rebuilt_fragments": self.rebuilt_fragments,
            "moved_fragments": self.moved_fragments,
            "staged_segments": len(self.stages),
        }


def fragments_of(seg_size: int, k: int) -> Sequence[tuple[int, int]]:
    """Segment byte ranges of the K data fragments (for docs and tests)."""
    f = Geometry(k, 1, seg_size).frag_size
    return [(i * f, min(seg_size, (i + 1) * f)) for i in range(k)]
