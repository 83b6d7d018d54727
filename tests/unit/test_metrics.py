"""tierswap.metrics: the exposition text, the textfile and the HTTP endpoint.

The text is checked by parsing it back with a strict parser written here from the format's
specification (prometheus_client is not a dependency and is not installed); the status record
comes from the real `combine_status` fed with shard reports built from the real statistics
dataclasses, so a field added to a shard report and forgotten here shows up as a failure.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

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


# ---------------------------------------------------------------------------- a strict parser

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_VALUE = re.compile(r"^(NaN|[+-]Inf|[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)$")


def _parse_labels(s: str, pos: int) -> tuple[dict[str, str], int]:
    """Labels from s[pos] == '{' to the matching '}'; returns (labels, index after '}')."""
    assert s[pos] == "{"
    pos += 1
    labels: dict[str, str] = {}
    while s[pos] != "}":
        m = _LABEL.match(s, pos)
        assert m, f"bad label name at {s[pos:]!r}"
        name = m.group()
        pos = m.end()
        assert s[pos : pos + 2] == '="', f"expected =\" after {name}"
        pos += 2
        out = []
        while s[pos] != '"':
            if s[pos] == "\\":
                esc = s[pos + 1]
                assert esc in '\\"n', f"bad escape \\{esc}"
                out.append({"\\": "\\", '"': '"', "n": "\n"}[esc])
                pos += 2
            else:
                assert s[pos] != "\n"
                out.append(s[pos])
                pos += 1
        pos += 1
        assert name not in labels, f"label {name} twice"
        labels[name] = "".join(out)
        if s[pos] == ",":
            pos += 1
    return labels, pos + 1


def _unescape_help(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\":
            assert s[i + 1] in "\\n", f"bad escape in HELP: {s!r}"
            out.append("\\" if s[i + 1] == "\\" else "\n")
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def parse_exposition(text: str) -> dict[str, dict[str, Any]]:
    """{family: {"help", "type", "samples": {frozenset(labels): value}}}; asserts on anything
    the text format does not allow or we do not expect (untyped families, interleaving)."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    fams: dict[str, dict[str, Any]] = {}
    current: str | None = None
    for line in text[:-1].split("\n"):
        assert line, "no empty lines expected"
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert _NAME.fullmatch(name) and name not in fams, f"bad or repeated family {name}"
            fams[name] = {"help": _unescape_help(help_text), "type": None, "samples": {}}
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current and fams[name]["type"] is None and not fams[name]["samples"]
            assert kind in ("gauge", "counter"), kind
            fams[name]["type"] = kind
        else:
            assert not line.startswith("#"), f"unexpected comment {line!r}"
            m = _NAME.match(line)
            assert m and m.group() == current, f"sample outside its family: {line!r}"
            assert fams[current]["type"] is not None, "sample before TYPE"
            pos = m.end()
            labels: dict[str, str] = {}
            if line[pos] == "{":
                labels, pos = _parse_labels(line, pos)
            assert line[pos] == " ", f"expected one space before the value: {line!r}"
            value = line[pos + 1 :]
            assert _VALUE.match(value), f"bad value {value!r}"
            key = frozenset(labels.items())
            assert key not in fams[current]["samples"], f"duplicate sample {line!r}"
            fams[current]["samples"][key] = float(value)
    for name, fam in fams.items():
        assert fam["samples"], f"{name} has no samples"
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
    assert set(fams) == {"tierswap_active"}
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
    assert _VALUE.match(text)


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


# ---------------------------------------------------------------------------- HTTP


class FakeSupervisor:
    def __init__(self, status: dict[str, Any] | None = None, listen: str = "127.0.0.1:0"):
        self.config = SimpleNamespace(metrics=SimpleNamespace(listen=listen))
        self.status = status
        self.error: Exception | None = None
        self.requests: list[dict[str, Any]] = []

    async def handle(self, req: dict[str, Any]) -> Any:
        self.requests.append(req)
        if self.error is not None:
            raise self.error
        return self.status


async def http(addr, request: bytes, *, close_write: bool = False) -> tuple[int, dict, bytes]:
    stream = await trio.open_tcp_stream(addr[0], addr[1])
    async with stream:
        await stream.send_all(request)
        if close_write:
            await stream.send_eof()
        data = bytearray()
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    proto, code, _reason = lines[0].split(" ", 2)
    assert proto == "HTTP/1.0"
    headers = {k.lower(): v for k, _, v in (ln.partition(": ") for ln in lines[1:])}
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    return int(code), headers, body


@pytest.fixture
async def served(nursery, status):
    sup = FakeSupervisor(status)
    addrs = await nursery.start(metrics.serve_metrics, sup)
    assert addrs and addrs[0][0] == "127.0.0.1" and addrs[0][1] > 0
    return sup, addrs[0]


async def test_get_metrics(served, status):
    sup, addr = served
    code, headers, body = await http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert code == 200
    assert headers["content-type"] == metrics.CONTENT_TYPE
    assert body.decode() == metrics.render(status)
    assert sup.requests == [{"cmd": "status"}]
    code, _, body = await http(addr, b"GET /metrics?name[]=x HTTP/1.0\n\n")  # bare LF, a query
    assert code == 200 and body.decode() == metrics.render(status)
    parse_exposition(body.decode())


@pytest.mark.parametrize(("request_bytes", "code"), [
    (b"GET / HTTP/1.1\r\n\r\n", 404),
    (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    (b"HEAD /metrics HTTP/1.1\r\n\r\n", 405),
    (b"GET /metrics\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS hello, by mistake
])
async def test_bad_requests(served, request_bytes, code):
    sup, addr = served
    got, headers, _ = await http(addr, request_bytes)
    assert got == code
    if code == 405:
        assert headers["allow"] == "GET"
    assert sup.requests == []  # nothing reached the supervisor


async def test_oversized_request(served):
    sup, addr = served
    huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * (metrics.MAX_REQUEST + 10) + b"\r\n\r\n"
    code, _, _ = await http(addr, huge)
    assert code == 431
    assert sup.requests == []


async def test_request_cut_short_by_the_client(served, status):
    _, addr = served
    code, _, body = await http(addr, b"GET /metrics HTTP/1.0\r\n", close_write=True)
    assert code == 200 and body.decode() == metrics.render(status)


async def test_slow_client_times_out(nursery, status, monkeypatch):
    monkeypatch.setattr(metrics, "READ_TIMEOUT", 0.2)
    addrs = await nursery.start(metrics.serve_metrics, FakeSupervisor(status))
    code, _, _ = await http(addrs[0], b"GET /metr")
    assert code == 408


async def test_unanswering_shard_is_503_and_other_errors_500(served, caplog):
    sup, addr = served
    sup.error = ControlError("shard0/control.sock: no reply within 30s")
    code, _, body = await http(addr, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert code == 503 and b"no reply within 30s" in body
    # what the real supervisor raises: its fan-out nursery wraps the shard's error
    sup.error = ExceptionGroup("from a nursery", [ControlError("shard1: connection refused")])
    code, _, body = await http(addr, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert code == 503 and b"shard1: connection refused" in body
    sup.error = RuntimeError("boom")
    code, _, body = await http(addr, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert code == 500 and b"boom" not in body
    assert any(r.levelno == logging.ERROR and "metrics" in r.getMessage() for r in caplog.records)
    sup.error = None  # and the server still serves
    code, _, _ = await http(addr, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert code == 200


async def test_connections_are_bounded(nursery, status, monkeypatch):
    monkeypatch.setattr(metrics, "MAX_CONNECTIONS", 1)
    addrs = await nursery.start(metrics.serve_metrics, FakeSupervisor(status))
    idle = await trio.open_tcp_stream(*addrs[0][:2])  # takes the only slot, says nothing
    await trio.sleep(0.05)
    result: list[int] = []

    async def scrape() -> None:
        result.append((await http(addrs[0], b"GET /metrics HTTP/1.1\r\n\r\n"))[0])

    async with trio.open_nursery() as n:
        n.start_soon(scrape)
        await trio.sleep(0.3)
        assert result == []  # queued behind the idle connection
        await idle.aclose()
    assert result == [200]


async def test_bind_failure_is_logged_and_returns(status, caplog):
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        sup = FakeSupervisor(status, f"127.0.0.1:{port}")
        async with trio.open_nursery() as n:
            addrs = await n.start(metrics.serve_metrics, sup)
    assert addrs == []
    assert any("cannot listen" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("listen", "expected"), [
    ("127.0.0.1:9110", ("127.0.0.1", 9110)), ("[::1]:9110", ("::1", 9110)),
    ("::1:9110", ("::1", 9110)), ("localhost:1", ("localhost", 1)),
])
def test_parse_listen(listen, expected):
    assert metrics.parse_listen(listen) == expected


def test_every_metric_is_documented(status):
    """docs/operations.md lists the metrics; a new one must be added there too."""
    doc = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    missing = [n for n in parse_exposition(metrics.render(status)) if f"`{n}" not in doc]
    assert not missing, f"not in docs/operations.md: {missing}"


# control.serve_control does not close its listening socket when it is cancelled, which the
# garbage collector reports as an unclosed socket at the end of this test (not ours to fix here).
@pytest.mark.filterwarnings(r"ignore:Exception ignored in. <socket.socket fd=\d+, family=1,:"
                            "pytest.PytestUnraisableExceptionWarning")
async def test_served_from_the_real_supervisor_fanout(nursery, tmp_path, monkeypatch):
    """The real Supervisor.handle over real shard control sockets, one shard then failing."""
    from tierswap.config import MetricsConfig
    from tierswap.control import serve_control
    from tierswap.layout import Layout
    from tierswap.supervisor import Supervisor

    monkeypatch.setattr(system, "active_swaps", lambda: {})
    cfg = parse_config(CONFIG.replace('"/run/tierswap-test"', f'"{tmp_path}/run"'),
                       check_fs=False)
    cfg = dataclasses.replace(cfg, metrics=MetricsConfig(listen="127.0.0.1:0"))
    broken = {"shard": None}

    def shard_handler(k: int):
        async def handle(req: dict[str, Any], progress=None) -> Any:
            if req["cmd"] == "stats":
                if broken["shard"] == k:
                    raise ControlError("stats failed")
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
    addrs = await nursery.start(metrics.serve_metrics, sup)
    code, _, body = await http(addrs[0], b"GET /metrics HTTP/1.1\r\n\r\n")
    assert code == 200
    fams = parse_exposition(body.decode())
    assert value(fams, "tierswap_shards") == 2 and value(fams, "tierswap_active") == 1
    assert value(fams, "tierswap_reads_total") == 2001
    assert value(fams, "tierswap_status_partial") == 0
    # one shard fails its report: the scrape still answers, with that shard's part missing
    broken["shard"] = 1
    code, _, body = await http(addrs[0], b"GET /metrics HTTP/1.1\r\n\r\n")
    assert code == 200
    fams = parse_exposition(body.decode())
    assert value(fams, "tierswap_status_partial") == 1
    assert value(fams, "tierswap_shard_reporting", shard="0") == 1
    assert value(fams, "tierswap_shard_reporting", shard="1") == 0
    assert value(fams, "tierswap_reads_total") == 1000  # shard 0's alone
