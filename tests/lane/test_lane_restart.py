"""A shard's data survives the shard: the kit's memfds (map, arenas, life counters) and the file
tier are all a replacement needs (issue 10). The FUSE side (the connection kept open, requests
re-queued with FUSE_NOTIFY_RESEND) is covered by tests/integration/test_restart.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.lane.harness import PAGE, make_config, mixed_bytes, open_lane
from tierswap.errors import StartError
from tierswap.keeper import KitKeeper
from tierswap.kit import Kit


async def test_a_new_lane_over_the_same_kit_has_every_page(tmp_path):
    base = tmp_path
    kit = Kit()
    model = bytearray(16 << 20)
    async with open_lane(size=16 << 20, mem="4M", disk="32M", kit=kit, tmp=base) as rig:
        data = mixed_bytes(11, 12 << 20)
        await rig.client.write_all(0, data)
        await rig.client.punch(PAGE * 100, PAGE * 50)
        model[: len(data)] = data
        model[PAGE * 100: PAGE * 150] = bytes(PAGE * 50)
        before = rig.stats()
    # the first lane is gone; its kit (and the file tier) are all that is left
    kit.fresh = False
    async with open_lane(size=16 << 20, mem="4M", disk="32M", kit=kit, tmp=base) as rig:
        assert await rig.client.read_all(0, len(model)) == bytes(model)
        after = rig.stats()
        assert after.stored_pages == before.stored_pages
        assert [t.stored_bytes for t in after.tiers] == [t.stored_bytes for t in before.tiers]
        assert after.runs == before.runs
        await rig.client.write(0, b"n" * PAGE)  # and it keeps working
        assert await rig.client.read(0, 2) == b"nn"
    kit.close()


CHILD = textwrap.dedent("""
    import os, socket, sys, trio
    sys.path.insert(0, sys.argv[1])
    from tests.lane.harness import make_config
    from tierswap.kit import Kit
    from tierswap.lane import LaneService
    from pathlib import Path

    async def main():
        kit = Kit.from_env(os.environ["TIERSWAP_KIT"])
        cfg = make_config(Path(sys.argv[2]), size=16 << 20, mem="4M", disk="32M")
        svc = await LaneService.open(cfg, 0, kit, [int(sys.argv[3])] * 3)
        async with trio.open_nursery() as n:
            await n.start(svc.run)
            svc.start()
            print("ready", flush=True)
            await trio.sleep_forever()

    trio.run(main)
""")


def _stop(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()
    if p.stdout is not None:
        p.stdout.close()


def _child(kit: Kit, tmp, sock_fd: int) -> subprocess.Popen:
    fds = [*kit.fds.values(), sock_fd]
    env = dict(os.environ) | kit.env()
    p = subprocess.Popen([sys.executable, "-c", CHILD, os.getcwd(), str(tmp), str(sock_fd)],
                         env=env, pass_fds=fds, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


def test_sigkill_in_the_middle_of_writes_leaves_a_consistent_map(tmp_path):
    """A lane process killed while writes (and their LMDB transactions) are in flight; a new
    process over the same kit serves every acknowledged write, and every unacknowledged one
    reads either its old or its new content (the kernel would resend it: writes are
    idempotent)."""
    from tests.lane.fuseproto import WRITE_IN, Client

    make_config(tmp_path, size=16 << 20, mem="4M", disk="32M")  # prepares the tier file
    # the memfds a shard's kit holds, made here: we keep them as the supervisor does
    kit = Kit()
    kit.memfd("map")
    kit.memfd("arena.0")
    kit.memfd("life.0", PAGE)
    kit.memfd("life.1", PAGE)
    keeper = KitKeeper()
    keeper.deposit(0, Kit(fds={k: os.dup(v) for k, v in kit.fds.items()}))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s_ in (a, b):
        s_.setsockopt(socket.SOL_SOCKET, 32, 4 << 20)  # SO_SNDBUFFORCE
        s_.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
    c = Client(a)
    model = bytearray(16 << 20)
    p = _child(kit, tmp_path, b.fileno())
    try:
        acked: list[int] = []
        for i in range(300):
            off = (i * 37 % 3000) * PAGE
            data = mixed_bytes(i, 8 * PAGE)
            c.write(off, data)
            model[off:off + len(data)] = data
            acked.append(off)
        keeper.sweep(0)
        assert keeper.locked_bytes(0) > 0  # the arena and the map are locked by us too
        pending = []  # a burst nobody waits for, and the kill in its middle
        for i in range(300, 340):
            off = (i * 37 % 3000) * PAGE
            data = mixed_bytes(i, 8 * PAGE)
            c.send(16, 2, WRITE_IN.pack(2, off, len(data), 0, 0, 0, 0) + data)  # FUSE_WRITE
            pending.append((off, data))
        os.kill(p.pid, signal.SIGKILL)
        _stop(p)
        a.setblocking(False)
        try:  # replies that made it out before the kill
            while a.recv(2 << 20):
                pass
        except BlockingIOError:
            pass
        a.setblocking(True)
        kit.fresh = False
        p = _child(kit, tmp_path, b.fileno())
        for off, data in pending:
            got = c.read(off, len(data))
            old = bytes(model[off:off + len(data)])
            for s in range(0, len(data), 512):
                assert got[s:s + 512] in (old[s:s + 512], data[s:s + 512])
            model[off:off + len(data)] = got
        for off in acked:
            assert c.read(off, 8 * PAGE) == bytes(model[off:off + 8 * PAGE])
        c.write(0, b"z" * PAGE)
        assert c.read(0, 1) == b"z"
    finally:
        _stop(p)
        keeper.release_all()
        kit.close()
        a.close()
        b.close()


@pytest.mark.parametrize("disk", [None, "4M"], ids=["tier-gone", "tier-smaller"])
async def test_a_map_the_new_lane_cannot_place_fails_the_start(tmp_path, disk):
    """A record the replacement cannot place must fail its start: skipped, its bytes would be
    counted free and reused while the map still points at them."""
    kit = Kit()
    async with open_lane(size=32 << 20, mem="4M", disk="32M", kit=kit, tmp=tmp_path) as rig:
        await rig.client.write_all(0, os.urandom(24 << 20))  # most of it in the file tier
        assert rig.stats().tiers[1].stored_bytes > 8 << 20
    kit.fresh = False
    with pytest.raises(StartError, match=r"the map (names a tier|points outside)"):
        async with open_lane(size=32 << 20, mem="4M", disk=disk, kit=kit, tmp=tmp_path):
            pass
    kit.close()
