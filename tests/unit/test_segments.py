"""SegmentSpace: packing, alignment, free-by-live-count, deferred reuse under read guards."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tierswap.tiers.segments import Piece, SegmentSpace

SEG = 16384  # four 4 KiB pages per segment keeps the arithmetic visible
SHIFT = 14


def lens(*values: int) -> np.ndarray:
    return np.array(values, np.uint16)


def seg_of(p: Piece) -> int:
    return p.base >> SHIFT


def assert_within_one_segment(pieces: list[Piece], sizes: np.ndarray) -> None:
    for p in pieces:
        assert p.nbytes == int(sizes[p.a : p.b].sum())
        if p.nbytes:
            assert (p.base >> SHIFT) == ((p.base + p.nbytes - 1) >> SHIFT), p


def release(space: SegmentSpace, pieces: list[Piece]) -> None:
    space.release(np.array([p.base for p in pieces]), np.array([p.nbytes for p in pieces]))


# ------------------------------------------------------------------------ allocation


def test_allocate_packs_back_to_back() -> None:
    s = SegmentSpace(4, SEG)
    assert s.allocate(lens(100, 200, 300)) == [Piece(0, 3, 0, 600)]
    assert s.allocate(lens(5)) == [Piece(0, 1, 600, 5)]
    assert s.live_total == 605 and s.live[0] == 605
    assert s.free_bytes() == 4 * SEG - 605


def test_allocate_never_straddles_a_segment() -> None:
    s = SegmentSpace(4, SEG)
    s.allocate(lens(SEG - 5000))  # leaves 5000 bytes in segment 0
    sizes = lens(4096, 4096, 4096, 4096, 4096, 10)
    pieces = s.allocate(sizes)
    assert pieces == [
        Piece(0, 1, SEG - 5000, 4096),  # fits in the rest of segment 0
        Piece(1, 5, SEG, 4 * 4096),  # segment 1 exactly full
        Piece(5, 6, 2 * SEG, 10),
    ]
    assert_within_one_segment(pieces, sizes)
    assert s.open_seg == 2


def test_alignment() -> None:
    s = SegmentSpace(4, SEG, align=4096)
    a = s.allocate(lens(100))
    b = s.allocate(lens(4097, 3))
    c = s.allocate(lens(1))
    assert [p.base for p in a + b + c] == [0, 4096, 3 * 4096]
    assert all(p.base % 4096 == 0 for p in a + b + c)
    assert s.live_total == 100 + 4100 + 1  # live counts stored bytes, not padding
    # the last page of segment 0 is taken: the next batch starts segment 1
    assert s.allocate(lens(4096)) == [Piece(0, 1, SEG, 4096)]


def test_prefix_placement_when_full() -> None:
    s = SegmentSpace(2, SEG)
    sizes = lens(*[4096] * 10)
    pieces = s.allocate(sizes)
    assert [(p.a, p.b) for p in pieces] == [(0, 4), (4, 8)]
    assert s.free_bytes() == 0 and s.live_total == 2 * SEG
    assert s.allocate(lens(1)) == []
    assert s.allocate(lens()) == []


def test_prefix_stops_at_first_page_that_does_not_fit() -> None:
    s = SegmentSpace(1, SEG)
    s.allocate(lens(SEG - 100))
    # 50 fits, 4096 does not, and the pages after it must not be placed out of order
    assert s.allocate(lens(50, 4096, 10)) == [Piece(0, 1, SEG - 100, 50)]


def test_zero_length_pages_take_no_room() -> None:
    s = SegmentSpace(1, SEG)
    s.allocate(lens(SEG - 10))
    assert s.allocate(lens(0, 0, 10, 0)) == [Piece(0, 4, SEG - 10, 10)]
    assert s.free_bytes() == 0


# ------------------------------------------------------------------------ freeing


def test_release_returns_empty_segments() -> None:
    s = SegmentSpace(3, SEG)
    a = s.allocate(lens(*[4096] * 4))  # fills and closes segment 0
    b = s.allocate(lens(100))  # segment 1, open
    assert s.free == [2] and s.open_seg == 1
    release(s, a)
    assert sorted(s.free) == [0, 2] and s.live[0] == 0
    # the open segment is not freed while it is open, even when it is empty ...
    release(s, b)
    assert sorted(s.free) == [0, 2] and s.open_seg == 1 and s.live_total == 0
    # ... but once it closes it is free again (and is reused at once here)
    got = s.allocate(lens(SEG - 50))  # does not fit behind the 100 bytes
    assert got == [Piece(0, 1, SEG, SEG - 50)]
    assert sorted(s.free) == [0, 2]


def test_partial_release_keeps_segment() -> None:
    s = SegmentSpace(2, SEG)
    s.allocate(lens(*[4096] * 4))
    s.release(np.array([0, 4096]), np.array([4096, 4096]))
    assert s.live[0] == 2 * 4096 and 0 not in s.free
    s.release(np.array([8192, 12288]), np.array([4096, 4096]))
    assert s.live[0] == 0 and 0 in s.free


def test_release_vectorised_over_segments() -> None:
    s = SegmentSpace(4, SEG)
    s.allocate(lens(*[4096] * 12))  # segments 0, 1, 2 full
    bases = np.array([0, SEG, 2 * SEG, 4096, 8192, 12288])
    sizes = np.array([4096, 8192, 4096, 4096, 4096, 4096])
    s.release(bases, sizes)
    assert list(s.live[:3]) == [0, SEG - 8192, SEG - 4096]
    assert s.live_total == 2 * SEG - 12288
    assert 0 in s.free and 1 not in s.free and 2 not in s.free


def test_release_more_than_live_is_caught() -> None:
    s = SegmentSpace(2, SEG)
    s.allocate(lens(100))
    with pytest.raises(AssertionError):
        s.release(np.array([0]), np.array([101]))


def test_freed_segments_are_reused() -> None:
    s = SegmentSpace(4, SEG)
    first = s.allocate(lens(*[4096] * 12))  # segments 0..2 full
    release(s, first)
    assert sorted(s.free) == [0, 1, 2, 3]
    got = s.allocate(lens(*[4096] * 17))
    assert sorted(seg_of(p) for p in got) == [0, 1, 2, 3]
    assert got[-1].b == 16 and s.free == [] and s.free_bytes() == 0


# ------------------------------------------------------------------------ read guards


def test_segment_freed_during_read_not_reused_until_end_read() -> None:
    s = SegmentSpace(2, SEG)
    a = s.allocate(lens(*[4096] * 4))  # segment 0, closed
    s.allocate(lens(*[4096] * 3))  # segment 1, open with one page of room
    g = s.begin_read()  # a reader looked up a run in segment 0 and awaits its bytes
    release(s, a)
    assert s.live[0] == 0 and 0 not in s.free
    assert s.statistics().free_segments == 0
    # nothing can be placed in segment 0 while the read is in flight
    got = s.allocate(lens(4096, 4096))
    assert [seg_of(p) for p in got] == [1] and got[0].b == 1
    assert s.allocate(lens(1)) == []
    s.end_read(g)
    assert 0 in s.free
    assert [seg_of(p) for p in s.allocate(lens(4096))] == [0]


def test_read_begun_after_the_free_does_not_hold_it() -> None:
    s = SegmentSpace(2, SEG)
    a = s.allocate(lens(*[4096] * 4))
    g_old = s.begin_read()
    release(s, a)  # retired while g_old is in flight
    g_new = s.begin_read()  # began after: it cannot target segment 0
    s.end_read(g_old)
    assert 0 in s.free
    s.end_read(g_new)
    assert s.free.count(0) == 1


def test_nested_readers_hold_until_the_last_old_one_ends() -> None:
    s = SegmentSpace(3, SEG)
    a = s.allocate(lens(*[4096] * 4))
    b = s.allocate(lens(*[4096] * 4))
    g1 = s.begin_read()
    g2 = s.begin_read()
    release(s, a)
    g3 = s.begin_read()
    release(s, b)
    s.end_read(g1)
    assert 0 not in s.free  # g2 is as old as g1
    s.end_read(g3)
    assert 0 not in s.free and 1 not in s.free
    s.end_read(g2)
    assert 0 in s.free and 1 in s.free
    assert not s._readers and not s._pending


# ------------------------------------------------------------------------ growth, draining


def test_add_segments_growth() -> None:
    s = SegmentSpace(5, SEG, available=2)
    assert s.free_bytes() == 2 * SEG
    assert len(s.allocate(lens(*[4096] * 12))) == 2  # only two segments usable
    assert s.add_segments(2) == range(2, 4)
    assert s.available == 4
    got = s.allocate(lens(*[4096] * 12))
    assert [seg_of(p) for p in got] == [2, 3]
    assert s.add_segments(10) == range(4, 5)  # never beyond nseg
    assert s.add_segments(1) == range(5, 5)
    st_ = s.statistics()
    assert st_.segments == 5 and st_.capacity_bytes == 5 * SEG


def test_add_segments_after_existing_free_ones() -> None:
    s = SegmentSpace(4, SEG, available=2)
    s.add_segments(2)
    got = s.allocate(lens(*[4096] * 16))
    assert [seg_of(p) for p in got] == [0, 1, 2, 3]


def test_draining_refuses_allocation() -> None:
    s = SegmentSpace(4, SEG)
    s.allocate(lens(10))
    s.draining = True
    assert s.allocate(lens(10, 20)) == []
    assert s.live_total == 10
    s.draining = False
    assert s.allocate(lens(20)) == [Piece(0, 1, 10, 20)]


# ------------------------------------------------------------------------ statistics


def test_statistics_extents() -> None:
    s = SegmentSpace(8, SEG)
    pieces = [s.allocate(lens(*[4096] * 4))[0] for _ in range(8)]
    st_ = s.statistics()
    assert (st_.free_segments, st_.free_extents, st_.largest_free_extent) == (0, 0, 0)
    release(s, [pieces[i] for i in (1, 2, 5, 7)])
    st_ = s.statistics()
    assert st_.free_segments == 4
    assert st_.free_extents == 3  # {1, 2}, {5}, {7}
    assert st_.largest_free_extent == 2 * SEG
    assert st_.live_bytes == s.live_total == 4 * SEG
    release(s, [pieces[6]])
    st_ = s.statistics()
    assert st_.free_extents == 2 and st_.largest_free_extent == 3 * SEG


def test_sparse_segments() -> None:
    s = SegmentSpace(4, SEG)
    p = s.allocate(lens(*[4096] * 12))  # three full segments, 4 pages each
    s.release(np.array([0, 4096, 8192]), np.array([4096] * 3))  # seg 0: 1/4 live
    s.release(np.array([SEG, SEG + 4096]), np.array([4096] * 2))  # seg 1: 1/2 live
    assert s.sparse_segments(0.5, 10) == [0, 1]
    assert s.sparse_segments(0.3, 10) == [0]
    assert s.sparse_segments(0.5, 1) == [0]
    assert len(p) == 3


# ------------------------------------------------------------------------ model


class SpaceMachine(RuleBasedStateMachine):
    """Random allocations and frees: extents never overlap, counts always add up."""

    def __init__(self) -> None:
        super().__init__()
        self.s = SegmentSpace(6, SEG, align=512, available=3)
        self.extents: list[tuple[int, int]] = []  # live (base, nbytes)
        self.guards: list[int] = []
        self.held: set[int] = set()  # segments freed while a guard was open

    @rule(sizes=st.lists(st.integers(0, 4096), min_size=1, max_size=12))
    def allocate(self, sizes: list[int]) -> None:
        arr = np.array(sizes, np.uint16)
        pieces = self.s.allocate(arr)
        assert_within_one_segment(pieces, arr)
        pos = 0
        for p in pieces:
            assert p.a == pos and p.base % 512 == 0
            assert seg_of(p) not in self.held, "reused a segment under an open read"
            pos = p.b
            if p.nbytes:
                self.extents.append((p.base, p.nbytes))

    @precondition(lambda self: self.extents)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        idx = data.draw(st.lists(st.integers(0, len(self.extents) - 1), unique=True, min_size=1))
        gone = [self.extents[i] for i in idx]
        before = set(self.s.free)
        self.s.release(np.array([b for b, _ in gone]), np.array([n for _, n in gone]))
        self.extents = [e for i, e in enumerate(self.extents) if i not in idx]
        if self.guards:
            live_now = {b >> SHIFT for b, _ in self.extents}
            for b, _ in gone:
                seg = b >> SHIFT
                if seg not in live_now and seg != self.s.open_seg and seg not in before:
                    self.held.add(seg)

    @rule()
    def begin(self) -> None:
        self.guards.append(self.s.begin_read())

    @precondition(lambda self: self.guards)
    @rule()
    def end(self) -> None:
        for g in self.guards:
            self.s.end_read(g)
        self.guards.clear()
        self.held.clear()

    @rule(n=st.integers(0, 3))
    def grow(self, n: int) -> None:
        self.s.add_segments(n)

    @invariant()
    def consistent(self) -> None:
        s = self.s
        live = np.zeros(s.nseg, np.int64)
        for b, n in self.extents:
            live[b >> SHIFT] += n
        assert np.array_equal(live, s.live)
        assert s.live_total == int(live.sum())
        assert len(s.free) == len(set(s.free)), "a segment is twice on the free list"
        for seg in s.free:
            assert seg < s.available and s.live[seg] == 0 and seg != s.open_seg
        assert not self.held & set(s.free)
        spans = sorted(self.extents)
        for (b1, n1), (b2, _) in itertools.pairwise(spans):
            assert b1 + n1 <= b2, "two live extents overlap"


SpaceMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
test_space_against_model = SpaceMachine.TestCase
