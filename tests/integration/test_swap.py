"""A real swap device: mount, loop, swapon, a memory-cgroup workload that checks every page."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.harness import (
    cli,
    config_text,
    discards_arrived,
    leftovers,
    reap,
    start,
    stop,
)
from tierswap.cgroup import MemoryCgroup, run_in_cgroup
from tierswap.workload import content_stats

pytestmark = pytest.mark.integration
MiB = 1 << 20


def run_workload(cg: MemoryCgroup, size: str, seed: int, hold: Path | None = None):
    argv = [sys.executable, "-m", "tierswap.workload", "--size", size, "--seed", str(seed)]
    if hold is not None:
        argv += ["--hold-file", str(hold)]
    return run_in_cgroup(cg, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def workload(cg: MemoryCgroup, size: str, seed: int, hold: Path | None = None):
    """The verifying workload in `cg`, killed on the way out if the test failed first (it
    must be gone before teardown's swapoff, which would pull its pages back into the group)."""
    proc = run_workload(cg, size, seed, hold)
    try:
        yield proc
    finally:
        reap(proc)


def wait_held(proc: subprocess.Popen, hold: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not hold.exists():
        if proc.poll() is not None:
            raise AssertionError(f"workload exited early: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "workload did not finish filling"
        time.sleep(0.1)


def finish(proc: subprocess.Popen, timeout: float = 900) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"workload failed ({proc.returncode}): {out} {err}"
    res = json.loads(out)
    assert res["ok"] and res["bad_pages"] == 0, res
    return res


def test_workload_swaps_through_both_tiers_and_discard_frees_slots(make_instance, base):
    inst = make_instance(size="2G", ram="32M", disk="2G")
    assert inst.devices and inst.devices[0].startswith("/dev/loop")
    hold = base / "hold"
    size = 512 * MiB
    with (MemoryCgroup.create(f"tierswap-it-{os.getpid()}", 128 * MiB) as cg,
          workload(cg, "512M", 7, hold) as proc):
        wait_held(proc, hold)
        st = inst.status()
        ram, disk = st["tiers"]
        # the RAM budget is smaller than the swapped set: both tiers hold pages
        assert ram["pages"] > 0 and disk["pages"] > 0, st
        assert ram["stored_bytes"] <= ram["capacity_bytes"]
        # Zero pages cost no storage anywhere. Kernels since 6.12 keep swapped-out zero
        # pages in a bitmap and never write them, so we may see none: what reaches us is
        # at most the non-zero part of what the cgroup swapped.
        stats = content_stats(7, size // 4096)
        nonzero_share = 1 - stats["zero"] / (size // 4096)
        swapped_pages = cg.swap_bytes() // 4096
        assert st["pages"]["stored"] <= swapped_pages * nonzero_share * 1.05 + 256
        assert st["compression_ratio"] > 1.5
        assert st["metadata_bytes_per_page"] < 24
        peak = st["pages"]["stored"]
        assert peak * 4096 > size / 4  # most of the workload left memory
        hold.unlink()
        finish(proc)
    # the workload is gone: the kernel discards its slots (cluster by cluster) and the map
    # empties but for what clusters still in use hold back
    st = inst.wait_status(discards_arrived, timeout=60)
    assert st["io"]["write_errors"] == 0 and st["io"]["read_errors"] == 0
    assert sum(t["stored_bytes"] for t in st["tiers"]) <= st["pages"]["stored"] * 4096


def test_status_json_contract(make_instance):
    inst = make_instance(size="1G", ram="16M", disk="1G")
    st = inst.status()
    assert isinstance(st["device"], str) and st["device"] in inst.devices
    assert st["size_bytes"] == 1 << 30
    assert set(st["pages"]) >= {"stored", "zero"}
    for t in st["tiers"]:
        assert t["kind"] in ("memory", "file")
        for k in ("name", "pages", "stored_bytes", "capacity_bytes"):
            assert k in t
    assert isinstance(st["compression_ratio"], float)
    assert isinstance(st["metadata_bytes"], int)
    table = cli("status", config=inst.config).stdout
    assert inst.devices[0] in table and "ram" in table and "disk" in table


def test_private_files_and_no_allow_other(make_instance):
    inst = make_instance(size="1G", ram="16M", disk="1G")
    for p in (inst.run_dir / "control.sock", inst.run_dir / "state.json",
              inst.base / "state" / "disk.tier"):
        assert p.stat().st_mode & 0o777 == 0o600, p
    # everything we create, down to the slot map and the FUSE file, is private to root
    for top in (inst.run_dir, inst.base / "state"):
        for p in [top, *top.rglob("*")]:
            want = 0o700 if p.is_dir() else 0o600
            assert p.stat().st_mode & 0o777 == want, p
    with open("/proc/self/mounts") as f:
        ours = [ln for ln in f if str(inst.run_dir) in ln]
    assert ours and all("allow_other" not in ln for ln in ours)


def proc_status(pid) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (ln.split(":", 1) for ln in text.splitlines())}


def test_shard_processes_are_hardened(make_instance):
    inst = make_instance(size="1G", ram="16M", disk="1G")
    caps = int(proc_status("self")["CapEff"], 16)
    has_sys_resource = bool(caps & (1 << 24))
    for sh in inst.state()["shards"]:
        status = proc_status(sh["pid"])
        locked = int(status["VmLck"].split()[0])
        rss = int(status["VmRSS"].split()[0])
        assert locked > 0.8 * rss, (locked, rss)  # mlockall: everything resident is locked
        adj = int(Path(f"/proc/{sh['pid']}/oom_score_adj").read_text())
        # without CAP_SYS_RESOURCE (some sandboxes) the kernel refuses -1000; the daemon says so
        assert adj == (-1000 if has_sys_resource else 0)
    log = (inst.run_dir / "tierswap.log").read_text()
    if not has_sys_resource:
        assert "oom_score_adj" in log and "PR_SET_IO_FLUSHER" in log


def test_down_twice_and_up_again(base):
    cfg = base / "t.toml"
    cfg.write_text(config_text(base, size="1G", ram="16M", disk="1G"))
    try:
        for _ in range(2):
            up = cli("up", config=cfg)
            dev = up.stdout.split()[0]
            with open("/proc/swaps") as f:
                assert dev in f.read()
            again = cli("up", config=cfg, check=False)
            assert again.returncode != 0 and "already running" in again.stderr
            cli("down", config=cfg)
            assert not leftovers(base / "run")
            second = cli("down", config=cfg)
            assert "not running" in second.stdout
    finally:
        stop(base, cfg)


def test_a_run_the_host_went_down_under_is_reported_and_swap_starts_empty(base):
    """Issue 10: nothing that holds pages survives a boot, so a run whose host crashed is
    detected at the next `up` (its session file names another boot) and said so."""
    cfg = base / "t.toml"
    cfg.write_text(config_text(base, size="1G", ram="16M", disk="1G"))
    session = base / "state" / "session.json"
    session.parent.mkdir(parents=True)
    session.write_text(json.dumps({"boot_id": "0" * 32, "started": 1.0e9}))
    try:
        cli("up", config=cfg)
        log = (base / "run" / "tierswap.log").read_text()
        assert "the host crashed or rebooted with swap on" in log
        with open("/proc/sys/kernel/random/boot_id") as f:
            assert json.loads(session.read_text())["boot_id"] == f.read().strip()
        st = json.loads(cli("status", "--json", config=cfg).stdout)
        assert st["pages"]["stored"] <= 1  # mkswap's header page only
        cli("down", config=cfg)
        assert not session.exists()  # a clean stop: the next up has nothing to report
        seen = len(log)
        cli("up", config=cfg)
        assert "host crashed" not in (base / "run" / "tierswap.log").read_text()[seen:]
        cli("down", config=cfg)
    finally:
        stop(base, cfg)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["crashed", "wedged"])
def test_down_force_clears_a_crashed_or_wedged_run(base, how):
    cfg = base / "t.toml"
    cfg.write_text(config_text(base, size="1G", ram="16M", disk="1G"))
    try:
        start(base, cfg.read_text())
        st = json.loads((base / "run" / "state.json").read_text())
        # crash (or hang): the supervisor and every shard at once, swap still active
        for pid in [st["pid"]] + [sh["pid"] for sh in st["shards"]]:
            os.kill(pid, how)
        time.sleep(0.2)
        assert leftovers(base / "run"), "the crash should have left the loop and mount"
        plain = cli("down", "--timeout", "5", config=cfg, check=False)
        assert plain.returncode == 1 and "--force" in plain.stderr
        assert len(plain.stderr.strip().splitlines()) == 1
        forced = cli("down", "--force", config=cfg, check=False)
        assert forced.returncode == 0, forced.stderr
        assert not leftovers(base / "run")
        with open("/proc/swaps") as f:
            assert str(base) not in f.read()
        # and a fresh start works on the same directories
        start(base, cfg.read_text())
    finally:
        stop(base, cfg)


def test_a_test_failing_inside_workload_leaves_no_open_pipe(base):
    """workload() reaps the process *and* closes its pipes when the body fails.

    Left open, they are closed by the garbage collector in some later test, whose
    filterwarnings = error then fails with the ResourceWarning of a pipe it never opened.
    """
    hold = base / "hold"
    with MemoryCgroup.create(f"tierswap-reap-{os.getpid()}", 64 * MiB) as cg:
        with pytest.raises(RuntimeError), workload(cg, "8M", 3, hold) as proc:
            raise RuntimeError("the test body failed")
        assert proc.returncode is not None
        assert proc.stdout.closed and proc.stderr.closed
