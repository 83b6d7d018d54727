"""Where the fragments of erasure-coded segments live: one target each, in fixed-size slots.

Each target offers this shard a number of fragment slots (its export's share, or the minimum
the configuration needs until the export has been seen). A segment's K+M fragments go to K+M
different targets, one slot each. The choice:

* With exactly K+M targets every segment uses all of them; fragment i of segment s goes to
  target (s + i) mod n, so data fragments (what reads touch) rotate evenly.
* With more targets, each fragment in turn goes to the better of two targets drawn at random
  (power of two choices, as Infiniswap places slabs): the one with more free slots. That keeps
  the fill of all targets within a slot or two of each other without a global scan, and gives
  bigger exports proportionally more fragments. Targets that are up are drawn first; down ones
  only when too few are up (their fragments then start missing and are rebuilt later).

All state is in fixed arrays and per-target free lists allocated once: bounded, no growth.
The arrays may live in a kit memfd (a replacement process adopts them and derives the free
lists). Synchronous; the erasure store calls it on the trio thread.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np


class Placement:
    """`target`, `slot` and `capacity` are the state (arrays the caller may lay over a kit
    memfd: tierswap/kitstate.py); the free lists are derived from them (`adopt`)."""

    def __init__(self, nseg: int, k: int, m: int, ntargets: int, *,
                 seed: int | None = None, target: np.ndarray | None = None,
                 slot: np.ndarray | None = None, capacity: np.ndarray | None = None) -> None:
        self.k, self.m, self.n = k, m, k + m
        self.ntargets = ntargets
        self.target = target if target is not None else np.full((nseg, self.n), -1, np.int16)
        self.slot = slot if slot is not None else np.full((nseg, self.n), -1, np.int32)
        self.capacity = capacity if capacity is not None else np.zeros(ntargets, np.int64)
        self._free: list[list[int]] = [[] for _ in range(ntargets)]
        self._rng = random.Random(seed)

    def adopt(self) -> None:
        """Free lists from the arrays, as a process that died left them: every slot within a
        target's capacity that no segment's fragment occupies is free (slots that were being
        trimmed or taken for a move that had not committed come back untrimmed: the next
        fragment written there is sealed afresh, so what they still hold is never read)."""
        for t in range(self.ntargets):
            cap = int(self.capacity[t])
            used = np.zeros(cap, bool)
            on = self.slot[self.target == t]
            used[on[(on >= 0) & (on < cap)]] = True
            self._free[t] = np.flatnonzero(~used)[::-1].tolist()  # lowest slot taken first

    # ------------------------------------------------------------------ capacity

    def set_capacity(self, t: int, slots: int) -> None:
        """Slots target `t` offers; may only grow (a slot in use never disappears)."""
        old = int(self.capacity[t])
        if slots > old:
            self._free[t][:0] = range(slots - 1, old - 1, -1)  # lowest slot taken first
            self.capacity[t] = slots

    def free_slots(self, t: int) -> int:
        return len(self._free[t])

    def used(self) -> np.ndarray:
        return self.capacity - np.array([len(f) for f in self._free], np.int64)

    # ------------------------------------------------------------------ choosing

    def _better_of_two(self, pool: list[int]) -> int:
        if len(pool) == 1:
            return pool[0]
        a, b = self._rng.sample(pool, 2)
        fa, fb = len(self._free[a]), len(self._free[b])
        return a if fa > fb or (fa == fb and self._rng.random() < 0.5) else b

    def choose(self, seg: int, up: Sequence[bool]) -> list[int] | None:
        """Targets for fragments 0..n-1 of `seg`, or None if fewer than n targets have a free
        slot or fewer than k of those are up (the segment could not be read back)."""
        have = [t for t in range(self.ntargets) if self._free[t]]
        ups = [t for t in have if up[t]]
        if len(have) < self.n or len(ups) < self.k:
            return None
        if self.ntargets == self.n:
            return [(seg + i) % self.n for i in range(self.n)]
        downs = [t for t in have if not up[t]]
        picked: list[int] = []
        for _ in range(self.n):
            pool = ups if ups else downs
            t = self._better_of_two(pool)
            pool.remove(t)
            picked.append(t)
        return picked

    def assign(self, seg: int, targets: Sequence[int]) -> None:
        assert (self.target[seg] < 0).all(), "segment already placed"
        for i, t in enumerate(targets):
            self.target[seg, i] = t
            self.slot[seg, i] = self._free[t].pop()

    def spare(self, seg: int, up: Sequence[bool]) -> int | None:
        """An up target with a free slot holding no fragment of `seg` (better of two)."""
        row = set(self.target[seg].tolist())
        pool = [t for t in range(self.ntargets) if up[t] and self._free[t] and t not in row]
        return self._better_of_two(pool) if pool else None

    def take(self, t: int) -> int:
        return self._free[t].pop()

    def give_back(self, t: int, slot: int) -> None:
        self._free[t].append(slot)

    def move(self, seg: int, frag: int, t: int, slot: int) -> tuple[int, int]:
        """Fragment `frag` of `seg` now lives in `slot` of `t`; returns the old place."""
        old = int(self.target[seg, frag]), int(self.slot[seg, frag])
        self.target[seg, frag] = t
        self.slot[seg, frag] = slot
        return old

    def release(self, seg: int) -> list[tuple[int, int]]:
        """Forget the segment's placement; returns its (target, slot) pairs, not yet free:
        the caller gives them back (after trimming them, for instance)."""
        out = [(int(t), int(s)) for t, s in zip(self.target[seg], self.slot[seg], strict=True)
               if t >= 0]
        self.target[seg] = -1
        self.slot[seg] = -1
        return out

    def placed(self) -> np.ndarray:
        """Segments that have a placement."""
        return np.asarray((self.target >= 0).any(axis=1))
