"""tierswap.commands: the pure request types, their split across shards, combine and render."""

from __future__ import annotations

import pytest

from tierswap import commands as C
from tierswap.commands import ShardReply
from tierswap.errors import ControlError


@pytest.mark.parametrize("req", [
    C.Ping(), C.Status(), C.Down(), C.Inspect(), C.Drain(tier="ram"), C.Undrain(tier="ram"),
    C.Compact(tier="disk"), C.SetPolicy(updates={"rate": "64M", "promote": True}),
    C.Migrate(src="ram", dst="disk", pages=10), C.Migrate(src="ram", dst="disk", all=True),
    C.Migrate(src="ram", dst="disk", bytes=1 << 20, idle_for=60.0),
])
def test_wire_round_trip(req):
    assert C.parse(req.to_wire(), C.PUBLIC) == req


def test_shard_only_commands_are_not_public():
    for cmd in ("stats", "shutdown"):
        with pytest.raises(ControlError, match="unknown command"):
            C.parse({"cmd": cmd}, C.PUBLIC)
        assert C.parse({"cmd": cmd}, C.SHARD).cmd == cmd
    with pytest.raises(ControlError, match="unknown command"):
        C.parse({"cmd": "down"}, C.SHARD)


@pytest.mark.parametrize(("wire", "needle"), [
    ([], "JSON object"), ({"cmd": 3}, "JSON object"), ({}, "JSON object"),
    ({"cmd": "x" * 10_000}, "unknown command"),
    ({"cmd": "migrate", "from": "a", "to": "b"}, "exactly one of"),
    ({"cmd": "migrate", "from": "a", "to": "b", "pages": 1, "all": True}, "exactly one of"),
    ({"cmd": "migrate", "from": "a", "to": "a", "all": True}, "same tier"),
    ({"cmd": "migrate", "from": "a", "to": "b", "pages": 0}, "positive integer"),
    ({"cmd": "migrate", "from": "a", "to": "b", "pages": True}, "positive integer"),
    ({"cmd": "migrate", "from": "a", "to": "b", "pages": 1.5}, "positive integer"),
    ({"cmd": "migrate", "from": 7, "to": "b", "all": True}, "non-empty string"),
    ({"cmd": "migrate", "from": "a", "to": "b", "all": "yes"}, "true or false"),
    ({"cmd": "migrate", "from": "a", "to": "b", "all": True, "idle_for": -1}, "seconds"),
    ({"cmd": "migrate", "from": "a", "to": "b", "all": True, "idle_for": "NaN"}, "seconds"),
    ({"cmd": "drain"}, "non-empty string"), ({"cmd": "drain", "tier": ["x"]}, "string"),
    ({"cmd": "drain", "tier": "ram", "force": True}, "unknown argument 'force'"),
    ({"cmd": "status", "verbose": 1}, "unknown argument"),
    ({"cmd": "policy", "set": [1]}, "plain values"),
    ({"cmd": "policy", "set": {"rate": {"deep": 1}}}, "plain values"),
])
def test_malformed_requests_are_one_line_errors(wire, needle):
    with pytest.raises(ControlError, match=needle) as ei:
        C.parse(wire, C.PUBLIC)
    assert "\n" not in str(ei.value) and len(str(ei.value)) < 200


def test_counted_requests_split_evenly_and_skip_empty_shares():
    parts = C.Migrate(src="a", dst="b", pages=10).split(3)
    assert [p.pages for p in parts] == [4, 3, 3]
    parts = C.Migrate(src="a", dst="b", pages=1).split(3)
    assert parts[0].pages == 1 and parts[1] is C.SKIP and parts[2] is C.SKIP
    assert C.Migrate(src="a", dst="b", all=True).split(2) == [C.Migrate(src="a", dst="b",
                                                                        all=True)] * 2
    assert C.Drain(tier="x").split(2) == [C.Drain(tier="x")] * 2


def test_moves_combine_what_answered_and_list_the_rest():
    req = C.Migrate(src="a", dst="b", pages=10)
    res = req.combine([ShardReply(0, {"pages": 5, "bytes": 100}),
                       ShardReply(1, error="tier b is full after moving 2 pages"),
                       ShardReply(2, {"pages": 3, "bytes": 50})])
    assert res["pages"] == 8 and res["bytes"] == 150
    assert C.failures(res) == ["shard 1: tier b is full after moving 2 pages"]
    assert req.render(res).startswith("moved 8 pages")
    # nothing answered: the first error is the answer
    with pytest.raises(ControlError, match="no reply"):
        req.combine([ShardReply(0, error="no reply within 5s"), ShardReply(1, error="x")])


def test_inspect_combines_and_renders():
    def part(pages):
        return {"tiers": [{"name": "ram", "kind": "memory", "pages": pages, "zero_pages": 1,
                           "stored_bytes": 4096 * pages, "capacity_bytes": 1 << 20,
                           "free_extents": 1, "free_bytes": 10, "largest_free_extent": pages,
                           "draining": False,
                           "idle_pages": {"lt_1m": pages, "lt_10m": 0, "lt_1h": 0,
                                          "longer": 0}}],
                "zero_pages": 2, "policy": {"rate": 1}}
    res = C.Inspect().combine([ShardReply(0, part(3)), ShardReply(1, part(5)),
                               ShardReply(2, error="shard 2 is failed")])
    t = res["tiers"][0]
    assert t["pages"] == 8 and t["largest_free_extent"] == 5 and t["idle_pages"]["lt_1m"] == 8
    assert t["compression_ratio"] == 1.0 and res["zero_pages"] == 4
    assert C.failures(res) == ["shard 2: shard 2 is failed"]
    assert "ram" in C.Inspect().render(res)


def test_progress_combines_across_shards():
    req = C.Drain(tier="x")
    assert req.combine_progress([{"pages": 3, "total": 10}, {"pages": 4, "total": 5}]) == {
        "pages": 7, "total": 15}
    assert req.combine_progress([{"pages": 3, "total": None}, {}])["total"] is None
