"""Adding shard reports up: counters sum, per-target health merges, descriptions stay."""

from tierswap.status import combine_extra


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
