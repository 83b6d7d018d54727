"""The remote tier with `erasure = "K+M"` against real nbdkit servers.

Real servers, killed and restarted empty (the nbdkit memory plugin), because losing and
regaining targets is what erasure coding is for; the coding itself is covered over in-memory
stores in test_erasure.py. As in test_remote_tier.py the tier is a store of a real lane: pages
are written and read through it.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

from tests.lane.fuseproto import FuseError
from tests.lane.harness import PAGE, all_runs, lookup
from tests.unit.test_remote_tier import (
    CAPACITY,
    MiB,
    Remote,
    make_config,
    remote_lane,
    wait_for,
)
from tests.unit.test_remote_tier import nbdkit as nbdkit  # the fixture
from tierswap.nbd import open_nbd_client
from tierswap.tiers.base import SEG_SIZE, TierError
from tierswap.tiers.remote import RemoteTier

EXPORT = CAPACITY // 4  # 4+2 over 6 targets: each holds one fragment of every segment


def ec(code: str = "4+2", extra: str = "") -> str:
    return f'erasure = "{code}"\n{extra}'


def targets(tier: RemoteTier) -> list[dict]:
    return tier.extra_statistics()["targets"]  # type: ignore[return-value]


def rebuilt(tier: RemoteTier) -> bool:
    return all(t["up"] and t["rebuild_backlog"] == 0 for t in targets(tier))


def reads(tier: RemoteTier) -> list[int]:
    return [t.client.statistics().reads if t.client else 0 for t in tier.targets]


def live_bytes(r: Remote) -> int:
    return int(r.rig.svc.lane.statistics()["tiers"][r.index]["live_bytes"])


async def unreadable(r: Remote) -> None:
    """Some written page no longer reads: EIO (never wrong bytes)."""
    with pytest.raises(FuseError) as info:
        for off, n in r.written:
            got = await r.rig.client.read(off, n)
            assert got == bytes(r.model[off : off + n])
    assert info.value.errno == errno.EIO


async def test_fragments_on_six_targets_read_directly(nbdkit, tmp_path: Path) -> None:
    servers = [nbdkit("memory", str(EXPORT)) for _ in range(6)]
    async with remote_lane(tmp_path, servers, extra=ec()) as r:
        tier = r.tier
        assert tier.align == 1  # pieces packed back to back: no padding on targets
        await r.fill(3)
        assert tier.store is not None
        await tier.store.flush(unstage=True)
        await r.check_all()
        st = tier.extra_statistics()
        assert st["erasure"] == "4+2" and st["degraded_reads"] == 0
        assert all(t["fragments"] == 4 for t in targets(tier))  # one of each of 4 segments
        held = sum(t["bytes"] for t in targets(tier))
        assert held <= 1.55 * live_bytes(r)
        # a page of a closed segment: one request to one target, no decoding
        run = next(x for x in all_runs(r.rig, r.index) if x.base >> 20 == 1 and x.nbytes)
        before = reads(tier)
        p = run.start * PAGE
        assert await r.rig.client.read(p, PAGE) == bytes(r.model[p : p + PAGE])
        assert sum(a != b for a, b in zip(reads(tier), before, strict=True)) == 1
        # what the targets hold is ciphertext: no piece of any stored run appears on them
        samples = [await tier.read(x.base, min(x.nbytes, 64))
                   for x in all_runs(r.rig, r.index)[::20] if x.nbytes >= 32]
        assert samples
        for s in servers:
            async with open_nbd_client(s.url) as c:
                raw = await c.read(0, EXPORT)
            for d in samples:
                assert d[:32] not in raw


async def test_two_down_decode_three_down_eio_then_recover(nbdkit, tmp_path: Path) -> None:
    disk = tmp_path / "t4.img"  # target 4 keeps its data over a restart (an outage, not a loss)
    with open(disk, "wb") as f:
        f.truncate(EXPORT)
    servers = [nbdkit("memory", str(EXPORT)) for _ in range(4)]
    servers += [nbdkit("file", str(disk)), nbdkit("memory", str(EXPORT))]
    async with remote_lane(tmp_path, servers, extra=ec()) as r:
        tier, lane = r.tier, r.rig.svc.lane
        assert tier.store is not None
        await r.fill(3)
        await tier.store.flush(unstage=True)
        servers[0].kill()
        servers[3].kill()
        await r.check_all()
        assert tier.extra_statistics()["degraded_reads"] > 0
        await wait_for(lambda: not targets(tier)[0]["up"] and not targets(tier)[3]["up"])
        await r.fill(5, seed=2)  # written with two targets away
        assert tier.extra_statistics()["degraded_writes"] > 0
        await tier.store.flush(unstage=True)
        servers[4].kill()
        await wait_for(lambda: not targets(tier)[4]["up"])
        await unreadable(r)
        # too few targets to open a segment: the lane places nothing here (spills elsewhere)
        await wait_for(lambda: lane.statistics()["tiers"][r.index]["offline"] == 1, 5)
        assert tier.extra_statistics()["unreadable_segments"] > 0
        servers[4].start()  # back with its data: verified, and everything reads again
        await wait_for(lambda: targets(tier)[4]["up"] and not targets(tier)[4]["rebuild_backlog"])
        assert tier.extra_statistics()["unreadable_segments"] == 0
        await r.check_all()
        for i in (0, 3):  # back, and empty: rebuilt from the others
            servers[i].start()
        await wait_for(lambda: rebuilt(tier), 30)
        assert tier.extra_statistics()["unreadable_segments"] == 0
        servers[1].kill()
        servers[2].kill()  # the rebuilt fragments on 0, 3 and 4 are needed now
        await r.check_all()
        assert tier.extra_statistics()["auth_failures"] == 0


async def test_more_targets_placement_balances_and_moves(nbdkit, tmp_path: Path) -> None:
    servers = [nbdkit("memory", str(EXPORT)) for _ in range(8)]

    def tweak(tier: RemoteTier) -> None:
        tier.rereplicate_after = 0.3

    async with remote_lane(tmp_path, servers, extra=ec(), tweak=tweak) as r:
        tier = r.tier
        assert tier.store is not None
        await r.fill(12)
        await tier.store.flush(unstage=True)
        used = [t["fragments"] for t in targets(tier)]
        assert sum(used) == 13 * 6 and max(used) - min(used) <= 3, used
        assert all(t["slots"] == 16 for t in targets(tier))  # the whole export (one per segment)
        servers[2].kill()
        await wait_for(lambda: targets(tier)[2]["fragments"] == 0, 30)
        assert tier.extra_statistics()["moved_fragments"] == used[2]
        servers[5].kill()
        servers[6].kill()
        await r.check_all()


async def test_create_checks_export_size_for_the_code(nbdkit, tmp_path: Path) -> None:
    servers = [nbdkit("memory", str(EXPORT)) for _ in range(5)] + [
        nbdkit("memory", str(EXPORT - MiB))]
    cfg = make_config(tmp_path, servers, extra='erasure = "4+2"')
    with pytest.raises(TierError, match=r"erasure 4\+2 over 6 targets needs at least") as info:
        await RemoteTier.create(cfg.tiers[-1], 0, cfg, 0)
    assert info.value.errno == errno.ENOSPC


async def test_replica_resync_is_rate_limited(nbdkit, tmp_path: Path) -> None:
    a, b = nbdkit(), nbdkit()
    async with remote_lane(tmp_path, [a, b], extra='replicas = 2\nrepair_rate = "1M"') as r:
        tier = r.tier
        await r.fill(3)
        a.kill()
        await wait_for(lambda: not tier.targets[0].up)
        a.start()
        t0 = trio.current_time()
        await wait_for(lambda: all(t["up"] and t["resync_pending"] == 0
                                   for t in tier.extra_statistics()["targets"]), 30)
        # ~4 segments of ~1 MiB at 1 MiB/s after a one-second burst
        assert trio.current_time() - t0 >= 2.0
        assert tier.resynced_segments >= 3


async def test_a_freed_segment_gives_its_fragments_back(nbdkit, tmp_path: Path) -> None:
    """The lane tells the store which segments it freed (take_freed): their fragments are
    released on the targets, so a reused segment gets placed afresh."""
    servers = [nbdkit("memory", str(EXPORT)) for _ in range(6)]
    async with remote_lane(tmp_path, servers, extra=ec()) as r:
        tier = r.tier
        assert tier.store is not None
        await r.fill(2)
        await tier.store.flush(unstage=True)
        before = sum(t["fragments"] for t in targets(tier))
        for run in all_runs(r.rig, r.index):  # empty segment 0
            if run.base < SEG_SIZE and run.nbytes:
                await r.rig.client.punch(run.start * PAGE, run.npages * PAGE)
                r.model[run.start * PAGE : (run.start + run.npages) * PAGE] = \
                    bytes(run.npages * PAGE)
        await wait_for(lambda: sum(t["fragments"] for t in targets(tier)) == before - 6, 5)
        await r.check_all()
        assert lookup(r.rig, 0, 1) == []
