"""Restart without losing a page (issue 10), on real swap: a workload holds pages on two shards
with a RAM tier smaller than what it swapped, and daemon processes die under it.

Every test checks the three things the contract promises: every page verifies, status shows
the shard serving again (with its restart counted), and the kernel log shows no swap read or
write error (a process would have seen an I/O error or SIGBUS).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration.harness import TIERSWAP, cli, leftovers, reap
from tests.integration.test_swap import finish, wait_held, workload
from tierswap.cgroup import MemoryCgroup

pytestmark = pytest.mark.integration
MiB = 1 << 20
SWAP_ERRORS = ("Read-error on swap-device", "Write-error on swap-device", "I/O error, dev loop",
               "Bad swap")


def kernel_log() -> list[str]:
    p = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30)
    return p.stdout.splitlines()


def _stamp(line: str) -> float:
    m = re.match(r"\[\s*(\d+\.\d+)\]", line)
    return float(m.group(1)) if m else 0.0


def log_mark() -> float:
    """Where the kernel log is now: the time of its last line. A line count would not do: the
    ring buffer drops old lines, and older errors (another test's) would then count as new."""
    lines = kernel_log()
    return _stamp(lines[-1]) if lines else 0.0


def new_swap_errors(mark: float) -> list[str]:
    return [ln for ln in kernel_log()
            if _stamp(ln) > mark and any(e in ln for e in SWAP_ERRORS)]


def wait_serving(inst, index: int, restarts: int, timeout: float = 30.0) -> dict:
    return inst.wait_status(
        lambda s: s["shards"][index]["state"] == "serving"
        and s["shards"][index]["restarts"] >= restarts and s["shards"][index]["reporting"],
        timeout=timeout)


def replacement_of(supervisor: int, shard: int, victim: int, timeout: float = 20.0) -> int:
    """The pid of the supervisor's new child for `shard`, found as soon as it is spawned."""
    want = ["-m", "tierswap.shard", "--shard", str(shard)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == victim:
                continue
            try:
                argv = (d / "cmdline").read_bytes().decode().split("\0")
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == supervisor and argv[1:1 + len(want)] == want:
                return int(d.name)
        time.sleep(0.002)
    raise AssertionError(f"no replacement for shard {shard} was spawned in {timeout}s")


def pids(inst) -> dict[str, int]:
    st = inst.state()
    out = {"supervisor": st["pid"]}
    out |= {f"shard{s['shard']}": s["pid"] for s in st["shards"]}
    return out


class SwapWatcher:
    """Polls /proc/swaps: did any of the devices ever leave it?"""

    def __init__(self, devices: list[str]) -> None:
        self.devices = devices
        self.missing: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/swaps") as f:
                names = {ln.split()[0] for ln in f.read().splitlines()[1:]}
            self.missing += [d for d in self.devices if d not in names]
            time.sleep(0.02)

    def __enter__(self) -> SwapWatcher:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def held_workload(base: Path, seed: int, size: str = "640M", limit: int = 160 * MiB):
    """A workload that filled and holds its pages (most of them out in swap)."""
    cg = MemoryCgroup.create(f"tierswap-restart-{os.getpid()}-{seed}", limit)
    return cg, base / f"hold{seed}"


@pytest.fixture
def two_shards(make_instance):
    # 64M of RAM tier for 640M of pages: most of them live in the file tier
    return make_instance(size="2G", ram="64M", disk="2G", shards=2)


def test_a_shard_killed_under_load_comes_back_with_every_page(two_shards, base):
    inst = two_shards
    log0 = log_mark()
    cg, hold = held_workload(base, 61)
    with cg, workload(cg, "640M", 61, hold) as proc:
        wait_held(proc, hold)
        st = inst.status()
        assert all(t["pages"] > 0 for t in st["tiers"])  # both tiers hold pages
        victim = inst.state()["shards"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        st = wait_serving(inst, 0, 1, timeout=30)
        assert time.monotonic() - t0 < 10, "the replacement must serve within 10 s"
        row = st["shards"][0]
        assert row["pid"] != victim and row["restarts"] == 1
        assert st["shards"][1]["restarts"] == 0
        hold.unlink()
        finish(proc)  # fill was before the kill; seq and rand read everything back
    assert not new_swap_errors(log0)
    assert inst.status()["io"]["read_errors"] == 0


def test_a_shard_killed_while_pages_are_being_read_back(two_shards, base):
    """The kill lands while swap-in requests are in flight: the kernel keeps them queued on
    the connection (the supervisor holds its fds) and the replacement asks for them again."""
    inst = two_shards
    log0 = log_mark()
    cg, hold = held_workload(base, 62)
    with cg, workload(cg, "640M", 62, hold) as proc:
        wait_held(proc, hold)
        hold.unlink()  # verification starts: random swap-in
        time.sleep(1.5)
        os.kill(inst.state()["shards"][1]["pid"], signal.SIGKILL)
        wait_serving(inst, 1, 1)
        os.kill(inst.state()["shards"][1]["pid"], signal.SIGKILL)  # and again: twice in a row
        wait_serving(inst, 1, 2)
        finish(proc)
    assert not new_swap_errors(log0)


def test_a_shard_killed_again_while_its_replacement_starts(two_shards, base):
    """The replacement is killed before it serves (state "restarting"): the next replacement
    still finds every page in the kit, and nothing was answered wrongly meanwhile."""
    inst = two_shards
    log0 = log_mark()
    cg, hold = held_workload(base, 64)
    with cg, workload(cg, "640M", 64, hold) as proc:
        wait_held(proc, hold)
        hold.unlink()  # swap-in goes on through both kills
        victim = inst.state()["shards"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        second = replacement_of(inst.state()["pid"], 0, victim)
        os.kill(second, signal.SIGKILL)  # before it answers: it is still starting
        st = wait_serving(inst, 0, 1)
        assert st["shards"][0]["pid"] not in (victim, second)
        finish(proc)
    assert not new_swap_errors(log0)


def test_the_supervisor_killed_leaves_the_shards_serving_and_a_new_one_adopts_them(
        two_shards, base):
    inst = two_shards
    log0 = log_mark()
    before = pids(inst)
    cg, hold = held_workload(base, 63)
    with cg, workload(cg, "640M", 63, hold) as proc:
        wait_held(proc, hold)
        os.kill(before["supervisor"], signal.SIGKILL)
        hold.unlink()  # the shards serve the whole verification without a supervisor
        time.sleep(2)
        cli("up", config=inst.config)  # a new supervisor adopts the running shards
        st = inst.status()
        after = pids(inst)
        assert after["supervisor"] != before["supervisor"]
        assert [after["shard0"], after["shard1"]] == [before["shard0"], before["shard1"]]
        assert all(s["state"] == "serving" and s["reporting"] for s in st["shards"])
        # the adopted shards can still be replaced: the new supervisor holds their kits
        os.kill(after["shard0"], signal.SIGKILL)
        wait_serving(inst, 0, 1)
        finish(proc)
    assert not new_swap_errors(log0)


@pytest.mark.parametrize("command", ["migrate", "compact"])
def test_a_shard_killed_during_a_move_keeps_a_consistent_map(two_shards, base, command):
    inst = two_shards
    log0 = log_mark()
    cg, hold = held_workload(base, 64)
    with cg, workload(cg, "640M", 64, hold) as proc:
        wait_held(proc, hold)
        argv = (["migrate", "--from", "disk", "--to", "ram", "--all"] if command == "migrate"
                else ["compact", "disk"])
        mover = subprocess.Popen(
            [*TIERSWAP,
             *argv, "--config", str(inst.config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)  # the move is under way
            os.kill(inst.state()["shards"][0]["pid"], signal.SIGKILL)
            mover.communicate(timeout=600)  # it may fail on the dead shard: that is fine
        finally:
            reap(mover)
        wait_serving(inst, 0, 1)
        hold.unlink()
        finish(proc)
    assert not new_swap_errors(log0)


def test_restart_replaces_every_process_while_swap_stays_on(two_shards, base):
    inst = two_shards
    log0 = log_mark()
    before = pids(inst)
    logs_to = os.readlink(f"/proc/{before['supervisor']}/fd/2")
    cg, hold = held_workload(base, 65)
    with cg, workload(cg, "640M", 65, hold) as proc:
        wait_held(proc, hold)
        hold.unlink()  # under load: the verification reads everything back meanwhile
        with SwapWatcher(inst.devices) as watch:
            cli("restart", config=inst.config, timeout=300)
            after = pids(inst)
            finish(proc)
        assert not watch.missing, f"left /proc/swaps: {sorted(set(watch.missing))}"
    assert all(after[k] != before[k] for k in before), (before, after)
    # the new processes log where the old ones did (under the unit: the journal's stream)
    assert os.readlink(f"/proc/{after['supervisor']}/fd/2") == logs_to
    assert os.readlink(f"/proc/{after['shard0']}/fd/2") == logs_to
    st = inst.status()
    assert all(s["state"] == "serving" for s in st["shards"])
    errors = new_swap_errors(log0)
    assert not errors, (errors[:5], st)  # status: which tier refused (enospc, failed)
    cli("down", config=inst.config)
    assert not leftovers(inst.run_dir)


@pytest.mark.parametrize("breakage", ["syntax", "size"])
def test_a_restart_that_cannot_take_over_leaves_the_running_daemon_serving(
        two_shards, base, breakage):
    """The operator edits the config and runs restart: a config that does not parse, or one
    that no longer fits the running shards' kits, must leave every process as it was."""
    inst = two_shards
    before = pids(inst)
    good = inst.config.read_text()
    bad = (good + "\n[device\n" if breakage == "syntax"
           else good.replace('size = "2G"\npriority', 'size = "4G"\npriority'))
    assert bad != good
    inst.config.write_text(bad)
    try:
        p = cli("restart", config=inst.config, check=False, timeout=300)
    finally:
        inst.config.write_text(good)
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    if breakage == "syntax":  # the command itself reads the config first and refuses
        assert p.returncode == 2 and "config error" in p.stderr, p
    else:  # the new supervisor finds the kits do not fit and says so before touching a thing
        assert p.returncode == 1 and "did not take over" in p.stderr, p
    assert pids(inst) == before  # nothing replaced, the pid file is the running one's
    st = inst.status()
    assert st["supervisor"]["pid"] == before["supervisor"]
    assert all(s["state"] == "serving" and s["reporting"] for s in st["shards"])
    assert all(d in Path("/proc/swaps").read_text() for d in inst.devices)
    # with a config that fits (a copy, as an operator would stage one), it restarts on that
    staged = base / "staged.toml"
    staged.write_text(good)
    cli("restart", config=staged)
    assert all(v != before[k] for k, v in pids(inst).items())
    assert inst.state()["config"] == str(staged)
