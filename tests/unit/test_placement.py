"""Fragment placement: rotation with exactly K+M targets, power of two choices beyond."""

from __future__ import annotations

import numpy as np

from tierswap.tiers.placement import Placement


def place_all(p: Placement, nseg: int, up: list[bool]) -> None:
    for seg in range(nseg):
        targets = p.choose(seg, up)
        assert targets is not None
        assert len(set(targets)) == p.n  # every fragment on a different target
        p.assign(seg, targets)


def test_exactly_k_plus_m_targets_rotate() -> None:
    p = Placement(12, 4, 2, 6)
    for t in range(6):
        p.set_capacity(t, 12)
    place_all(p, 12, [True] * 6)
    assert p.target[:3].tolist() == [[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0],
                                     [2, 3, 4, 5, 0, 1]]
    data = np.bincount(p.target[:, :4].ravel(), minlength=6)
    assert data.tolist() == [8] * 6  # data fragments (what reads touch) spread evenly
    assert p.choose(0, [True] * 6) is None  # every slot taken


def test_power_of_two_choices_balances_by_free_space() -> None:
    p = Placement(600, 4, 2, 12, seed=3)
    for t in range(12):
        p.set_capacity(t, 400)
    place_all(p, 600, [True] * 12)
    used = p.used()
    assert used.sum() == 600 * 6
    assert used.max() - used.min() <= 3, used  # random choice alone spreads ~ +-25
    # bigger exports get proportionally more fragments
    q = Placement(150, 2, 1, 4, seed=5)
    for t, cap in enumerate((100, 100, 400, 400)):
        q.set_capacity(t, cap)
    place_all(q, 150, [True] * 4)
    free = [q.free_slots(t) for t in range(4)]
    assert max(free[2:]) - min(free[2:]) <= 2 and min(free[2:]) > max(free[:2])


def test_up_targets_first_and_refusals() -> None:
    p = Placement(10, 2, 1, 5, seed=1)
    for t in range(5):
        p.set_capacity(t, 10)
    up = [True, False, True, True, False]
    targets = p.choose(0, up)
    assert targets is not None and sorted(targets) == [0, 2, 3]  # the three that are up
    up2 = [True, False, False, True, False]  # two up, K = 2: placed, one fragment on a down
    targets = p.choose(0, up2)
    assert targets is not None and {0, 3} <= set(targets)
    assert p.choose(0, [True, False, False, False, False]) is None  # fewer than K up
    small = Placement(2, 2, 1, 3)
    for t in range(3):
        small.set_capacity(t, 1)
    place_all(small, 1, [True] * 3)
    assert small.choose(1, [True] * 3) is None  # no free slot left


def test_spare_move_and_release() -> None:
    p = Placement(4, 2, 1, 5, seed=2)
    for t in range(5):
        p.set_capacity(t, 4)
    place_all(p, 2, [True] * 5)
    row = set(p.target[0].tolist())
    spare = p.spare(0, [True] * 5)
    assert spare is not None and spare not in row
    slot = p.take(spare)
    old_t, old_slot = p.move(0, 1, spare, slot)
    p.give_back(old_t, old_slot)
    assert spare in p.target[0].tolist() and len(set(p.target[0].tolist())) == 3
    freed = p.release(0)
    assert len(freed) == 3 and not p.placed()[0] and p.placed()[1]
    assert p.spare(1, [t not in set(p.target[1].tolist()) and False for t in range(5)]) is None
