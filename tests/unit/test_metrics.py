"""tierswap.metrics: the exposition text and the textfile.

The text is checked by parsing it back with prometheus_client's reference parser (a test
extra, never a dependency of the daemon); the status record comes from the real
`combine_status` fed with shard reports built from the real statistics dataclasses, so a field
added to a shard report and forgotten here shows up as a failure.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tierswap import metrics, system
from tierswap.commands import ShardReply
from tierswap.config import PAGE_SIZE, parse_config
from tierswap.control import ControlError
from tierswap.kit import Kit
from tierswap.lane import LaneStatistics
from tierswap.shard import Shard
from tierswap.status import combine_status
from tierswap.tiers.base import TierStatistics

MiB = 1 << 20

CONFIG = """
[daemon]
state_dir = "/var/lib/tierswap-test"
run_dir = "/run/tierswap-test"
[device]
size = "1G"
shards = 2
[[tier]]
name = "ram"
kind = "memory"
capacity = "256M"
[[tier]]
name = "disk"
kind = "file"
path = "/var/lib/tierswap-test/disk.tier"
capacity = "1G"
compression = "zstd:3"
encrypt = true
[[tier]]
name = "net"
kind = "remote"
capacity = "2G"
targets = ["nbd://192.0.2.1/x", "nbd://192.0.2.2/x"]
replicas = 2
"""


# ---------------------------------------------------------------------------- fixtures


def _tier(name: str, kind: str, k: int, extra: dict[str, object]) -> TierStatistics:
    return TierStatistics(
        name=name, kind=kind, compression="zstd:1", pages=1000 * (k + 1), zero_pages=10,
        stored_bytes=MiB * (k + 1), capacity_bytes=128 * MiB, available_bytes=64 * MiB,
        free_bytes=60 * MiB, segments=64, free_segments=60, largest_free_extent=(k + 2) * MiB,
        free_extents=2, draining=k == 1, failed=False, pages_in=100 + k, pages_out=50 + k,
        promotions=3, demotions=4 + k, bytes_moved=8192 * (k + 1), read_errors=k,
        write_errors=2 * k, extra=extra,
    )


class _Service:
    """Stands in for a shard's LaneService: only its statistics are asked for."""

    def __init__(self, stats: LaneStatistics) -> None:
        self._stats = stats

    def statistics(self) -> LaneStatistics:
        return self._stats


def shard_report(k: int) -> dict[str, Any]:
    """What a shard answers to "stats": the real `Shard.stats()` of shard.py over the real
    statistics dataclasses (only the hardening and task records are replaced)."""
    tiers = (
        _tier("ram", "memory", k, {"arena_bytes": 64 * MiB, "grow_failures": k}),
        _tier("disk", "file", k, {"path": "/var/lib/tierswap-test/disk.tier",
                                  "file_allocated_bytes": 512 * MiB, "auth_failures": k}),
        _tier("net", "remote", k, {
            "targets": [{"url": "nbd://192.0.2.1/x", "up": True, "errors": 0, "reconnects": 0,
                         "resync_pending": 0, "rebuild_backlog": 1, "fragments": 8,
                         "bytes": 8 * MiB}],
            "replicas": 2, "auth_failures": 0, "stale_reads": k, "degraded_writes": 5 * k,
            "degraded_segments": k, "resynced_segments": 7, "rereplicated_segments": 1}),
    )
    lane = LaneStatistics(
        size_bytes=512 * MiB, stored_pages=sum(t.pages for t in tiers), zero_pages=30 + k,
        stored_bytes=sum(t.stored_bytes for t in tiers),
        orig_bytes=sum(t.pages for t in tiers) * PAGE_SIZE, runs=40 + k,
        metadata_bytes=4096 * (10 + k), map_high_water=4096 * (20 + k), reads=1000 + k,
        writes=2000 + k, discards=300 + k, read_errors=k, write_errors=2 * k, enospc=k,
        native=900, forwarded=100 + k, rmw=5, rmw_conflicts=k, corrupt=0, threads_running=4,
        tiers=tiers,
    )
    config = parse_config(CONFIG, check_fs=False)
    shard = Shard(config, k, Kit())
    shard.service = _Service(lane)  # type: ignore[assignment]
    d = shard.stats()
    d["hardening"] = {"VmLck": 100 * MiB, "VmRSS": 101 * MiB, "oom_score_adj": -1000}
    d["tasks"] = {"policy": {"failures": k, "last_error": None, "running": True}}
    return d


@pytest.fixture
def status(monkeypatch) -> dict[str, Any]:
    config = parse_config(CONFIG, check_fs=False)
    loops = ["/dev/loop7", "/dev/loop8"]
    monkeypatch.setattr(system, "active_swaps", lambda: {
        "/dev/loop7": {"size": 512 * MiB, "used": 3 * MiB, "priority": 100},
        "/dev/loop8": {"size": 512 * MiB, "used": 5 * MiB, "priority": 100},
        "/dev/sda2": {"size": 1 << 30, "used": 77 * MiB, "priority": -2},
    })
    shards = [{"index": k, "pid": 100 + k, "device": d, "state": "serving", "restarts": 0}
              for k, d in enumerate(loops)]
    replies = [ShardReply(0, shard_report(0)), ShardReply(1, shard_report(1))]
    return combine_status(config, shards, replies, active=True)


# ---------------------------------------------------------------------------- parsing


def parse_exposition(text: str) -> dict[str, dict[str, Any]]:
    """{sample name: {"help", "type", "samples": {frozenset(labels): value}}}, parsed with
    prometheus_client's reference parser; asserts on what it accepts but we never mean to
    write (untyped or split families, duplicate samples, no final newline)."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    fams: dict[str, dict[str, Any]] = {}
    families = list(text_string_to_metric_families(text))
    # one family per HELP line: a family split in two (interleaved) would parse as two
    assert len(families) == text.count("# HELP ") == text.count("# TYPE ")
    for fam in families:
        assert fam.type in ("gauge", "counter"), f"{fam.name}: {fam.type}"
        assert fam.samples, f"{fam.name} has no samples"
        for smp in fam.samples:
            f = fams.setdefault(smp.name, {"help": fam.documentation, "type": fam.type,
                                           "samples": {}})
            key = frozenset(smp.labels.items())
            assert key not in f["samples"], f"duplicate sample {smp}"
            f["samples"][key] = smp.value
    return fams


def value(fams, name: str, **labels: str) -> float:
    return fams[name]["samples"][frozenset(labels.items())]


# ---------------------------------------------------------------------------- render


def test_render_parses_and_follows_the_naming_rules(status):
    fams = parse_exposition(metrics.render(status))
    for name, fam in fams.items():
        assert name.startswith("tierswap_")
        assert fam["help"].endswith(".")
        if fam["type"] == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
        # base units only: no kilobytes, milliseconds, percentages
        assert not re.search(r"_(kb|kib|mb|mib|ms|percent)(_|$)", name), name


def test_render_device_values(status):
    fams = parse_exposition(metrics.render(status))
    assert value(fams, "tierswap_active") == 1
    assert value(fams, "tierswap_size_bytes") == 1 << 30
    assert value(fams, "tierswap_shards") == 2
    assert value(fams, "tierswap_swap_used_bytes") == 8 * MiB  # only our devices count
    assert value(fams, "tierswap_device_info", device="/dev/loop7", shard="0") == 1
    assert value(fams, "tierswap_device_info", device="/dev/loop8", shard="1") == 1
    stored = sum(1000 * (k + 1) * 3 for k in range(2))  # 3 tiers, 2 shards
    assert value(fams, "tierswap_stored_pages") == stored == status["pages"]["stored"]
    assert value(fams, "tierswap_zero_pages") == 30 + 31
    assert value(fams, "tierswap_stored_bytes") == status["stored_bytes"] == 9 * MiB
    assert value(fams, "tierswap_compression_ratio") == pytest.approx(
        stored * PAGE_SIZE / (9 * MiB))
    assert value(fams, "tierswap_metadata_bytes") == 4096 * 21
    assert value(fams, "tierswap_map_runs") == 81
    assert value(fams, "tierswap_reads_total") == 2001
    assert value(fams, "tierswap_writes_total") == 4001
    assert value(fams, "tierswap_discards_total") == 601
    assert value(fams, "tierswap_read_errors_total") == 1
    assert value(fams, "tierswap_write_errors_total") == 2
    assert value(fams, "tierswap_enospc_total") == 1
    assert value(fams, "tierswap_shard_locked_bytes", shard="1") == 100 * MiB
    assert value(fams, "tierswap_shard_resident_bytes", shard="0") == 101 * MiB
    assert value(fams, "tierswap_shard_oom_score_adj", shard="0") == -1000
    assert value(fams, "tierswap_status_partial") == 0
    assert value(fams, "tierswap_task_failures_total", process="shard1", task="policy") == 1
    for k in ("0", "1"):
        assert value(fams, "tierswap_shard_state", shard=k, state="serving") == 1
        assert value(fams, "tierswap_shard_state", shard=k, state="failed") == 0
        assert value(fams, "tierswap_shard_reporting", shard=k) == 1
        assert value(fams, "tierswap_shard_restarts_total", shard=k) == 0


def test_render_tier_values(status):
    fams = parse_exposition(metrics.render(status))
    ram = {"tier": "ram", "kind": "memory"}
    disk = {"tier": "disk", "kind": "file"}
    net = {"tier": "net", "kind": "remote"}
    for lab in (ram, disk, net):
        assert value(fams, "tierswap_tier_pages", **lab) == 3000
        assert value(fams, "tierswap_tier_zero_pages", **lab) == 20
        assert value(fams, "tierswap_tier_stored_bytes", **lab) == 3 * MiB
        assert value(fams, "tierswap_tier_capacity_bytes", **lab) == 256 * MiB
        assert value(fams, "tierswap_tier_available_bytes", **lab) == 128 * MiB
        assert value(fams, "tierswap_tier_free_bytes", **lab) == 120 * MiB
        assert value(fams, "tierswap_tier_segments", **lab) == 128
        assert value(fams, "tierswap_tier_free_segments", **lab) == 120
        assert value(fams, "tierswap_tier_free_extents", **lab) == 4
        assert value(fams, "tierswap_tier_largest_free_extent_bytes", **lab) == 3 * MiB
        assert value(fams, "tierswap_tier_compression_ratio", **lab) == pytest.approx(
            3000 * PAGE_SIZE / (3 * MiB))
        assert value(fams, "tierswap_tier_draining", **lab) == 1  # shard 1 drains
        assert value(fams, "tierswap_tier_pages_in_total", **lab) == 201
        assert value(fams, "tierswap_tier_pages_out_total", **lab) == 101
        assert value(fams, "tierswap_tier_promoted_pages_total", **lab) == 6
        assert value(fams, "tierswap_tier_demoted_pages_total", **lab) == 9
        assert value(fams, "tierswap_tier_moved_bytes_total", **lab) == 8192 * 3
        assert value(fams, "tierswap_tier_errors_total", **lab) == 3  # reads and writes
    assert value(fams, "tierswap_tier_arena_bytes", **ram) == 128 * MiB
    assert value(fams, "tierswap_tier_grow_failures_total", **ram) == 1
    # shards share one tier file: its allocation is not summed
    assert value(fams, "tierswap_tier_file_allocated_bytes", **disk) == 512 * MiB
    # a metric only one kind of tier has is not invented for the other
    assert frozenset(disk.items()) not in fams["tierswap_tier_arena_bytes"]["samples"]
    assert frozenset(ram.items()) not in fams["tierswap_tier_file_allocated_bytes"]["samples"]
    assert value(fams, "tierswap_tier_auth_failures_total", **disk) == 1
    assert value(fams, "tierswap_tier_auth_failures_total", **net) == 0
    assert value(fams, "tierswap_tier_stale_reads_total", **net) == 1
    assert value(fams, "tierswap_tier_degraded_writes_total", **net) == 5
    assert value(fams, "tierswap_tier_degraded_segments", **net) == 1
    assert value(fams, "tierswap_tier_resynced_segments_total", **net) == 14
    assert value(fams, "tierswap_tier_rereplicated_segments_total", **net) == 2
    # configuration is not a metric; per-target numbers are labelled by target
    assert not any("replicas" in name for name in fams)
    assert not any("target" in name for name in fams if name.startswith("tierswap_tier_"))
    tgt = {**net, "target": "nbd://192.0.2.1/x"}
    assert value(fams, "tierswap_remote_target_up", **tgt) == 1
    assert value(fams, "tierswap_remote_target_bytes", **tgt) == 2 * 8 * MiB
    assert value(fams, "tierswap_remote_target_rebuild_backlog", **tgt) == 2


def test_build_info_names_tierswap_and_its_pyfuse3(status):
    import importlib.metadata

    import pyfuse3

    fams = parse_exposition(metrics.render(status))
    (labels,) = fams["tierswap_build_info"]["samples"]
    info = dict(labels)
    assert fams["tierswap_build_info"]["samples"][labels] == 1
    assert info["version"] == importlib.metadata.version("tierswap")
    assert info["pyfuse3_version"] == importlib.metadata.version("pyfuse3")
    # the build says whether the fallocate handler is there (freed slots reach tierswap)
    assert info["pyfuse3_build"] == (
        "patched" if hasattr(pyfuse3.Operations, "fallocate") else "unpatched")


def test_lane_counters_are_summed_over_shards(status):
    fams = parse_exposition(metrics.render(status))
    assert value(fams, "tierswap_lane_native_requests_total") == 1800
    assert value(fams, "tierswap_lane_forwarded_requests_total") == 201
    assert value(fams, "tierswap_lane_partial_writes_total") == 10
    assert value(fams, "tierswap_lane_partial_write_conflicts_total") == 1
    assert value(fams, "tierswap_corrupt_reads_total") == 0
    assert value(fams, "tierswap_lane_threads") == 8
    assert fams["tierswap_corrupt_reads_total"]["type"] == "counter"


def test_every_lane_counter_is_exported():
    """A counter added to LaneStatistics (beyond those summed elsewhere) must get a metric."""
    from tierswap.status import _LANE_KEYS

    accounted = {"size_bytes", "stored_pages", "zero_pages", "stored_bytes", "orig_bytes",
                 "runs", "metadata_bytes", "map_high_water", "reads", "writes", "discards",
                 "read_errors", "write_errors", "enospc", "tiers"}
    fields = {f.name for f in dataclasses.fields(LaneStatistics)}
    assert fields - accounted == set(_LANE_KEYS) == {k for k, *_ in metrics._LANE_SERIES}


def test_every_counter_in_the_status_record_is_exported(status):
    """A counter added to a shard's tier counters or to the io record must get a metric."""
    tier_keys = {k for k, _, _ in metrics._TIER_COUNTERS}
    assert tier_keys == set(shard_report(0)["tiers"][0]["counters"])
    assert all(set(t["counters"]) == tier_keys for t in status["tiers"])
    assert {k for k, _, _ in metrics._IO_COUNTERS} == set(status["io"])


def test_label_values_and_help_are_escaped():
    weird = 'a"b\\c\nd'
    st = {"active": False, "shards": [{"index": 0, "device": weird}],
          "tiers": [{"name": weird, "kind": "memory", "pages": 1, "counters": {"errors": 2}}]}
    text = metrics.render(st)
    assert '\\"' in text and "\\\\" in text and "\\n" in text
    fams = parse_exposition(text)
    assert value(fams, "tierswap_device_info", device=weird, shard="0") == 1
    assert value(fams, "tierswap_tier_pages", tier=weird, kind="memory") == 1
    assert value(fams, "tierswap_tier_errors_total", tier=weird, kind="memory") == 2
    assert value(fams, "tierswap_active") == 0
    assert metrics._escape_help("x\\y\nz") == "x\\\\y\\nz"


def test_render_is_robust_to_missing_and_odd_fields():
    """Older or newer shards may lack a key or carry a non-number: skip, never raise."""
    fams = parse_exposition(metrics.render({}))
    assert set(fams) == {"tierswap_build_info", "tierswap_active"}
    st = {"active": True, "pages": {"stored": "many"}, "io": {"reads": 5},
          "tiers": [{"name": "x", "kind": "remote", "counters": {}, "path": "/srv/x"}],
          "shards": [{"index": 0, "hardening": {"oom_score_adj": 0}}, "junk"]}
    fams = parse_exposition(metrics.render(st))
    assert "tierswap_stored_pages" not in fams
    assert value(fams, "tierswap_reads_total") == 5
    assert value(fams, "tierswap_shard_oom_score_adj", shard="0") == 0


@pytest.mark.parametrize(("v", "text"), [
    (True, "1"), (False, "0"), (0, "0"), (-1000, "-1000"), (2**62, str(2**62)), (1.5, "1.5"),
    (float("nan"), "NaN"), (float("inf"), "+Inf"), (float("-inf"), "-Inf"), (1e-9, "1e-09"),
])
def test_format_value(v, text):
    assert metrics.format_value(v) == text
    (fam,) = text_string_to_metric_families(f"# TYPE x gauge\nx {text}\n")
    got = fam.samples[0].value
    assert got == v or (v != v and got != got)  # NaN is not equal to itself


# ---------------------------------------------------------------------------- textfile


def test_write_textfile_is_atomic_and_world_readable(status, tmp_path):
    path = tmp_path / "tierswap.prom"
    path.write_text("old complete content\n")
    reader = path.open()  # a collector in the middle of reading the previous file
    old = os.umask(0o077)  # as under the unit's UMask=0077
    try:
        assert metrics.write_textfile(path, status) is True
    finally:
        os.umask(old)
    with reader:
        assert reader.read() == "old complete content\n"  # replaced, not rewritten in place
    assert path.read_text() == metrics.render(status)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tierswap.prom"]  # no temp left
    parse_exposition(path.read_text())
    assert metrics.write_textfile(str(path), status) is True  # and again, over its own file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tierswap.prom"]


def test_write_textfile_failure_is_logged_once_and_never_raised(status, tmp_path, caplog):
    caplog.set_level(logging.INFO, "tierswap.metrics")
    path = tmp_path / "missing-dir" / "tierswap.prom"
    assert metrics.write_textfile(path, status) is False
    assert metrics.write_textfile(path, status) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "missing-dir" in warnings[0].getMessage()
    path.parent.mkdir()
    assert metrics.write_textfile(path, status) is True
    assert any("written again" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in path.parent.iterdir()) == ["tierswap.prom"]


def test_write_textfile_does_not_follow_a_planted_temp_symlink(status, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "tierswap.prom"
    (tmp_path / f".tierswap.prom.{os.getpid()}.tmp").symlink_to(victim)
    assert metrics.write_textfile(path, status) is False
    assert victim.read_text() == "precious\n"


def test_every_metric_is_documented(status):
    """docs/operations.md lists the metrics; a new one must be added there too."""
    doc = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    missing = [n for n in parse_exposition(metrics.render(status)) if f"`{n}" not in doc]
    assert not missing, f"not in docs/operations.md: {missing}"


async def test_from_the_real_supervisor_fanout(nursery, tmp_path, monkeypatch):
    """The real Supervisor.handle over real shard control sockets: one shard failing, then
    one that does not answer at all (status must still come back, that shard unresponsive)."""
    from tierswap.control import serve_control
    from tierswap.layout import Layout
    from tierswap.status import device_table
    from tierswap.supervisor import Supervisor

    monkeypatch.setattr(system, "active_swaps", lambda: {
        "/dev/loop8": {"type": "partition", "size": 512 * MiB, "used": 5 * MiB,
                       "priority": 100}})
    cfg = parse_config(CONFIG.replace('"/run/tierswap-test"', f'"{tmp_path}/run"'),
                       check_fs=False)
    broken: dict[str, int | None] = {"shard": None, "silent": None}

    def shard_handler(k: int):
        async def handle(req: dict[str, Any], progress=None) -> Any:
            if req["cmd"] == "stats":
                if broken["shard"] == k:
                    raise ControlError("stats failed")
                if broken["silent"] == k:
                    await trio.sleep_forever()
                return shard_report(k)
            raise ControlError(f"unexpected {req}")
        return handle

    for k in range(cfg.shards):
        Layout.of(cfg).shard(k).run_dir.mkdir(parents=True)
        await nursery.start(serve_control, Layout.of(cfg).shard(k).control_socket,
                            shard_handler(k))
    sup = Supervisor(cfg, None)
    for slot, dev in zip(sup.slots, ["/dev/loop7", "/dev/loop8"], strict=True):
        slot.state, slot.device = "serving", dev  # no processes: the fan-out asks the sockets
    sup.active = True

    async def scrape() -> dict[str, dict[str, Any]]:
        return parse_exposition(metrics.render(await sup.handle({"cmd": "status"})))

    fams = await scrape()
    assert value(fams, "tierswap_shards") == 2 and value(fams, "tierswap_active") == 1
    assert value(fams, "tierswap_reads_total") == 2001
    assert value(fams, "tierswap_status_partial") == 0
    # one shard fails its report: the status still answers, with that shard's part missing
    broken["shard"] = 1
    fams = await scrape()
    assert value(fams, "tierswap_status_partial") == 1
    assert value(fams, "tierswap_shard_reporting", shard="0") == 1
    assert value(fams, "tierswap_shard_reporting", shard="1") == 0
    assert value(fams, "tierswap_reads_total") == 1000  # shard 0's alone
    # one shard never answers: status comes back (the guard is far above the 2 s contract)
    broken["shard"], broken["silent"] = None, 1
    with trio.fail_after(30):
        st = await sup.handle({"cmd": "status"})
    assert st["partial"] is True
    lines = device_table(st, ["NAME", "STATE", "USED", "PRIO", "PAGES"])
    assert lines[1].split() == ["/dev/loop7", "serving", "-", "-", "3000"]
    # the silent one: unresponsive, with what /proc/swaps says of its device
    assert lines[2].split() == ["/dev/loop8", "unresponsive", "5M", "100", "-"]
