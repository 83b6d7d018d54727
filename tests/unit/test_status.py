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
