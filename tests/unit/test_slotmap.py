"""The LMDB run map against a plain dict model: page -> (tier, byte location, stored length)."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tierswap.slotmap import MAX_RUN, ZERO_TIER, Run, SlotMap, runs_for_pages

SEG_SHIFT = 20
MAP_SIZE = 32 << 20

Model = dict[int, tuple[int, int, int]]


@pytest.fixture
def smap(tmp_path: Path) -> Iterator[SlotMap]:
    m = SlotMap(tmp_path / "map", MAP_SIZE, SEG_SHIFT)
    yield m
    m.close()


def mkrun(start: int, tier: int, base: int, lens: list[int], epoch: int = 0) -> Run:
    return Run(start, tier, base, np.array(lens, np.uint16), epoch)


def pages_of(runs: list[Run]) -> Model:
    """The dict view of runs, from their own offsets."""
    out: Model = {}
    for r in runs:
        offs = r.offsets()
        assert offs[-1] == r.nbytes
        for i in range(r.npages):
            page = r.start + i
            assert page not in out, f"page {page} in two runs"
            out[page] = (r.tier, r.base + int(offs[i]), int(r.lens[i]))
    return out


def all_runs(m: SlotMap) -> list[Run]:
    return list(m.iter_runs())


def check_reverse_index(m: SlotMap) -> None:
    """Every stored run is found by the per-segment lookup the cleaner uses."""
    runs = all_runs(m)
    stored = [r for r in runs if r.tier != ZERO_TIER and r.lens.any()]  # bytes: a segment
    for r in stored:
        found = m.runs_in_segment(r.tier, r.base >> SEG_SHIFT)
        assert any(f.start == r.start and f.base == r.base for f in found)


# ------------------------------------------------------------------------ records


def test_run_offsets_and_clip() -> None:
    r = mkrun(100, 1, 5000, [10, 0, 4096, 7])
    assert list(r.offsets()) == [0, 10, 10, 4106, 4113]
    assert (r.end, r.npages, r.nbytes) == (104, 4, 4113)
    c = r.clip(101, 103)
    assert (c.start, c.base, list(c.lens)) == (101, 5010, [0, 4096])
    c = r.clip(0, 1000)  # clipping beyond both ends keeps the run
    assert (c.start, c.base, list(c.lens)) == (100, 5000, [10, 0, 4096, 7])
    assert pages_of([r.clip(100, 102), r.clip(102, 104)]) == pages_of([r])


def test_runs_for_pages_cuts_at_max_run() -> None:
    lens = np.arange(1, 2 * MAX_RUN + 11, dtype=np.uint16)
    runs = runs_for_pages(7, 2, 1 << 20, lens, 9)
    assert [r.npages for r in runs] == [MAX_RUN, MAX_RUN, 10]
    assert [r.start for r in runs] == [7, 7 + MAX_RUN, 7 + 2 * MAX_RUN]
    assert all(r.tier == 2 and r.epoch == 9 for r in runs)
    whole = Run(7, 2, 1 << 20, lens)
    assert pages_of(runs) == pages_of([whole])


def test_empty_map(smap: SlotMap) -> None:
    assert smap.lookup(0, 1 << 40) == []
    assert smap.replace(0, 100, []) == []
    assert smap.get_run(0) is None
    assert smap.runs_in_segment(0, 0) == []
    st_ = smap.statistics()
    assert st_.runs == 0 and st_.map_size == MAP_SIZE


def test_reopen_truncates(tmp_path: Path) -> None:
    m = SlotMap(tmp_path / "map", MAP_SIZE, SEG_SHIFT)
    m.replace(0, 4, [mkrun(0, 0, 0, [1, 2, 3, 4])])
    m.close()
    m = SlotMap(tmp_path / "map", MAP_SIZE, SEG_SHIFT)
    try:
        assert all_runs(m) == []
    finally:
        m.close()


# ------------------------------------------------------------------------ replace / lookup


def _replace_and_check(m: SlotMap, first: int, last: int, new: list[Run]) -> None:
    before = pages_of(all_runs(m))
    removed = m.replace(first, last, new)
    expected_removed = {p: v for p, v in before.items() if first <= p < last}
    # the removed pieces are exactly the replaced pages, with their storage locations
    assert pages_of(removed) == expected_removed
    assert all(first <= r.start and r.end <= last for r in removed)
    model = {p: v for p, v in before.items() if not first <= p < last}
    model.update(pages_of(new))
    assert pages_of(all_runs(m)) == model
    check_reverse_index(m)


@pytest.mark.parametrize(
    ("first", "last", "left", "right"),
    [
        (10, 14, None, (14, 20)),  # left edge
        (16, 20, (10, 16), None),  # right edge
        (13, 16, (10, 13), (16, 20)),  # middle
        (10, 20, None, None),  # exactly
        (5, 25, None, None),  # beyond both ends
        (0, 11, None, (11, 20)),
        (19, 30, (10, 19), None),
    ],
)
def test_replace_splits_a_run(
    smap: SlotMap, first: int, last: int, left: tuple | None, right: tuple | None
) -> None:
    lens = [100, 0, 4096, 3, 900, 4096, 0, 0, 17, 1]
    orig = mkrun(10, 1, (3 << SEG_SHIFT) + 40, lens, epoch=5)
    smap.replace(10, 20, [orig])
    _replace_and_check(smap, first, last, [])
    runs = all_runs(smap)
    spans = [(r.start, r.end) for r in runs]
    assert spans == [s for s in (left, right) if s is not None]
    for r in runs:  # the pieces keep their bytes: base moved by the skipped lengths
        assert r.base == orig.base + sum(lens[: r.start - 10])
        assert list(r.lens) == lens[r.start - 10 : r.end - 10]
        assert r.epoch == 5 and r.tier == 1


def test_replace_inserts_new_inside_cut(smap: SlotMap) -> None:
    smap.replace(0, 8, [mkrun(0, 0, 0, [50] * 8)])
    new = [mkrun(3, ZERO_TIER, 0, [0, 0]), mkrun(5, 1, 1 << SEG_SHIFT, [4096])]
    _replace_and_check(smap, 2, 6, new)
    assert [(r.start, r.end, r.tier) for r in all_runs(smap)] == [
        (0, 2, 0), (3, 5, ZERO_TIER), (5, 6, 1), (6, 8, 0)
    ]
    assert smap.lookup(2, 3) == []  # page 2 is now unmapped


def test_replace_across_several_runs(smap: SlotMap) -> None:
    for i in range(5):
        smap.replace(i * 4, i * 4 + 4, [mkrun(i * 4, i % 2, i << SEG_SHIFT, [i + 1] * 4)])
    _replace_and_check(smap, 2, 18, [mkrun(2, 0, 99 << SEG_SHIFT, [8] * 16)])
    assert [(r.start, r.end) for r in all_runs(smap)] == [(0, 2), (2, 18), (18, 20)]


def test_lookup_clips(smap: SlotMap) -> None:
    smap.replace(0, 30, [mkrun(0, 0, 0, [10] * 10), mkrun(20, 1, 4096, [20] * 10)])
    got = smap.lookup(5, 25)
    assert [(r.start, r.end, r.base) for r in got] == [(5, 10, 50), (20, 25, 4096)]
    assert smap.lookup(10, 20) == []
    assert [r.start for r in smap.lookup(9, 21)] == [9, 20]
    assert [(r.start, r.end) for r in smap.lookup(29, 1000)] == [(29, 30)]
    assert smap.lookup(30, 1000) == []
    # a run that ends before `first` and is the last record in the map
    assert smap.lookup(31, 40) == []


def test_get_run_and_touch(smap: SlotMap) -> None:
    smap.replace(0, 4, [mkrun(0, 1, 4096, [1, 2, 3, 4], epoch=1)])
    smap.touch([0, 77], 1234)  # an unknown start is ignored
    r = smap.get_run(0)
    assert r is not None and r.epoch == 1234
    assert (r.tier, r.base, list(r.lens)) == (1, 4096, [1, 2, 3, 4])
    assert smap.get_run(1) is None


# ------------------------------------------------------------------------ runs by segment


def test_runs_in_segment(smap: SlotMap) -> None:
    a = mkrun(0, 0, (2 << SEG_SHIFT) + 100, [10, 20])
    b = mkrun(10, 0, (2 << SEG_SHIFT) + 500, [30])
    c = mkrun(20, 0, 3 << SEG_SHIFT, [40])
    d = mkrun(30, 1, 2 << SEG_SHIFT, [50])  # same segment number, other tier
    z = mkrun(40, ZERO_TIER, 0, [0, 0, 0])
    smap.replace(0, 50, [a, b, c, d, z])
    assert [r.start for r in smap.runs_in_segment(0, 2)] == [0, 10]
    assert [r.start for r in smap.runs_in_segment(0, 3)] == [20]
    assert [r.start for r in smap.runs_in_segment(1, 2)] == [30]
    assert smap.runs_in_segment(0, 1) == [] and smap.runs_in_segment(0, 4) == []
    assert smap.runs_in_segment(ZERO_TIER, 0) == []
    # cutting a run keeps both pieces findable, removing it drops its entry
    smap.replace(1, 2, [])
    assert [r.start for r in smap.runs_in_segment(0, 2)] == [0, 10]
    smap.replace(10, 11, [])
    assert [r.start for r in smap.runs_in_segment(0, 2)] == [0]
    check_reverse_index(smap)


def test_relocate_compare_and_swap(smap: SlotMap) -> None:
    run = mkrun(0, 0, 5 << SEG_SHIFT, [100, 200, 300], epoch=7)
    smap.replace(0, 3, [run])
    assert smap.relocate(run, [Run(0, 1, 9 << SEG_SHIFT, run.lens, run.epoch)])
    moved = smap.get_run(0)
    assert moved is not None
    assert (moved.tier, moved.base, moved.epoch) == (1, 9 << SEG_SHIFT, 7)
    assert list(moved.lens) == [100, 200, 300]
    assert smap.runs_in_segment(0, 5) == []
    assert [r.start for r in smap.runs_in_segment(1, 9)] == [0]
    check_reverse_index(smap)
    # the caller's view is stale now: a second move of the old run must fail
    assert not smap.relocate(run, [Run(0, 2, 0, run.lens)])
    assert smap.get_run(0).tier == 1  # type: ignore[union-attr]


def test_relocate_part_of_a_run(smap: SlotMap) -> None:
    """A partial move: the head goes elsewhere, the rest keeps its bytes, in one commit."""
    run = mkrun(10, 0, 5 << SEG_SHIFT, [100, 200, 300, 400], epoch=3)
    smap.replace(10, 14, [run])
    head = Run(10, 1, 7 << SEG_SHIFT, run.lens[:2], run.epoch)
    assert smap.relocate(run, [head, run.clip(12, 14)])
    assert pages_of(all_runs(smap)) == {
        10: (1, 7 << SEG_SHIFT, 100),
        11: (1, (7 << SEG_SHIFT) + 100, 200),
        12: (0, (5 << SEG_SHIFT) + 300, 300),
        13: (0, (5 << SEG_SHIFT) + 600, 400),
    }
    assert [r.start for r in smap.runs_in_segment(0, 5)] == [12]
    assert [r.start for r in smap.runs_in_segment(1, 7)] == [10]
    check_reverse_index(smap)


@pytest.mark.parametrize("change", ["overwrite", "cut_tail", "cut_head", "discard", "same_place"])
def test_relocate_refused_after_change(smap: SlotMap, change: str) -> None:
    run = mkrun(0, 0, 4096, [100, 200, 300])
    smap.replace(0, 3, [run])
    if change == "overwrite":  # same pages and lengths, new place
        smap.replace(0, 3, [mkrun(0, 0, 8192, [100, 200, 300])])
    elif change == "cut_tail":
        smap.replace(2, 3, [])
    elif change == "cut_head":
        smap.replace(0, 1, [])
    elif change == "discard":
        smap.replace(0, 3, [])
    else:  # rewritten with other lengths at the same base
        smap.replace(0, 3, [mkrun(0, 0, 4096, [100, 200, 301])])
    before = all_runs(smap)
    assert not smap.relocate(run, [Run(0, 1, 1 << 30, run.lens)])
    after = all_runs(smap)
    assert pages_of(after) == pages_of(before)
    assert all(r.tier == 0 for r in after)


def test_statistics(smap: SlotMap) -> None:
    empty = smap.statistics()
    runs = [mkrun(i * 2, i % 2, i * 4096, [100, 4096]) for i in range(300)]
    smap.replace(0, 600, runs)
    st_ = smap.statistics()
    assert st_.runs == 300
    assert st_.map_bytes > empty.map_bytes
    assert st_.map_bytes % 4096 == 0 and st_.map_bytes < MAP_SIZE
    smap.replace(0, 600, [])
    assert smap.statistics().runs == 0


# ------------------------------------------------------------------------ stateful model


class SlotMapMachine(RuleBasedStateMachine):
    NPAGES = 120

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="slotmap-"))
        self.m = SlotMap(self.dir / "map", MAP_SIZE, SEG_SHIFT)
        self.model: Model = {}
        self.next_base = 0

    def teardown(self) -> None:
        self.m.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize()
    def start(self) -> None:
        assert all_runs(self.m) == []

    def _new_runs(self, first: int, last: int, data: st.DataObject) -> list[Run]:
        cuts = sorted(set(data.draw(st.lists(st.integers(first, last), max_size=4))))
        bounds = [first, *[c for c in cuts if first < c < last], last]
        out = []
        for a, b in itertools.pairwise(bounds):
            if a == b:
                continue
            if data.draw(st.booleans(), label="leave hole"):
                continue
            tier = data.draw(st.sampled_from([0, 1, 2, ZERO_TIER]))
            if tier == ZERO_TIER:
                out.append(mkrun(a, ZERO_TIER, 0, [0] * (b - a)))
                continue
            lens = data.draw(
                st.lists(st.sampled_from([0, 1, 37, 1000, 4095, 4096]), min_size=b - a,
                         max_size=b - a)
            )
            # bases spread over segments so the reverse index has something to find
            self.next_base += data.draw(st.integers(1, 3 << SEG_SHIFT))
            out.append(mkrun(a, tier, self.next_base, lens, epoch=len(out)))
        return out

    @rule(data=st.data(), first=st.integers(0, NPAGES), size=st.integers(0, 40))
    def replace(self, data: st.DataObject, first: int, size: int) -> None:
        last = first + size
        new = self._new_runs(first, last, data)
        removed = self.m.replace(first, last, new)
        assert pages_of(removed) == {p: v for p, v in self.model.items() if first <= p < last}
        for p in range(first, last):
            self.model.pop(p, None)
        self.model.update(pages_of(new))

    @rule(first=st.integers(0, NPAGES + 5), size=st.integers(0, 50))
    def lookup(self, first: int, size: int) -> None:
        last = first + size
        got = self.m.lookup(first, last)
        assert all(first <= r.start and r.end <= last for r in got)
        assert [r.start for r in got] == sorted(r.start for r in got)
        assert pages_of(got) == {p: v for p, v in self.model.items() if first <= p < last}

    @rule(data=st.data(), tier=st.integers(0, 2))
    def relocate(self, data: st.DataObject, tier: int) -> None:
        runs = [r for r in all_runs(self.m) if r.tier != ZERO_TIER]
        if not runs:
            return
        run = data.draw(st.sampled_from(runs))
        n = data.draw(st.integers(1, run.npages), label="pages moved")
        stale = data.draw(st.sampled_from(["no", "base", "lens", "start"]))
        old = run
        if stale == "base":  # a run the map no longer holds in this exact form
            old = Run(run.start, run.tier, run.base + 1, run.lens, run.epoch)
        elif stale == "lens":
            old = run.clip(run.start, run.end - 1) if run.npages > 1 else run._replace(
                lens=np.array([int(run.lens[0]) ^ 1], np.uint16))
        elif stale == "start":
            old = run.clip(run.start + 1, run.end) if run.npages > 1 else run._replace(
                start=run.start + 1000)
        self.next_base += 1 << SEG_SHIFT
        new = [Run(run.start, tier, self.next_base, run.lens[:n].copy(), run.epoch)]
        if n < run.npages:
            new.append(run.clip(run.start + n, run.end))
        ok = self.m.relocate(old, new)
        assert ok == (stale == "no")
        if ok:
            self.model.update(pages_of(new))

    @invariant()
    def matches_model(self) -> None:
        assert pages_of(all_runs(self.m)) == self.model
        assert self.m.statistics().runs == len(all_runs(self.m))

    @invariant()
    def reverse_index_consistent(self) -> None:
        check_reverse_index(self.m)


SlotMapMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None
)
test_slotmap_against_model = SlotMapMachine.TestCase


def test_adjacent_contiguous_runs_merge_into_one_record(smap: SlotMap) -> None:
    # the kernel writes slots 0..3 and 4..7 in two requests, packed back to back (left join)
    smap.replace(0, 4, [mkrun(0, 0, 1000, [10, 20, 30, 40], epoch=1)])
    smap.replace(4, 8, [mkrun(4, 0, 1100, [5, 5, 5, 5], epoch=2)])
    assert smap.statistics().runs == 1
    (run,) = smap.lookup(0, 8)
    assert (run.start, run.base, list(run.lens), run.epoch) == (
        0, 1000, [10, 20, 30, 40, 5, 5, 5, 5], 2)
    assert [r.start for r in smap.runs_in_segment(0, 0)] == [0]
    # not contiguous in bytes, another tier, or across a segment: kept apart
    smap.replace(8, 9, [mkrun(8, 0, 5000, [7])])
    smap.replace(9, 10, [mkrun(9, 1, 5007, [7])])
    seg = 1 << SEG_SHIFT
    smap.replace(20, 21, [mkrun(20, 0, seg - 10, [10])])
    smap.replace(21, 22, [mkrun(21, 0, seg, [10])])
    assert smap.statistics().runs == 5
