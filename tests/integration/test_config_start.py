"""Issue 11, configuration on a real machine: the embedded default starts every time, and a
file tier on a block device (a loop device over a sparse file) swaps, verifies and trims.

Run under the machine's swap lock, like every integration test."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.harness import cli, config_text, discards_arrived, leftovers, start, stop
from tests.integration.test_swap import finish, wait_held, workload
from tierswap import config as C
from tierswap.cgroup import MemoryCgroup
from tierswap.tiers.file import HEADER, read_mark

pytestmark = pytest.mark.integration
MiB = 1 << 20


def embedded_default_in(base: Path) -> Path:
    """The embedded default, verbatim, with a drop-in that points its directories and its
    tier file into `base` (so the test touches nothing of the machine's own tierswap)."""
    cfg = base / "tierswap.toml"
    cfg.write_text(C.default_config_text())
    d = base / "tierswap.toml.d"
    d.mkdir(mode=0o755)
    (d / "50-test.toml").write_text(
        f'[daemon]\nstate_dir = "{base}/state"\nrun_dir = "{base}/run"\n\n'
        f'[[tier]]\nname = "disk"\npath = "{base}/state/disk.tier"\n')
    return cfg


def status(cfg: Path) -> dict:
    return json.loads(cli("status", "--json", config=cfg).stdout)


def wait_status(cfg: Path, predicate, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while not predicate(st := status(cfg)):
        assert time.monotonic() < deadline, f"status condition not reached: {st}"
        time.sleep(0.2)
    return st


def up(cfg: Path) -> list[str]:
    p = cli("up", config=cfg, check=False)
    assert p.returncode == 0, f"up failed: {p.stderr.strip()}"
    return p.stdout.split()


def test_embedded_default_up_down_up_down(base):
    """Before the fix the second up failed: "tier disk: ... disk.tier is smaller than
    configured" ("auto" was recomputed from free room that the tier file itself took)."""
    cfg = embedded_default_in(base)
    tier_file = base / "state" / "disk.tier"
    out = cli("check-config", config=cfg).stdout.splitlines()
    assert out[-1] == f"read: {cfg}, {base}/tierswap.toml.d/50-test.toml"
    planned = next(ln for ln in out if ln.startswith("tier disk: "))
    assert "auto: min(RAM / 2, 8G, a quarter of the free room)" in planned
    assert not tier_file.exists()
    try:
        sizes = []
        for _start in range(2):
            devices = up(cfg)
            swaps = Path("/proc/swaps").read_text()
            assert devices and all(d in swaps for d in devices)
            mark = read_mark(tier_file)
            assert mark is not None
            sizes.append((mark.capacity, tier_file.stat().st_size))
            assert cli("down", config=cfg).returncode == 0
            assert not leftovers(base / "run")
        assert sizes[0] == sizes[1], sizes
        capacity = sizes[0][0]
        assert capacity <= 8 << 30 and sizes[0][1] == HEADER + capacity
        log = (base / "run" / "tierswap.log").read_text()
        assert f"tier disk: created {tier_file} and preallocated" in log
        assert f"tier disk: reusing the existing tier file {tier_file}" in log
        after = [ln for ln in cli("check-config", config=cfg).stdout.splitlines()
                 if ln.startswith("tier disk: ")]
        assert after == [f"tier disk: {C.format_size(capacity)}, auto: the size of the "
                         "existing tier file"]
    finally:
        stop(base, cfg)


@pytest.fixture
def loop_device(base):
    backing = base / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(1 << 30)  # sparse: what the tier writes is what it takes
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


def block_config(base: Path, dev: str) -> Path:
    cfg = base / "tierswap.toml"
    cfg.write_text(f"""
[daemon]
state_dir = "{base}/state"
run_dir = "{base}/run"
[device]
size = "2G"
shards = 2
[[tier]]
name = "ram"
kind = "memory"
capacity = "4M"
[[tier]]
name = "disk"
kind = "file"
path = "{dev}"
capacity = "auto"
overwrite = true
""")
    return cfg


def test_block_device_tier_swaps_verifies_and_trims(base, loop_device):
    dev, backing = loop_device
    cfg = block_config(base, dev)
    try:
        up(cfg)
        st = cli("status", "--json", config=cfg)
        assert st.returncode == 0
        mark = read_mark(Path(dev), follow=True)
        assert mark is not None and mark.capacity == 1023 * MiB  # the device less the header
        assert backing.stat().st_size == 1 << 30  # never truncated nor preallocated
        hold = base / "hold"
        with (MemoryCgroup.create(f"tierswap-blk-{os.getpid()}", 96 * MiB) as cg,
              workload(cg, "256M", 41, hold) as proc):
            wait_held(proc, hold)
            st = status(cfg)
            assert st["tiers"][1]["pages"] > 5000, st["tiers"][1]
            os.sync()
            used = backing.stat().st_blocks * 512
            assert used > 16 * MiB  # the pages are on the device, so in its backing file
            hold.unlink()
            finish(proc)  # every page read back from the device verifies
        # the workload is gone: the kernel discards its slots, the tier's segments come free
        # (but for the clusters that slots still in use hold back)
        wait_status(cfg, discards_arrived)
        os.sync()
        before = backing.stat().st_blocks * 512
        assert before > used - 4 * MiB  # freed in the map, still written on the device
        out = cli("compact", "disk", config=cfg).stdout
        os.sync()
        after = backing.stat().st_blocks * 512
        # BLKDISCARD of the free segments: the loop driver punched them out of the file
        assert after < before // 4, (before, after, out)
        assert status(cfg)["io"]["write_errors"] == 0
    finally:
        stop(base, cfg)


def test_block_device_in_use_as_swap_is_refused(base, loop_device):
    dev, _ = loop_device
    cfg = block_config(base, dev)
    subprocess.run(["mkswap", dev], check=True, capture_output=True)
    subprocess.run(["swapon", "--priority", "-2", dev], check=True)
    try:
        p = cli("check-config", config=cfg, check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.strip() == (f"tierswap: config error: {cfg}: tier[1].path: block "
                                    f"device {dev} is not free: it is in use as swap")
        p = cli("up", config=cfg, check=False)
        assert p.returncode != 0 and "in use as swap" in p.stderr and "Traceback" not in p.stderr
        assert not (base / "run" / "tierswap.pid").exists()
    finally:
        subprocess.run(["swapoff", dev], check=False)


def test_swapon_options_discard_once_sends_no_page_discards(base):
    """With "discard=once" the kernel discards the device at swapon only: the slots of a
    workload that exits stay stored (with the default "discard" they are freed, see
    test_swap.test_workload_swaps_through_both_tiers_and_discard_frees_slots)."""
    text = config_text(base, size="1G", ram="16M", disk="1G").replace(
        "priority = 100", 'priority = 100\nswapon_options = "discard=once"')
    inst = start(base, text)
    try:
        hold = base / "hold"
        with (MemoryCgroup.create(f"tierswap-once-{os.getpid()}", 96 * MiB) as cg,
              workload(cg, "256M", 43, hold) as proc):
            wait_held(proc, hold)
            st = inst.status()
            stored, discards = st["pages"]["stored"], st["io"]["discards"]
            assert stored > 2000, st["pages"]
            hold.unlink()
            finish(proc)
        time.sleep(3)  # what a page discard would have done by now (the default: < 1 s)
        st = inst.status()
        assert st["io"]["discards"] == discards, st["io"]
        assert st["pages"]["stored"] >= stored * 0.9, st["pages"]
    finally:
        stop(base, inst.config)
