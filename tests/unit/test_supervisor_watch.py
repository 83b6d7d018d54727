"""The supervisor watches every shard process (pidfd) and decides per shard.

Shard processes are real (stand_in_shard.py: the real control protocol on the real socket
path); the supervisor is the real `Supervisor` with its real watch, monitor, retire and
status code. No loop device or mount exists here (run_dir is under tmp_path), so retiring a
shard finds nothing to swap off; what is tested is who is watched, what is decided for whom,
and what status reports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from tierswap import commands, supervisor, system
from tierswap.config import parse_config
from tierswap.procs import Pidfd, ProcessId
from tierswap.supervisor import FAILED, SERVING, ShardSlot, Supervisor
from tierswap.tasks import keep_running, started_at_once

REPO = Path(__file__).resolve().parents[2]
STAND_IN = REPO / "tests" / "unit" / "stand_in_shard.py"


@pytest.fixture(autouse=True)
def no_swap(monkeypatch):
    monkeypatch.setattr(system, "active_swaps", lambda: {})


def make_sup(tmp_path: Path, shards: int = 3) -> Supervisor:
    cfg = parse_config(f"""
[daemon]
state_dir = "{tmp_path}/state"
run_dir = "{tmp_path}/run"
[device]
size = "{shards * 4}M"
shards = {shards}
[[tier]]
name = "ram"
kind = "memory"
capacity = "{shards * 4}M"
""", check_fs=False)
    (tmp_path / "run").mkdir(mode=0o700)
    sup = Supervisor(cfg, None)
    sup.active = True
    return sup


async def spawn_stand_in(sup: Supervisor, slot: ShardSlot) -> None:
    """What Supervisor._spawn does, with the stand-in instead of `python -m tierswap.shard`."""
    slot.paths.run_dir.mkdir(mode=0o700, exist_ok=True)
    slot.paths.control_socket.unlink(missing_ok=True)
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(STAND_IN), str(slot.paths.control_socket)],
        env={**os.environ, "PYTHONPATH": str(REPO)})
    slot.proc, slot.ident, slot.reason = proc, ProcessId.of(proc.pid), None
    slot.pidfd = Pidfd(os.pidfd_open(proc.pid), slot.ident)  # type: ignore[arg-type]
    slot.exited = trio.Event()
    assert sup._outer is not None
    sup._outer.start_soon(sup._watch, slot, slot.pidfd, proc)
    with trio.fail_after(20):
        while not slot.paths.control_socket.exists():
            await trio.sleep(0.01)
    slot.state = SERVING


async def wait_until(pred, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)


@pytest.fixture
async def running(tmp_path, nursery):
    sup = make_sup(tmp_path)
    sup._outer = nursery
    for slot in sup.slots:
        await spawn_stand_in(sup, slot)
    yield sup
    sup.shutdown.set()
    with trio.CancelScope(shield=True), trio.move_on_after(30):
        await sup.tear_down()


async def test_a_dead_shard_is_handled_alone(running, caplog):
    sup = running
    victim = sup.slots[1]
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    await wait_until(lambda: victim.state == FAILED)
    assert victim.reason == "exited (signal SIGKILL)"
    assert [s.state for s in sup.slots] == [SERVING, FAILED, SERVING]
    assert all(s.proc.returncode is None for s in (sup.slots[0], sup.slots[2]))  # type: ignore
    st = await sup.status()
    rows = {r["index"]: r for r in st["shards"]}
    assert rows[1]["state"] == "failed" and rows[1]["pid"] == victim.pid
    assert rows[1]["restarts"] == 0 and "SIGKILL" in rows[1]["reason"]
    assert rows[0]["state"] == rows[2]["state"] == "serving"
    table = commands.Status().render(st)  # renders with shards missing from the sums
    row = next(ln for ln in table.splitlines() if ln.startswith("1 "))
    assert "failed" in row and "SIGKILL" in row and str(victim.pid) in row
    # the others still answer; the dead one is not asked
    replies = await sup.fanout(commands.Ping())
    assert [r.ok for r in replies] == [True, False, True]
    assert "is failed" in replies[1].error  # type: ignore[operator]
    assert any("other shards go on serving" in r.getMessage() for r in caplog.records)


async def test_a_hung_shard_is_killed_and_only_it(running, monkeypatch):
    sup = running
    monkeypatch.setattr(supervisor, "HUNG_AFTER", 2.0)
    monkeypatch.setattr(supervisor, "PING_INTERVAL", 0.05)
    monkeypatch.setattr(commands.Ping, "shard_timeout", 0.5)
    assert sup._outer is not None
    sup._outer.start_soon(partial(keep_running, sup.board, "monitor",
                                  started_at_once(sup.monitor)))
    wedged = sup.slots[2]
    os.kill(wedged.pid, signal.SIGSTOP)  # type: ignore[arg-type]
    await wait_until(lambda: wedged.state == FAILED)
    assert wedged.proc.returncode == -signal.SIGKILL  # type: ignore[union-attr]
    assert wedged.reason.startswith("hung (silent")  # type: ignore[union-attr]
    assert wedged.reason.endswith("exited (signal SIGKILL)")  # type: ignore[union-attr]
    await trio.sleep(1.0)  # the others answer, slowly or not: they are untouched
    assert [s.state for s in sup.slots[:2]] == [SERVING, SERVING]


async def test_the_respawn_hook_brings_a_shard_back_and_counts_restarts(running, monkeypatch):
    sup = running

    async def respawn(slot):
        await spawn_stand_in(sup, slot)
        return True

    monkeypatch.setattr(sup, "respawn", respawn)
    slot = sup.slots[0]
    for n in (1, 2):
        old = slot.pid
        os.kill(old, signal.SIGKILL)  # type: ignore[arg-type]
        await wait_until(lambda old=old: slot.pid != old and slot.state == SERVING)
        assert slot.restarts == n
    assert (await sup.fanout(commands.Ping()))[0].ok
    st = await sup.status()
    assert st["shards"][0]["restarts"] == 2 and st["shards"][0]["state"] == "serving"


async def test_a_process_that_is_not_our_child_is_watched_too(tmp_path, nursery):
    """What a new supervisor adopting running shards needs (issue 10)."""
    sup = make_sup(tmp_path, shards=1)
    sup._outer = nursery
    slot = sup.slots[0]
    out = subprocess.run(["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"],
                         capture_output=True, text=True, check=True).stdout
    pid = int(out)  # a grandchild: reparented, not ours to wait for
    try:
        slot.ident = ProcessId.of(pid)
        slot.pidfd = Pidfd.open(slot.ident)  # type: ignore[arg-type]
        assert slot.pidfd is not None
        slot.state = SERVING
        nursery.start_soon(sup._watch, slot, slot.pidfd, None)
        await trio.sleep(0.1)
        assert slot.state == SERVING
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: slot.state == FAILED)
        assert slot.reason == "exited (status unknown)"
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_tear_down_stops_every_shard_without_calling_it_a_failure(tmp_path, nursery):
    sup = make_sup(tmp_path)
    sup._outer = nursery
    for slot in sup.slots:
        await spawn_stand_in(sup, slot)
    sup.shutdown.set()
    await sup.tear_down()
    assert all(s.exited.is_set() and s.proc.returncode == 0 for s in sup.slots)  # type: ignore
    assert all(s.reason == "stopped" for s in sup.slots)
