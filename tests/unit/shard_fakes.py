"""Stand-ins for the two things a shard's lifecycle talks to besides its lane: the mount and
the kernel's swap (tierswap.shard.Mounter, SwapHost). The lane itself is real: the stand-in
mount hands it one end of a SOCK_SEQPACKET socketpair instead of a /dev/fuse connection, and a
test can send it FUSE requests on the other end (tests/lane/harness.py's AsyncClient). They
record what the lifecycle did to them, above all an unmount while the device was still in swap.

Used in-process by test_shard_lifecycle.py and, for the signal tests, in a child process
(`python shard_fakes.py RUN_DIR SCENARIO`), where a signal the shard does not handle ends the
child instead of the test run.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from tierswap.errors import CommandError

if TYPE_CHECKING:
    from tests.lane.harness import AsyncClient

DEV = "/dev/loop99"


class FakeMounter:
    """A "mount" that is a socketpair: the lane serves one end, a test talks on the other
    through `client()`."""

    def __init__(self, host: FakeHost) -> None:
        self.host = host
        self.mounted = False
        self.closed: bool | None = None  # True once unmounted
        self.unmounted_in_swap = False
        self.client_end: socket.socket | None = None

    async def mount(self, paths, nclones: int) -> tuple[int, list[int]]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, 32, 4 << 20)  # SO_SNDBUFFORCE
            s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
        self.client_end = a
        self.mounted = True
        # the kit owns (and closes) what it is given: the lane's end itself and dups of it, so
        # no socket object of ours is left for the garbage collector to close
        fd = b.detach()
        return fd, [os.dup(fd) for _ in range(nclones)]

    def client(self, nursery: trio.Nursery) -> AsyncClient:
        """A FUSE client on the test's end, its replies received by a task in `nursery` that
        closes the socket when it ends (never left to the garbage collector)."""
        from tests.lane.harness import AsyncClient  # not at the top: the child process runs
        # this file as a script, without the repository on sys.path

        assert self.client_end is not None, "not mounted"
        client = AsyncClient(trio.socket.from_stdlib_socket(self.client_end))

        async def receive() -> None:
            with client.sock:
                await client.receiver()

        nursery.start_soon(receive)
        return client

    def unmount(self, paths) -> None:
        self.closed = True
        if self.host.swaps:
            self.unmounted_in_swap = True
        self.mounted = False


class FakeHost:
    """The kernel: our loop device, in swap until a swapoff succeeds."""

    majmin = "0:99"

    def __init__(self, swapoff_seconds: float = 0.0, failures: int = 0,
                 marker: Path | None = None) -> None:
        self.marker = marker  # touched when a swapoff starts (for a test in another process)
        self.swaps = {DEV}
        self.loops = {DEV}
        self.swapoff_seconds = swapoff_seconds
        self.failures = failures
        self.swapoffs = 0
        self.in_swapoff = threading.Event()

    def note_mounted(self) -> None:
        pass

    def own_loops(self) -> list[str]:
        return sorted(self.loops)

    def own_swaps(self) -> list[str]:
        return sorted(self.swaps)

    def swapoff(self, dev: str) -> None:  # runs in a worker thread, like the real one
        self.swapoffs += 1
        self.in_swapoff.set()
        if self.marker is not None:
            self.marker.touch()
        time.sleep(self.swapoff_seconds)
        self.in_swapoff.clear()
        if self.failures:
            self.failures -= 1
            raise CommandError(f"swapoff {dev}: Cannot allocate memory")
        self.swaps.discard(dev)

    def detach(self, dev: str) -> None:
        self.loops.discard(dev)


def config_text(tmp: Path) -> str:
    return f"""
[daemon]
state_dir = "{tmp}/state"
run_dir = "{tmp}/run"
[device]
size = "2M"
[[tier]]
name = "ram"
kind = "memory"
capacity = "4M"
"""


async def _child(tmp: Path, swapoff_seconds: float) -> dict:
    from tierswap.config import parse_config
    from tierswap.kit import Kit
    from tierswap.shard import Shard

    cfg = parse_config(config_text(tmp), check_fs=False)
    host = FakeHost(swapoff_seconds=swapoff_seconds, marker=tmp / "in_swapoff")
    mounter = FakeMounter(host)
    shard = Shard(cfg, 0, Kit(), mounter=mounter, host=host, threads=2)  # type: ignore[arg-type]
    async with trio.open_nursery() as n:
        await n.start(shard.serve)
        (tmp / "serving").touch()
    return {"swapoffs": host.swapoffs, "in_swap": sorted(host.swaps),
            "unmounted_in_swap": mounter.unmounted_in_swap, "closed": mounter.closed}


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tmp = Path(sys.argv[1])
    result = trio.run(_child, tmp, float(sys.argv[2]))
    print(json.dumps(result), flush=True)
