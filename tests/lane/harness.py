"""Driving a shard's data path without a mount: the real lane (native threads, LMDB map, RAM
arena, compare-and-swap publishing) and the real stores, fed crafted FUSE messages over a
SOCK_SEQPACKET socketpair. Every lane thread reads the same socket, like the fds of one FUSE
connection share one queue; replies carry the request's unique id.

`open_lane` yields a `LaneRig`: the service, an async FUSE client and the config. The model
tests compare everything against a plain bytearray.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from tests.lane.fuseproto import (
    FALLOC_IN,
    FILE_INO,
    IN_HDR,
    OP,
    OUT_HDR,
    PUNCH,
    READ_IN,
    WRITE_IN,
    Client,
    FuseError,
)
from tierswap import _lane
from tierswap.config import Config, parse_config
from tierswap.kit import Kit
from tierswap.lane import LaneService, RunInfo
from tierswap.tiers.file import prepare_file

PAGE = 4096
SEG_SHIFT = 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33


def make_config(tmp: Path, *, size: int, mem: str | None = "4M", disk: str | None = "16M",
                mem_compression: str = "zstd:1", disk_compression: str = "zstd:1",
                extra: str = "") -> Config:
    text = f"""
[daemon]
state_dir = "{tmp}/state"
run_dir = "{tmp}/run"
[device]
size = {size}
"""
    if mem is not None:
        text += f"""
[[tier]]
name = "ram"
kind = "memory"
capacity = "{mem}"
compression = "{mem_compression}"
"""
    if disk is not None:
        text += f"""
[[tier]]
name = "disk"
kind = "file"
path = "{tmp}/disk.tier"
capacity = "{disk}"
compression = "{disk_compression}"
"""
    text += extra.replace("{tmp}", str(tmp))
    cfg = parse_config(text, check_fs=False)
    for t in cfg.tiers:
        if t.kind == "file":
            assert t.path is not None
            prepare_file(t.path, t.capacity)
    return cfg


class AsyncClient:
    """FUSE requests over a trio socket; replies are matched to requests by unique id."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._ids = itertools.count(2, 2)
        self._waiting: dict[int, trio.MemorySendChannel[tuple[int, bytes]]] = {}

    async def receiver(self) -> None:
        while True:
            data = await self.sock.recv(2 << 20)
            if not data:
                return
            ln, err, unique = OUT_HDR.unpack_from(data)
            assert ln == len(data), (ln, len(data))
            ch = self._waiting.pop(unique, None)
            assert ch is not None, f"reply to a request nobody sent: {unique}"
            ch.send_nowait((err, data[OUT_HDR.size:]))

    async def call(self, opcode: int, nodeid: int, body: bytes, *, raw: bool = False) -> Any:
        u = next(self._ids)
        send, recv = trio.open_memory_channel[tuple[int, bytes]](1)
        self._waiting[u] = send
        msg = IN_HDR.pack(IN_HDR.size + len(body), opcode, u, nodeid, 0, 0, os.getpid(), 0, 0)
        await self.sock.send(msg + body)
        with trio.fail_after(60):
            err, reply = await recv.receive()
        if raw:
            return err, reply
        if err:
            raise FuseError(-err, os.strerror(-err))
        return reply

    async def read(self, off: int, size: int) -> bytes:
        r: bytes = await self.call(OP["READ"], FILE_INO,
                                   READ_IN.pack(FILE_INO, off, size, 0, 0, 0, 0))
        return r

    async def write(self, off: int, data: bytes) -> int:
        body = await self.call(OP["WRITE"], FILE_INO,
                               WRITE_IN.pack(FILE_INO, off, len(data), 0, 0, 0, 0) + data)
        n: int = struct.unpack_from("<I", body)[0]
        return n

    async def read_all(self, off: int, n: int, step: int = 1 << 20) -> bytes:
        return b"".join([await self.read(off + o, min(step, n - o)) for o in range(0, n, step)])

    async def write_all(self, off: int, data: bytes, step: int = 1 << 20) -> None:
        for o in range(0, len(data), step):
            await self.write(off + o, data[o:o + step])

    async def punch(self, off: int, length: int, mode: int = PUNCH) -> None:
        await self.call(OP["FALLOCATE"], FILE_INO, FALLOC_IN.pack(FILE_INO, off, length, mode, 0))


@dataclass
class LaneRig:
    svc: LaneService
    client: AsyncClient
    config: Config
    kit: Kit
    tmp: Path
    size: int
    side: Client | None = None  # a blocking client on a socket of its own (its own lane thread)

    def stats(self) -> Any:
        return self.svc.statistics()


@asynccontextmanager
async def open_lane(*, size: int = 8 << 20, mem: str | None = "4M", disk: str | None = "16M",
                    threads: int = 3, kit: Kit | None = None, tmp: Path | None = None,
                    mem_compression: str = "zstd:1", disk_compression: str = "zstd:1",
                    extra: str = "", side: bool = False,
                    setup: Callable[[LaneService], None] | None = None
                    ) -> AsyncIterator[LaneRig]:
    """A running lane over a socketpair. O_DIRECT needs a real file system: /var/tmp.
    `setup` sees the service after it is opened and before anything runs (tunables)."""
    own_tmp = tmp is None
    base = Path(tempfile.mkdtemp(prefix="lane-test-", dir="/var/tmp")) if tmp is None else tmp
    cfg = make_config(base, size=size, mem=mem, disk=disk, mem_compression=mem_compression,
                      disk_compression=disk_compression, extra=extra)
    own_kit = kit is None
    kit = kit if kit is not None else Kit()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    side_a = side_b = None
    svc: LaneService | None = None
    try:
        for s in (a, b):  # room for a whole 1 MiB request per message, like /dev/fuse (as
            # root: the FORCE variants ignore net.core.[rw]mem_max)
            s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
        fds = [b.fileno()] * threads
        if side:  # one more lane thread that serves only the side client's socket
            side_a, side_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            fds.append(side_b.fileno())
        svc = await LaneService.open(cfg, 0, kit, fds)
        if setup is not None:
            setup(svc)
        client = AsyncClient(trio.socket.from_stdlib_socket(a))
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            svc.start(resend=False)
            nursery.start_soon(client.receiver)
            yield LaneRig(svc, client, cfg, kit, base, size,
                          Client(side_a) if side_a is not None else None)
            nursery.cancel_scope.cancel()
    finally:
        if svc is not None:
            with trio.CancelScope(shield=True):
                await svc.close()
        for s_ in (a, b, side_a, side_b):
            if s_ is not None:
                s_.close()
        if own_kit:  # the arena and map memfds: never kept past the test
            kit.close()
        if own_tmp:
            import shutil

            shutil.rmtree(base, ignore_errors=True)


def page_content(seed: int, kind: str) -> bytes:
    """A page of a given kind, reproducible from `seed`."""
    import random

    rng = random.Random(seed)
    if kind == "zero":
        return bytes(PAGE)
    if kind == "random":
        return rng.randbytes(PAGE)
    if kind == "text":
        words = [b"swap ", b"page ", b"tier ", b"slot ", b"zram ", b"lane ", b"\n"]
        out = b"".join(rng.choice(words) for _ in range(1200))
        return out[:PAGE]
    if kind == "run":
        return bytes([rng.randrange(256)]) * (PAGE - 64) + rng.randbytes(64)
    raise ValueError(kind)


def mixed_bytes(seed: int, n: int) -> bytes:
    """n bytes made of page-sized pieces of mixed kinds (so zero detection, compression and
    raw storage all happen)."""
    import random

    rng = random.Random(seed)
    kinds = ("zero", "random", "text", "run")
    out = bytearray()
    while len(out) < n:
        out += page_content(rng.randrange(1 << 30), rng.choice(kinds))
    return bytes(out[:n])


# ---------------------------------------------------------------------- what the map says


def lookup(rig: LaneRig, first: int, last: int) -> list[RunInfo]:
    """The records over pages [first, last), clipped (`lane.lookup`)."""
    return [RunInfo._make(t) for t in rig.svc.lane.lookup(first, last)]


def all_runs(rig: LaneRig, tier: int = -1) -> list[RunInfo]:
    """Every record of `tier` (-1: all), in page order (a synchronous sliced scan)."""
    out: list[RunInfo] = []
    cursor, done = 0, False
    while not done:
        runs, cursor, done = rig.svc.lane.scan(tier, cursor)
        out += [RunInfo._make(t) for t in runs]
    return out


def lens(run: RunInfo) -> list[int]:
    """Stored length of each page of a record (0: zero page, 4096: raw)."""
    return list(struct.unpack(f"<{run.npages}H", run.lens))


def offsets(run: RunInfo) -> list[int]:
    """Byte address of each page of a record in its tier's space."""
    out, at = [], run.base
    for n in lens(run):
        out.append(at)
        at += n
    return out


def check_ledger(rig: LaneRig) -> list[RunInfo]:
    """The map and the lane's books agree (call with nothing in flight): records are ordered,
    disjoint and inside the device; each stored record lies in one usable segment of its tier
    and no two overlap in bytes; per-tier page counts, zero-page counts, live bytes per segment
    and the free set all follow from the records. Returns the records."""
    runs = all_runs(rig)
    lane = rig.svc.lane
    d = lane.statistics()
    pages: Counter[int] = Counter()
    zeros: Counter[int] = Counter()
    zero_tier = 0
    extents: dict[int, list[tuple[int, int]]] = {}
    end = 0
    for r in runs:
        assert r.start >= end and 1 <= r.npages <= _lane.MAX_RUN, r
        end = r.start + r.npages
        ls = lens(r)
        assert r.nbytes == sum(ls), r
        if r.tier == _lane.ZERO_TIER:
            assert r.nbytes == 0 and not any(ls), r
            zero_tier += r.npages
            continue
        nz = sum(1 for x in ls if x)
        assert r.nonzero == nz, r
        pages[r.tier] += nz
        zeros[r.tier] += r.npages - nz
        if r.nbytes:
            seg = r.base >> SEG_SHIFT
            assert (r.base + r.nbytes - 1) >> SEG_SHIFT == seg, f"{r} spans segments"
            assert seg < d["tiers"][r.tier]["segments"], f"{r} outside the usable space"
            extents.setdefault(r.tier, []).append((r.base, r.nbytes))
    assert end <= rig.svc.npages
    assert d["runs"] == len(runs) and d["zero_pages"] == zero_tier
    for t, ts in enumerate(d["tiers"]):
        assert (ts["pages"], ts["zero_pages"]) == (pages[t], zeros[t]), f"tier {t}"
        live_b, free_b, open_seg = lane.segments(t)
        live = np.frombuffer(live_b, np.int64)
        free = np.frombuffer(free_b, np.uint8)
        want = np.zeros(len(live), np.int64)
        for base, n in extents.get(t, []):
            want[base >> SEG_SHIFT] += n
        assert np.array_equal(live, want), f"tier {t}: live bytes per segment"
        assert ts["live_bytes"] == int(live.sum())
        for seg in np.flatnonzero(free):
            assert live[seg] == 0 and seg != open_seg, f"tier {t}: segment {seg} free but used"
        assert ts["free_segments"] == int(free.sum())
        spans = sorted(extents.get(t, []))
        for (b1, n1), (b2, _) in itertools.pairwise(spans):
            assert b1 + n1 <= b2, f"tier {t}: two records share bytes at {b2}"
    return runs
