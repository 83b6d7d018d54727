"""`tierswap bench` for real: zram and a private tierswap, the workload verified on both, and
nothing of it left afterwards (swap, zram device, loop, FUSE mount, cgroup, directories), also
after a Ctrl-C; with another swap device active it refuses and starts nothing.

Run under the machine lock (it swaps): flock /tmp/tierswap-swap.lock pytest ... test_bench.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.harness import reap, skip_without_capabilities
from tierswap import system

pytestmark = pytest.mark.integration
BENCH = [sys.executable, "-m", "tierswap", "bench"]


def machine_state() -> dict[str, list[str]]:
    """What a bench run could leave behind."""
    mounts = [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines()
              if ln.split()[2].startswith("fuse") and "tierswap-bench-" in ln.split()[1]]
    cgroups = [str(p) for root in (Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup"))
               for p in root.glob("tierswap-bench-*")]
    return {
        "swaps": sorted(system.active_swaps()),
        "zram": sorted(p.name for p in Path("/sys/block").glob("zram*")),
        "fuse": sorted(mounts),
        "loops": sorted(d["name"] for d in system.loop_list()
                        if "tierswap-bench-" in (d.get("back-file") or "")),
        "cgroups": sorted(cgroups),
        "dirs": sorted(str(p) for p in Path("/var/tmp").glob("tierswap-bench-*")),
        "hold": sorted(str(p) for p in Path(os.environ.get("TMPDIR", "/tmp"))
                       .glob("tierswap-bench-hold-*")),
    }


@pytest.fixture
def clean_machine():
    skip_without_capabilities()
    # the previous holder of the machine lock may still be swapping off
    system.wait_for(lambda: not system.active_swaps(), 30, interval=0.5)
    before = machine_state()
    yield before
    after = machine_state()
    assert after == before
    assert not [s for s in after["swaps"] if "zram" in s and s not in before["swaps"]]


def yes_if_needed(before: dict[str, list[str]]) -> list[str]:
    """--yes only when a swap device that is not ours is active (someone else's instance);
    the refusal itself is test_refuses_while_another_swap_is_active."""
    return ["--yes"] if before["swaps"] else []


def test_bench_runs_zram_and_tierswap_and_leaves_nothing(clean_machine, tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([*BENCH, "--size", "128M", "--out", str(out),
                        *yes_if_needed(clean_machine)], capture_output=True,
                       text=True, timeout=1200, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    print(p.stdout)  # the table, for whoever runs this with -s
    doc = json.loads((out / "bench.json").read_text())
    zram_possible = Path("/sys/class/zram-control").exists() or subprocess.run(
        ["modprobe", "--dry-run", "zram"], capture_output=True).returncode == 0
    expected = {"zram", "tierswap"} if zram_possible else {"tierswap"}
    assert set(doc["backends"]) == expected
    for name, r in doc["backends"].items():
        w = r["workload"]
        assert w["ok"] and w["bad_pages"] == 0, name
        assert w["pages"] == (128 << 20) // 4096
        assert w["phases"]["seq"]["bad_pages"] == 0 and w["phases"]["rand"]["bad_pages"] == 0
        assert sum(r["swap_used_at_hold"].values()) > 0, f"{name}: nothing was swapped out"
        assert r["compression"] and r["latency"]["samples"] > 0
        assert "error" not in r and "teardown_problems" not in r
    if zram_possible:
        assert all(v is not None for v in doc["ratios"].values())
        assert "tierswap / zram" in p.stdout and "every page verified" in p.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "chart skipped" in p.stdout
    else:
        assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_ctrl_c_during_the_tierswap_run_tears_everything_down(clean_machine, tmp_path):
    out = tmp_path / "out"
    # a session of its own, signalled as a terminal's Ctrl-C signals its foreground group
    proc = subprocess.Popen([*BENCH, "--size", "128M", "--out", str(out),
                             *yes_if_needed(clean_machine)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 900
        for line in proc.stderr:
            seen.append(line)
            if line.strip() == "bench: tierswap: fill":
                break
            assert time.monotonic() < deadline, seen
        else:
            raise AssertionError(f"never reached the tierswap fill: {seen}")
        time.sleep(1.0)  # the workload is filling, its pages going to tierswap
        assert set(system.active_swaps()) - set(clean_machine["swaps"])  # tierswap's loop
        os.killpg(proc.pid, signal.SIGINT)
        _, rest = proc.communicate(timeout=600)
        err = "".join(seen) + rest
    finally:
        reap(proc)
    assert proc.returncode == 130, err
    assert "interrupted; everything it set up was removed" in err
    assert not out.exists()


def test_refuses_while_another_swap_is_active(clean_machine, tmp_path):
    swapfile = Path("/var/tmp") / f"tierswap-test-swap-{os.getpid()}"
    fd = os.open(swapfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, bytes(16 << 20))  # written, not sparse: swapon refuses holes
        os.close(fd)
        system.run(["mkswap", str(swapfile)])
        system.run(["swapon", str(swapfile)])
        during = machine_state()
        out = tmp_path / "out"
        p = subprocess.run([*BENCH, "--size", "128M", "--out", str(out)], capture_output=True,
                           text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert p.returncode == 1
        err = p.stderr.strip()
        assert len(err.splitlines()) == 1 and str(swapfile) in err and "--yes" in err, err
        assert not out.exists()
        assert machine_state() == during  # nothing was set up
    finally:
        system.swapoff(str(swapfile))
        swapfile.unlink(missing_ok=True)
