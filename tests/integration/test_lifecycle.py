"""Shard and supervisor lifecycle on a real swap device: no process stops serving while its
device is in swap, whatever goes wrong around it, and every page verifies afterwards.

Each test holds pages of a verifying workload on the device (swapped out of a memory cgroup),
then hurts the daemon from outside, the way the real fault would: a swapoff that fails for
lack of memory (cgroup v1 with the OOM killer disabled: the kernel's ENOMEM, not a fake), a
second SIGTERM while swapoff runs, a control message that crashes the control server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.integration.harness import cli, leftovers
from tests.integration.test_swap import finish, wait_held, workload
from tierswap import system
from tierswap.cgroup import MemoryCgroup

pytestmark = pytest.mark.integration
MiB = 1 << 20


def set_limit(cg: MemoryCgroup, nbytes: int) -> None:
    name = "memory.limit_in_bytes" if cg.kind == "v1" else "memory.max"
    (cg.path / name).write_text(str(nbytes))


def wait_log(inst, needle: str, timeout: float = 60, after: int = 0) -> int:
    """Wait for `needle` in the instance's log (past offset `after`); returns its offset."""
    log = inst.run_dir / "tierswap.log"
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        at = text.find(needle, after)
        if at >= 0:
            return at
        assert time.monotonic() < deadline, f"{needle!r} not logged; log ends: {text[-2000:]}"
        time.sleep(0.01)


def alive(pid: int) -> bool:
    return system.pid_alive(pid)


def wait_exit(pid: int, timeout: float = 120, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} did not exit: " + what_it_does(pid, log)
        time.sleep(0.05)


def what_it_does(pid: int, log: Path | None) -> str:
    """Who a process that does not exit is and where it waits, for the failure message."""
    def read(name: str) -> str:
        try:
            return Path(f"/proc/{pid}/{name}").read_text(errors="replace")
        except OSError as e:
            return f"<{e.strerror}>"
    threads = []
    for t in sorted(Path(f"/proc/{pid}/task").glob("*")):
        with contextlib.suppress(OSError):
            threads.append(f"{t.name} {(t / 'comm').read_text().strip()} "
                           f"wchan={(t / 'wchan').read_text()} "
                           f"stack={(t / 'stack').read_text().split()[:12]}")
    tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
    return (f"cmdline={read('cmdline').replace(chr(0), ' ')!r} "
            f"state={[ln for ln in read('status').splitlines() if ln.startswith('State')]} "
            f"threads={threads} swaps={system.active_swaps()} log tail:\n{tail}")


def in_swap(dev: str) -> bool:
    return dev in system.active_swaps()


def swap_used(dev: str) -> int:
    return system.active_swaps().get(dev, {}).get("used", 0)


def wait_swapoff_running(dev: str, before: int, timeout: float = 60) -> None:
    """Until swapoff of `dev` is visibly under way: its used swap falls, and it is still on."""
    deadline = time.monotonic() + timeout
    while not (in_swap(dev) and swap_used(dev) < before):
        assert in_swap(dev), "swapoff finished before it could be seen running"
        assert time.monotonic() < deadline, "swapoff did not start"
        time.sleep(0.005)


def signal_while_in_swap(pid: int, dev: str) -> int:
    """SIGTERM `pid` again and again while `dev` is still in swap; returns how often."""
    sent = 0
    while in_swap(dev) and sent < 5:
        os.kill(pid, signal.SIGTERM)
        sent += 1
        time.sleep(0.05)
    assert sent, "swapoff finished before a second signal could be sent"
    return sent


def test_a_failed_swapoff_keeps_the_shard_serving(make_instance, base):
    inst = make_instance(size="1G", ram="32M", disk="1G")
    dev = inst.devices[0]
    shard_pid = inst.state()["shards"][0]["pid"]
    hold = base / "hold"
    with (MemoryCgroup.create(f"tierswap-swapoff-{os.getpid()}", 96 * MiB) as cg,
          workload(cg, "320M", 41, hold) as proc):
        if cg.kind != "v1":
            pytest.skip("needs cgroup v1 memory.oom_control to make swapoff fail for real")
        wait_held(proc, hold)
        (cg.path / "memory.oom_control").write_text("1")  # the pages cannot come back now
        os.kill(shard_pid, signal.SIGTERM)
        deadline = time.monotonic() + 5  # its swapoff fails at once (ENOMEM)
        while alive(shard_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive(shard_pid) and in_swap(dev)
        assert str(inst.run_dir) in Path("/proc/mounts").read_text()  # still mounted
        assert inst.status()["shards"][0]["reporting"]  # and answering
        wait_log(inst, "still in swap: serving on")
        set_limit(cg, 1 << 30)  # now there is room: a second stop succeeds
        os.kill(shard_pid, signal.SIGTERM)
        wait_exit(shard_pid)
        assert not in_swap(dev)
        hold.unlink()
        finish(proc)  # every page came back intact


def test_a_second_sigterm_during_the_shards_swapoff_is_ignored(make_instance, base):
    inst = make_instance(size="2G", ram="32M", disk="2G")
    dev = inst.devices[0]
    shard_pid = inst.state()["shards"][0]["pid"]
    hold = base / "hold"
    with (MemoryCgroup.create(f"tierswap-sigterm-{os.getpid()}", 128 * MiB) as cg,
          workload(cg, "640M", 42, hold) as proc):
        wait_held(proc, hold)
        set_limit(cg, 2 << 30)  # room for swapoff to bring the pages back
        before = swap_used(dev)
        os.kill(shard_pid, signal.SIGTERM)
        wait_swapoff_running(dev, before)
        signal_while_in_swap(shard_pid, dev)  # the impatient operator
        wait_exit(shard_pid)
        assert not in_swap(dev)
        hold.unlink()
        finish(proc)  # the shard lived until every page was back
    wait_log(inst, "while already stopping (swapoff running): ignored")


def test_a_second_sigterm_during_the_supervisors_swapoff_is_ignored(make_instance, base):
    inst = make_instance(size="2G", ram="32M", disk="2G")
    dev = inst.devices[0]
    sup_pid = inst.state()["pid"]
    hold = base / "hold"
    with (MemoryCgroup.create(f"tierswap-supterm-{os.getpid()}", 128 * MiB) as cg,
          workload(cg, "640M", 43, hold) as proc):
        wait_held(proc, hold)
        set_limit(cg, 2 << 30)
        before = swap_used(dev)
        os.kill(sup_pid, signal.SIGTERM)
        wait_swapoff_running(dev, before)
        signal_while_in_swap(sup_pid, dev)
        wait_exit(sup_pid)
        hold.unlink()
        finish(proc)
    # an orderly stop: nothing left for `down --force`
    assert not leftovers(inst.run_dir)
    wait_log(inst, "while stopping (swapoff runs first): ignored")


def test_a_control_message_that_crashes_the_control_server_costs_no_page(make_instance,
                                                                         base):
    inst = make_instance(size="1G", ram="32M", disk="1G")
    st = inst.state()
    shard_pid = st["shards"][0]["pid"]
    sock_path = inst.run_dir / "shard0" / "control.sock"
    hold = base / "hold"
    with (MemoryCgroup.create(f"tierswap-ctl-{os.getpid()}", 96 * MiB) as cg,
          workload(cg, "320M", 44, hold) as proc):
        wait_held(proc, hold)
        for _ in range(3):
            with socket.socket(socket.AF_UNIX) as s:  # one line of deeply nested JSON
                deadline = time.monotonic() + 20
                while True:  # the server may be coming back from the last round
                    try:
                        s.connect(str(sock_path))
                        break
                    except (ConnectionRefusedError, FileNotFoundError):
                        assert time.monotonic() < deadline and alive(shard_pid)
                        time.sleep(0.05)
                s.sendall(b"[" * 60_000 + b"\n")
                s.settimeout(10)
                try:
                    while s.recv(4096):
                        pass
                except OSError:
                    pass
        deadline = time.monotonic() + 20
        while not inst.status()["shards"][0]["reporting"]:  # its control server is back
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert alive(shard_pid) and in_swap(inst.devices[0])
        hold.unlink()
        finish(proc)
    assert inst.status()["io"]["read_errors"] == 0
    cli("down", config=inst.config)


def test_a_shard_that_cannot_come_back_keeps_its_pages_and_returns_when_it_can(
        make_instance, base):
    """Shard 1 dies while its replacements cannot start (the operator edited the config file
    so that it no longer fits). It must not be retired: retiring loses every page on its
    device. Its device stays in swap (its requests wait), shard 0 serves on, status says why,
    and once the cause is gone a retry brings shard 1 back with every page."""
    inst = make_instance(size="2G", ram="32M", disk="2G", shards=2)
    dev0, dev1 = inst.devices
    hold = base / "hold"
    with (MemoryCgroup.create(f"tierswap-dead-{os.getpid()}", 96 * MiB) as cg,
          workload(cg, "320M", 45, hold) as proc):
        wait_held(proc, hold)
        assert all(s["pages"] > 0 for s in inst.status()["tiers"])
        good = inst.config.read_text()
        # a config whose size no longer fits the running device's kit: replacements refuse it
        bad = good.replace('size = "2G"\npriority', 'size = "4G"\npriority')
        assert bad != good
        inst.config.write_text(bad)
        try:
            victim = inst.state()["shards"][1]["pid"]
            os.kill(victim, signal.SIGKILL)
            st = inst.wait_status(lambda s: s["shards"][1]["state"] == "failed", timeout=120)
            row = st["shards"][1]
            assert "SIGKILL" in row["reason"] and "kept in swap" in row["reason"], row
            assert in_swap(dev1) and in_swap(dev0)  # not retired
            assert st["shards"][0]["state"] == "serving" and st["shards"][0]["reporting"]
            assert "failed" in cli("status", config=inst.config).stdout
        finally:
            inst.config.write_text(good)
        st = inst.wait_status(lambda s: s["shards"][1]["state"] == "serving"
                              and s["shards"][1]["reporting"], timeout=120)
        assert st["shards"][1]["restarts"] == 1 and st["shards"][1]["pid"] != victim
        hold.unlink()
        finish(proc)  # every page verifies, those that waited on shard 1 included
    assert inst.status()["io"]["read_errors"] == 0
    cli("down", config=inst.config)  # a normal stop, no --force needed
    assert not leftovers(inst.run_dir)


def test_down_with_a_shard_that_cannot_come_back_swaps_nothing_off_and_keeps_serving(
        make_instance):
    """`down` while a shard with pages has no process: its swapoff would wait forever on a
    connection nobody serves. down tries it once more, then refuses in one line with nothing
    swapped off; once the cause is gone, down works."""
    inst = make_instance(size="1G", ram="16M", disk="1G", shards=2)
    dev0, dev1 = inst.devices
    good = inst.config.read_text()
    inst.config.write_text(good.replace('size = "1G"\npriority', 'size = "4G"\npriority'))
    try:
        os.kill(inst.state()["shards"][1]["pid"], signal.SIGKILL)
        inst.wait_status(lambda s: s["shards"][1]["state"] == "failed", timeout=120)
        p = cli("down", config=inst.config, check=False, timeout=120)
        assert p.returncode != 0 and p.stderr.count("\n") == 1, p
        assert "no process that can serve it" in p.stderr, p.stderr
        assert in_swap(dev0) and in_swap(dev1)  # nothing half-done
        assert inst.status()["shards"][0]["state"] == "serving"  # the supervisor serves on
    finally:
        inst.config.write_text(good)
    cli("down", config=inst.config, timeout=120)  # brings shard 1 back, then stops cleanly
    assert not in_swap(dev0) and not in_swap(dev1)
    assert not leftovers(inst.run_dir)


def test_the_watchdog_signal_to_every_process_stops_swapoff_first(make_instance, base):
    """What systemd does when the watchdog fires (KillMode=control-group): WatchdogSignal=
    to the supervisor and every shard at once. Each must stop as in a stop, pages first."""
    from tierswap.tasks import WATCHDOG_SIGNAL

    inst = make_instance(size="2G", ram="32M", disk="2G", shards=2)
    st = inst.state()
    pids = [st["pid"]] + [sh["pid"] for sh in st["shards"]]
    hold = base / "hold"
    with (MemoryCgroup.create(f"tierswap-wd-{os.getpid()}", 128 * MiB) as cg,
          workload(cg, "512M", 46, hold) as proc):
        wait_held(proc, hold)
        set_limit(cg, 2 << 30)  # room for the pages to come back
        for pid in pids:
            os.kill(pid, WATCHDOG_SIGNAL)
        for pid in pids:
            wait_exit(pid, log=inst.run_dir / "tierswap.log")
        assert not any(in_swap(d) for d in inst.devices)
        hold.unlink()
        finish(proc)  # no page was lost on the way out
    assert not leftovers(inst.run_dir)
    log = (inst.run_dir / "tierswap.log").read_text()
    assert "watchdog signal received" in log
    assert not list(base.rglob("core*"))
