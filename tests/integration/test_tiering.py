"""Live tiers on a real swap device: drain, migrate, automatic demotion, compaction."""

from __future__ import annotations

import os

import pytest

from tests.integration.harness import cli
from tests.integration.test_swap import finish, wait_held, workload
from tierswap.cgroup import MemoryCgroup

pytestmark = pytest.mark.integration
MiB = 1 << 20


def one_line_error(p) -> str:
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tierswap:") and "Traceback" not in p.stderr
    return lines[0]


def test_drain_then_migrate_back_while_pages_are_held(make_instance, base):
    inst = make_instance(size="2G", ram="256M", disk="2G")
    hold = base / "hold"
    with (MemoryCgroup.create(f"tierswap-drain-{os.getpid()}", 96 * MiB) as cg,
          workload(cg, "384M", 21, hold) as proc):
        wait_held(proc, hold)
        before = inst.status()
        assert before["tiers"][0]["pages"] > 1000
        out = cli("drain", "ram", config=inst.config).stdout
        assert out.startswith("moved ")
        st = inst.status()
        ram, disk = st["tiers"]
        assert ram["pages"] == 0 and ram["draining"]
        assert disk["pages"] >= before["tiers"][0]["pages"] + before["tiers"][1]["pages"] - 64
        # a draining tier takes nothing, and says so in one line
        err = one_line_error(cli("migrate", "--from", "disk", "--to", "ram", "--pages",
                                 "100", config=inst.config, check=False))
        assert "draining" in err
        assert "no tier named" in one_line_error(
            cli("drain", "nosuch", config=inst.config, check=False))
        cli("undrain", "ram", config=inst.config)
        cli("migrate", "--from", "disk", "--to", "ram", "--pages", "2000",
            config=inst.config)
        st = inst.status()
        assert st["tiers"][0]["pages"] > 1000 and not st["tiers"][0]["draining"]
        assert st["tiers"][0]["counters"]["promotions"] > 1000
        hold.unlink()
        finish(proc)  # every page still verifies
    assert inst.status()["io"]["write_errors"] == 0


def test_automatic_demotion_keeps_ram_under_its_watermark(make_instance, base):
    policy = "\n[policy]\nhigh_watermark = 0.5\nlow_watermark = 0.3\nrate = \"1G\"\n"
    inst = make_instance(size="2G", ram="32M", disk="2G", extra=policy)
    hold = base / "hold"
    with (MemoryCgroup.create(f"tierswap-demote-{os.getpid()}", 96 * MiB) as cg,
          workload(cg, "384M", 22, hold) as proc):
        wait_held(proc, hold)
        st = inst.wait_status(
            lambda s: s["tiers"][0]["stored_bytes"] <= 0.5 * s["tiers"][0]["capacity_bytes"],
            timeout=30)
        ram, disk = st["tiers"]
        assert ram["counters"]["demotions"] == 0 and disk["counters"]["demotions"] > 0
        assert disk["pages"] > ram["pages"]
        assert st["io"]["write_errors"] == 0 and st["io"]["enospc"] == 0
        hold.unlink()
        finish(proc)


def test_compact_gives_file_space_back(make_instance, base):
    inst = make_instance(size="2G", ram="4M", disk="1G")
    hold_a, hold_b = base / "a", base / "b"
    with (MemoryCgroup.create(f"tierswap-compact-{os.getpid()}", 160 * MiB) as cg,
          workload(cg, "192M", 31, hold_a) as a, workload(cg, "192M", 32, hold_b) as b):
        wait_held(a, hold_a)
        wait_held(b, hold_b)
        hold_b.unlink()
        finish(b)  # b exits: its slots are discarded, leaving holes among a's pages
        st = inst.wait_status(lambda s: s["tiers"][1]["free_segments"] > 0, timeout=30)
        allocated = st["tiers"][1]["file_allocated_bytes"]
        out = cli("compact", "disk", config=inst.config).stdout
        assert "released" in out
        after = inst.status()["tiers"][1]
        assert after["file_allocated_bytes"] < allocated - 64 * MiB, (allocated, after)
        hold_a.unlink()
        finish(a)  # pages moved by compaction still verify

