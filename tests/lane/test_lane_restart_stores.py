"""The slow tiers survive their shard too: a new lane over the same kit reads every page of an
encrypted file tier and of a remote tier (replicas; erasure 4+2 over 6 targets) that the dead
one wrote (issue 10). Their state lives in the kit (tierswap/kitstate.py): key, nonce
reservation, counters and tags in `secrets.T`, placement and bitmaps in `state.T`.

The first lane is closed without any flush or hand-over (what a process can do when it dies):
the erasure-coded tier keeps a segment's parity staged, so the replacement must find that out
and rebuild it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import trio

from tests.lane.harness import PAGE, make_config, mixed_bytes, open_lane
from tests.netutil import free_port, spawn_nbdkit, wait_listening
from tierswap.kit import Kit, KitError
from tierswap.tiers import erasure
from tierswap.tiers.file import FileTier
from tierswap.tiers.remote import RemoteTier

MiB = 1 << 20


class Server:
    """An nbdkit memory server on 127.0.0.1: it keeps its data while it runs, and comes back
    empty from `restart`."""

    def __init__(self, tmp: Path, size: str) -> None:
        self.tmp, self.size = tmp, size
        for _ in range(5):
            self.port = free_port()
            if self._spawn(1):
                return
        pytest.fail("nbdkit did not start")

    def _spawn(self, tries: int) -> bool:
        for _ in range(tries):  # the port may linger briefly after a kill
            self.proc = spawn_nbdkit(self.port, ("memory", self.size),
                                     self.tmp / f"nbdkit-{self.port}.log")
            if wait_listening(self.proc, self.port, 5.0):
                return True
            self.kill()
            time.sleep(0.1)
        return False

    def restart(self) -> None:
        self.kill()
        assert self._spawn(50), "nbdkit did not restart"

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[[int, str], list[Server]]]:
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed (apt install nbdkit)")
    started: list[Server] = []

    def start(n: int, size: str) -> list[Server]:
        new = [Server(tmp_path, size) for _ in range(n)]
        started.extend(new)
        return new

    try:
        yield start
    finally:
        for s in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.kill()


def remote_tier(servers: list[Server], how: str, capacity: str = "16M") -> str:
    targets = ", ".join(f'"{s.url}"' for s in servers)
    return f"""
[[tier]]
name = "net"
kind = "remote"
capacity = "{capacity}"
targets = [{targets}]
{how}
"""


ENCRYPTED_FILE = """
[[tier]]
name = "vault"
kind = "file"
path = "{tmp}/vault.tier"
capacity = "32M"
encrypt = true
"""


async def write_then_adopt(tmp: Path, extra: str, size: int, data: bytes, *,
                           mem: str | None = "4M",
                           before_close: Callable[..., None] | None = None) -> tuple[Kit, int]:
    """Write `data` through a lane, close it (no flush, no hand-over), return the kit and the
    pages the last tier held."""
    kit = Kit()
    async with open_lane(size=size, mem=mem, disk=None, kit=kit, tmp=tmp, extra=extra) as rig:
        await rig.client.write_all(0, data)
        await rig.client.punch(PAGE * 10, PAGE * 20)
        held = rig.stats().tiers[-1].pages
        if before_close is not None:
            before_close(rig)
    kit.fresh = False  # the first shard is gone; its kit is all that is left
    return kit, held


def pages(seed: int, n: int) -> bytes:
    """Mixed pages (zero, compressible, random), then random ones: more than the small RAM
    tier holds, so that most go on to the tier under test."""
    rng = np.random.default_rng(seed)
    return mixed_bytes(seed, n // 3) + rng.integers(0, 256, n - n // 3, np.uint8).tobytes()


def expected(data: bytes) -> bytes:
    model = bytearray(data)
    model[PAGE * 10 : PAGE * 30] = bytes(PAGE * 20)
    return bytes(model)


async def wait_until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.05)


def fast(tier: RemoteTier) -> None:
    tier.timeout = 1.0
    tier.heartbeat = 0.1
    tier.backoff_max = 0.3


async def test_encrypted_file_tier_is_read_by_the_next_lane(tmp_path: Path) -> None:
    data = pages(21, 12 * MiB)
    kit, held = await write_then_adopt(tmp_path, ENCRYPTED_FILE, 16 * MiB, data)
    assert held > 1000  # most pages went past the small RAM tier, sealed
    try:
        plain = make_config(tmp_path, size=16 * MiB, mem="4M", disk=None,
                            extra=ENCRYPTED_FILE.replace("encrypt = true", "encrypt = false"))
        with pytest.raises(KitError, match="encrypted"):  # it would read ciphertext as pages
            await FileTier.create(plain.tiers[1], 1, plain, 0, kit)
        async with open_lane(size=16 * MiB, mem="4M", disk=None, kit=kit, tmp=tmp_path,
                             extra=ENCRYPTED_FILE) as rig:
            assert await rig.client.read_all(0, len(data)) == expected(data)
            vault = rig.svc.tiers[-1]
            assert vault.sealer is not None and vault.sealer.adopted  # type: ignore[union-attr]
            assert vault.sealer.auth_failures == 0  # type: ignore[union-attr]
            await rig.client.write_all(0, data[: 4 * MiB][::-1])  # and it keeps sealing
            assert await rig.client.read_all(0, 4 * MiB) == data[: 4 * MiB][::-1]
    finally:
        kit.close()


async def test_remote_replicas_are_read_by_the_next_lane(tmp_path: Path, servers) -> None:
    two = servers(2, "32M")
    net = remote_tier(two, "replicas = 2")
    data = pages(22, 12 * MiB)
    kit, held = await write_then_adopt(tmp_path, net, 16 * MiB, data)
    assert held > 1000
    two[0].restart()  # while no shard watched, one target lost everything
    try:
        async with open_lane(size=16 * MiB, mem="4M", disk=None, kit=kit, tmp=tmp_path,
                             extra=net) as rig:
            assert await rig.client.read_all(0, len(data)) == expected(data)
            tier = rig.svc.tiers[-1]
            assert isinstance(tier, RemoteTier) and tier.adopted
            fast(tier)
            # every target was suspect (not seen since the crash): the empty one was not
            # trusted (no authentication failure on a copy believed good) and is resynced
            await wait_until(lambda: all(t["resync_pending"] == 0 and t["up"]
                                         for t in tier.extra_statistics()["targets"]))
            st = tier.extra_statistics()
            assert st["auth_failures"] == 0 and st["degraded_segments"] == 0
            assert st["resynced_segments"] >= held * PAGE // MiB // 2
            two[1].kill()  # now the resynced copies are the only ones
            await wait_until(lambda: not tier.extra_statistics()["targets"][1]["up"])
            assert await rig.client.read_all(0, len(data)) == expected(data)
    finally:
        kit.close()


async def check_parity(store: erasure.ErasureStore, seg: int) -> None:
    """Every parity fragment of `seg` authenticates and is the code of its data fragments."""
    g = store.g
    ext = store._ext(seg, g.k)
    data = [await store._read_one(seg, i, 0, ext) for i in range(g.k)]
    assert all(d is not None for d in data)
    want = store.encoder.encode([bytes(d) for d in data], tuple(range(g.k, g.n)))  # type: ignore[arg-type]
    for j, code in zip(range(g.k, g.n), want, strict=True):
        assert not store.missing[seg, j]
        got = await store._read_one(seg, j, 0, ext)
        assert got is not None, f"parity fragment {j} of segment {seg} does not authenticate"
        assert bytes(got) == code, f"parity fragment {j} of segment {seg} is not the code"


async def test_remote_erasure_is_read_by_the_next_lane_and_staged_parity_is_rebuilt(
        tmp_path: Path, servers, monkeypatch) -> None:
    monkeypatch.setattr(erasure, "PARITY_IDLE", 1e6)  # the last segment keeps parity staged
    six = servers(6, "8M")
    net = remote_tier(six, 'erasure = "4+2"')
    data = pages(23, 12 * MiB)
    staged: list[int] = []

    def note_staged(rig) -> None:
        store = rig.svc.tiers[-1].store  # segments whose parity is not all written
        staged.extend(seg for seg, st in store.stages.items() if st.pdirty.any())
        assert staged

    kit, held = await write_then_adopt(tmp_path, net, 16 * MiB, data, mem=None,
                                       before_close=note_staged)
    assert held > 2000
    try:
        async with open_lane(size=16 * MiB, mem=None, disk=None, kit=kit, tmp=tmp_path,
                             extra=net) as rig:
            assert await rig.client.read_all(0, len(data)) == expected(data)
            tier = rig.svc.tiers[-1]
            assert isinstance(tier, RemoteTier) and tier.adopted and tier.store is not None
            fast(tier)
            store = tier.store
            assert store.adopted_parity == 2 * len(staged)
            # the parity that died in the stages is rebuilt from the data fragments
            await wait_until(lambda: all(t["rebuild_backlog"] == 0 and t["up"]
                                         for t in tier.extra_statistics()["targets"]))
            assert store.rebuilt_fragments >= 2 * len(staged)
            for seg in staged:
                await check_parity(store, seg)
            assert tier.extra_statistics()["auth_failures"] == 0
            # with two targets gone every page still reads (decoded, rebuilt parity included)
            six[0].kill()
            six[1].kill()
            await wait_until(lambda: sum(t["up"] for t in tier.extra_statistics()["targets"])
                             == 4)
            assert await rig.client.read_all(0, len(data)) == expected(data)
            assert tier.extra_statistics()["degraded_reads"] > 0
    finally:
        kit.close()
