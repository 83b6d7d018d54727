"""Adding shard reports up (counters sum, per-target health merges, descriptions stay), and
the tables and flags of `tierswap status` over status records with known numbers."""

import pytest

from tierswap.status import (
    DEVICE_COLUMNS,
    Style,
    combine_extra,
    device_table,
    overlay_swaps,
    parse_columns,
    render,
)


def test_remote_targets_merge_across_shards() -> None:
    a = {"replicas": 2, "auth_failures": 1, "targets": [
        {"url": "nbd://h1/x", "up": True, "errors": 1, "reconnects": 0, "resync_pending": 0},
        {"url": "nbd://h2/x", "up": False, "errors": 3, "reconnects": 2, "resync_pending": 5}]}
    b = {"replicas": 2, "auth_failures": 2, "targets": [
        {"url": "nbd://h1/x", "up": True, "errors": 0, "reconnects": 1, "resync_pending": 0},
        {"url": "nbd://h2/x", "up": True, "errors": 1, "reconnects": 0, "resync_pending": 1}]}
    out = combine_extra([a, b])
    assert out["replicas"] == 2  # a property of the tier, not a count
    assert out["auth_failures"] == 3
    by_url = {t["url"]: t for t in out["targets"]}
    assert by_url["nbd://h1/x"] == {"url": "nbd://h1/x", "up": True, "errors": 1,
                                    "reconnects": 1, "resync_pending": 0}
    # down in one shard is down: that shard's pages on it are not reachable
    assert by_url["nbd://h2/x"]["up"] is False
    assert by_url["nbd://h2/x"]["resync_pending"] == 6


def test_file_tier_allocation_is_not_multiplied_by_shards() -> None:
    out = combine_extra([{"file_allocated_bytes": 100, "path": "/x"},
                         {"file_allocated_bytes": 100, "path": "/x"}])
    assert out == {"file_allocated_bytes": 100, "path": "/x"}


def test_erasure_target_numbers_add_up_and_the_code_stays() -> None:
    part = {"erasure": "4+2", "rebuilt_fragments": 1, "targets": [
        {"url": "nbd://h1/x", "up": True, "errors": 0, "reconnects": 0, "fragments": 10,
         "bytes": 4096, "rebuild_backlog": 2, "slots": 20, "free_slots": 10}]}
    out = combine_extra([part, part])
    assert out["erasure"] == "4+2" and out["rebuilt_fragments"] == 2
    (t,) = out["targets"]
    assert (t["fragments"], t["bytes"], t["rebuild_backlog"], t["slots"], t["free_slots"]) == \
        (20, 8192, 4, 40, 20)


def test_table_lists_remote_targets_with_their_balance() -> None:
    from tierswap.status import render_table

    tier = {"name": "net", "kind": "remote", "pages": 10, "stored_bytes": 4096,
            "capacity_bytes": 1 << 30, "compression_ratio": 2.0, "draining": False,
            "counters": {"pages_in": 10, "pages_out": 0},
            "targets": [{"url": "nbd://m1/swap", "up": True, "errors": 0, "fragments": 12,
                         "bytes": 3 << 20, "free_slots": 500, "rebuild_backlog": 0},
                        {"url": "nbd://m2/swap", "up": False, "errors": 2, "fragments": 12,
                         "bytes": 3 << 20, "free_slots": 500, "rebuild_backlog": 12}]}
    st = {"size_bytes": 1 << 30, "shards": [], "devices": ["/dev/loop0"], "priority": 100,
          "pages": {"stored": 10, "zero": 0}, "compression_ratio": 2.0, "metadata_bytes": 0,
          "tiers": [tier], "io": {"reads": 0, "writes": 0, "discards": 0, "read_errors": 0,
                                  "write_errors": 0, "enospc": 0}}
    text = render_table(st)
    m1 = next(line for line in text.splitlines() if line.startswith("nbd://m1/swap"))
    m2 = next(line for line in text.splitlines() if line.startswith("nbd://m2/swap"))
    assert m1.split() == ["nbd://m1/swap", "yes", "12", "3M", "500", "0", "0"]
    assert m2.split() == ["nbd://m2/swap", "no", "12", "3M", "500", "12", "2"]


# ---------------------------------------------------------------------------- tables and flags
# The record below is what combine_status builds from two shards with different numbers, one
# of which did not answer; the tables must show each shard's own values on its own row.

MiB = 1 << 20


def _row(k: int, dev: str, *, pages: int, answered: bool = True) -> dict:
    row = {"index": k, "pid": 100 + k, "device": dev, "state": "serving", "restarts": k,
           "reason": None, "reporting": answered, "in_swap": True, "tasks": {},
           "error": None if answered else f"shard{k}/control.sock: no reply within 2s",
           "size_bytes": 512 * MiB,
           "swap": {"type": "partition", "size": 512 * MiB - 4096, "used": (k + 1) * MiB,
                    "priority": 100}}
    for key, v in (("stored_pages", pages), ("zero_pages", 7 * (k + 1)),
                   ("stored_bytes", pages * 1024), ("metadata_bytes", 4096 * (k + 1)),
                   ("runs", k + 3)):
        row[key] = v if answered else None
    return row


def _record(answered1: bool = True) -> dict:
    tier = {"name": "ram", "kind": "memory", "pages": 300, "zero_pages": 0,
            "stored_bytes": 300 * 1024, "capacity_bytes": 64 * MiB, "compression_ratio": 4.0,
            "draining": False, "counters": {"pages_in": 300, "pages_out": 2}}
    return {"size_bytes": 1024 * MiB, "priority": 100, "devices": ["/dev/loop3", "/dev/loop4"],
            "shards": [_row(0, "/dev/loop3", pages=100),
                       _row(1, "/dev/loop4", pages=200, answered=answered1)],
            "pages": {"stored": 300, "zero": 21}, "compression_ratio": 4.0,
            "metadata_bytes": 12288, "tiers": [tier],
            "io": {"reads": 1, "writes": 2, "discards": 3, "read_errors": 0,
                   "write_errors": 0, "enospc": 0}}


def _fields(text: str) -> list[list[str]]:
    return [line.split(" ") for line in text.splitlines()]


def test_each_device_row_carries_its_own_shards_values() -> None:
    """Before: only row 0 had PAGES/ZERO/RATIO/META, and they were the sums of all shards."""
    lines = device_table(_record(), ["NAME", "PAGES", "ZERO-PAGES", "COMPR", "META", "USED"],
                         Style(bytes=True))
    assert lines[0].split() == ["NAME", "PAGES", "ZERO-PAGES", "COMPR", "META", "USED"]
    assert lines[1].split() == ["/dev/loop3", "100", "7", str(100 * 1024), "4096", str(MiB)]
    assert lines[2].split() == ["/dev/loop4", "200", "14", str(200 * 1024), "8192",
                                str(2 * MiB)]


def test_bytes_raw_noheadings_output_one_line_per_device_of_the_fields_asked() -> None:
    out = render(_record(), parse_columns("NAME,SIZE,USED"),
                 Style(bytes=True, raw=True, headings=False))
    assert _fields(out) == [["/dev/loop3", str(512 * MiB), str(MiB)],
                            ["/dev/loop4", str(512 * MiB), str(2 * MiB)]]
    # with headings, and human sizes without --bytes (1024-based, as swapon)
    out = render(_record(), ["NAME", "SIZE", "USED", "PRIO", "TYPE"], Style(raw=True))
    assert _fields(out) == [["NAME", "SIZE", "USED", "PRIO", "TYPE"],
                            ["/dev/loop3", "512M", "1M", "100", "partition"],
                            ["/dev/loop4", "512M", "2M", "100", "partition"]]


def test_noheadings_alone_prints_the_aligned_device_table_without_header() -> None:
    out = render(_record(), None, Style(headings=False)).splitlines()
    assert len(out) == 2 and out[0].split()[0] == "/dev/loop3"
    assert out[1].split()[:5] == ["/dev/loop4", "512M", "2M", "100", "serving"]


def test_every_header_means_one_thing_in_every_table() -> None:
    """PAGES is a count of non-zero pages, COMPR bytes as stored, in every table; no STORED
    header that is pages in one table and bytes in the other."""
    text = render(_record(), None, Style(bytes=True))
    headers = [ln.split() for ln in text.splitlines() if ln.startswith(("NAME", "TIER"))]
    assert len(headers) == 2 and all("STORED" not in h for h in headers)
    dev_h, tier_h = headers
    dev = next(ln.split() for ln in text.splitlines() if ln.startswith("/dev/loop4"))
    tier = next(ln.split() for ln in text.splitlines() if ln.startswith("ram "))
    assert dev[dev_h.index("PAGES")] == "200" and tier[tier_h.index("PAGES")] == "300"
    assert dev[dev_h.index("COMPR")] == str(200 * 1024)
    assert tier[tier_h.index("COMPR")] == str(300 * 1024)
    for name, col in DEVICE_COLUMNS.items():
        assert col.help and name == name.upper()


def test_unresponsive_shard_shows_what_proc_swaps_says() -> None:
    st = _record(answered1=False)
    lines = device_table(st, ["NAME", "STATE", "USED", "PRIO", "PAGES", "NOTE"], Style(raw=True))
    assert lines[2].split(" ")[:5] == ["/dev/loop4", "unresponsive", "2M", "100", "-"]
    assert "no\\x20reply\\x20within\\x202s" in lines[2]  # one field, spaces escaped
    # the kernel's view as it is now replaces the recorded one (a summary read from a file)
    overlay_swaps(st, {"/dev/loop4": {"type": "partition", "size": 1, "used": 5 * MiB,
                                      "priority": -2}})
    lines = device_table(st, ["NAME", "USED", "PRIO"], Style(raw=True, headings=False))
    assert _fields("\n".join(lines)) == [["/dev/loop3", "-", "-"], ["/dev/loop4", "5M", "-2"]]


def test_raw_fields_never_contain_a_space() -> None:
    st = _record()
    st["shards"][0]["device"] = "/dev/odd name\\x"
    (line,) = device_table(st, ["NAME", "SIZE"], Style(raw=True, headings=False))[:1]
    assert line == "/dev/odd\\x20name\\x5cx 512M"


def test_parse_columns() -> None:
    assert parse_columns("name,Size,USED") == ["NAME", "SIZE", "USED"]
    assert parse_columns("ZERO-PAGES") == ["ZERO-PAGES"]
    for bad in ("NAME,BOGUS", "", "NAME,,SIZE"):
        with pytest.raises(ValueError, match=r"unknown column .*known: NAME,TYPE,SIZE"):
            parse_columns(bad)


def test_a_record_of_an_older_supervisor_still_renders() -> None:
    """Rows without per-shard numbers (before this change) show "-", never raise."""
    st = _record()
    for r in st["shards"]:
        for k in ("stored_pages", "zero_pages", "stored_bytes", "metadata_bytes", "swap",
                  "size_bytes"):
            r.pop(k)
    out = render(st, ["NAME", "SIZE", "PAGES", "RATIO"], Style(raw=True, headings=False))
    assert _fields(out) == [["/dev/loop3", "512M", "-", "-"], ["/dev/loop4", "512M", "-", "-"]]
