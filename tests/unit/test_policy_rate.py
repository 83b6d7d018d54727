"""policy.rate and the background sleeps (issue 8, item 15).

`policy rate=1` used to be accepted, and the next background move then slept for days while
holding the policy lock, so every migrate/drain/compact waited behind it. Now the rate has a
floor, and a sleeping background pass is woken by a new rate (to recompute its wait) and by
any operator command (to give the lock up). Virtual time (trio's autojump clock) measures
how long things wait.
"""

from __future__ import annotations

import pytest
import trio

from tests.lane.harness import open_lane
from tierswap import commands
from tierswap.config import MIN_POLICY_RATE, ConfigError, parse_policy
from tierswap.control import ControlError
from tierswap.policy import Policy, Preempted, TokenBucket


@pytest.mark.parametrize("rate", ["1", "1K", "1023K", 1, "0"])
def test_a_rate_below_the_floor_is_refused(rate):
    with pytest.raises(ConfigError, match=r"policy\.rate"):
        parse_policy({"rate": rate})


def test_the_floor_itself_is_fine():
    assert parse_policy({"rate": "1M"}).rate == MIN_POLICY_RATE


async def test_a_new_rate_wakes_a_sleeping_take(autojump_clock):
    bucket = TokenBucket(MIN_POLICY_RATE)
    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(bucket.take, 1000 * MIN_POLICY_RATE)  # 1000 s at the floor
        await trio.sleep(1)
        bucket.set_rate(1 << 40)
    assert trio.current_time() - t0 < 2


async def test_a_waiting_command_preempts_a_sleeping_pass(autojump_clock):
    lock = trio.Lock()
    bucket = TokenBucket(MIN_POLICY_RATE, yield_to=lock)
    preempted = []

    async def background() -> None:
        async with lock:
            try:
                await bucket.take(1000 * MIN_POLICY_RATE)
            except Preempted:
                preempted.append(True)

    async with trio.open_nursery() as n:
        n.start_soon(background)
        await trio.sleep(1)
        t0 = trio.current_time()
        bucket.wake()
        async with lock:
            assert trio.current_time() - t0 < 0.1
    assert preempted == [True]
    # a wake with nobody waiting for the lock only recomputes the wait
    await bucket.take(0)


async def test_policy_command_refuses_a_tiny_rate_and_bad_settings():
    async with open_lane() as rig:
        policy = Policy(rig.svc, rig.config.policy)
        for bad in ({"rate": "1"}, {"rate": "9" * 400}, {"nope": "1"}, {"rate": ["x"]},
                    {"idle_age": "1e999"}):
            with pytest.raises(ControlError) as ei:
                await policy.handle(commands.parse({"cmd": "policy", "set": bad},
                                                   commands.SHARD), None)
            assert "\n" not in str(ei.value)
        with pytest.raises(ControlError, match=r"expected an object|must map keys"):
            await policy.handle(commands.parse({"cmd": "policy", "set": [1, 2]},
                                               commands.SHARD), None)
        res = await policy.handle(commands.parse({"cmd": "policy", "set": {"rate": "2M"}},
                                                 commands.SHARD), None)
        assert res["rate"] == 2 << 20 and policy.bucket.rate == 2 << 20


async def test_an_operator_command_never_waits_for_a_background_sleep(autojump_clock):
    async with open_lane() as rig:
        policy = Policy(rig.svc, rig.config.policy)
        passes = []

        async def slow_pass() -> None:  # a pass that owes a day of tokens at the current rate
            passes.append(trio.current_time())
            await policy.bucket.take(86400 * policy.bucket.rate)

        policy.tick = slow_pass  # type: ignore[method-assign]
        async with trio.open_nursery() as n:
            n.start_soon(policy.run)
            while not passes:
                await trio.sleep(0.1)
            await trio.sleep(5)
            t0 = trio.current_time()
            res = await policy.handle(commands.Migrate(src="ram", dst="disk", pages=1),
                                      _no_progress)
            assert res == {"pages": 0, "bytes": 0}
            assert trio.current_time() - t0 < 1, "migrate waited for the background sleep"
            await trio.sleep(3)
            assert len(passes) >= 2, "the background loop goes on after giving way"
            n.cancel_scope.cancel()


async def _no_progress(p) -> None:
    return None
