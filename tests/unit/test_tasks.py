"""tierswap.tasks.keep_running: a fault restarts the task; only a failed first start fails."""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import trio

from tierswap.tasks import TaskBoard, keep_running, started_at_once


async def test_restarts_after_faults_with_backoff_and_counts_them(nursery):
    board, runs = TaskBoard(), []

    async def flaky() -> None:
        runs.append(trio.current_time())
        if len(runs) <= 3:
            raise KeyError("boom")
        await trio.sleep_forever()

    await nursery.start(partial(keep_running, board, "flaky", started_at_once(flaky),
                                backoff=(0.05, 0.2)))
    with trio.fail_after(5):
        while len(runs) < 4:
            await trio.sleep(0.005)
    h = board.record()["flaky"]
    assert h["failures"] == 3 and h["running"] and "KeyError" in h["last_error"]
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert gaps[0] >= 0.05 and gaps[2] >= 2 * gaps[0]  # the backoff doubles


async def test_a_failure_before_started_fails_the_start():
    async def broken(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        raise OSError("cannot bind")

    with pytest.raises(BaseExceptionGroup) as ei:
        async with trio.open_nursery() as n:
            await n.start(partial(keep_running, TaskBoard(), "b", broken))
    assert ei.group_contains(OSError)


async def test_cancellation_passes_through():
    board = TaskBoard()
    with trio.move_on_after(0.05) as scope:
        await keep_running(board, "x", started_at_once(trio.sleep_forever))
    assert scope.cancelled_caught and board.record()["x"]["failures"] == 0
