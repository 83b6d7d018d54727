"""Tier `file`: compressed pages in a preallocated file on local storage, written with O_DIRECT.

O_DIRECT keeps swapped pages out of the page cache (caching them would defeat swapping) and
means writeback needs no page cache allocation under memory pressure. I/O goes through a
fixed pool of page-aligned, locked bounce buffers, which is also the tier's bound on queued
work: a writer waits for a buffer, never grows a queue. Batches start on 4 KiB boundaries
(the segment allocator aligns them), so each request's pages are one pwrite.

Shards share one file: shard k owns bytes [k * share, (k + 1) * share).
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import trio

from tierswap.config import Config, TierConfig
from tierswap.tiers.base import SEG_SIZE, Tier, TierError, shard_capacity

ALIGN = 4096
BUFFERS = 8  # bounce buffers per shard: at most this many file I/Os in flight
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _libc_fallocate():
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fn


_fallocate = _libc_fallocate()


def punch_hole(fd: int, offset: int, length: int) -> None:
    import ctypes

    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def prepare_file(path: Path, size: int) -> None:
    """Create/resize and preallocate the tier file (called once by the supervisor)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


class FileTier(Tier):
    kind = "file"
    sealer = None  # a tierswap.crypto.BlockSealer when the config says encrypt = true

    def __init__(self, cfg: TierConfig, index: int, capacity: int, fd: int, origin: int) -> None:
        super().__init__(cfg, index, capacity, align=ALIGN)
        self.fd = fd
        self.origin = origin
        self._bufsize = SEG_SIZE + 2 * ALIGN
        # populated now (and locked by mlockall): I/O never faults in a buffer under pressure
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self._pool = [mmap.mmap(-1, self._bufsize, flags=flags) for _ in range(BUFFERS)]
        self._free = trio.Semaphore(BUFFERS)
        self._limiter = trio.CapacityLimiter(BUFFERS)

    @classmethod
    async def create(cls, cfg: TierConfig, index: int, config: Config, shard: int) -> FileTier:
        assert cfg.path is not None
        share = shard_capacity(cfg, config)
        try:
            fd = os.open(cfg.path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            msg = f"tier {cfg.name}: cannot open {cfg.path}: {e.strerror}"
            raise TierError(e.errno, msg) from None
        if os.fstat(fd).st_size < (shard + 1) * share:
            os.close(fd)
            raise TierError(errno.ENOSPC, f"tier {cfg.name}: {cfg.path} is smaller than configured")
        tier = cls(cfg, index, share, fd, shard * share)
        if cfg.encrypt:
            from tierswap.crypto import BlockSealer

            tier.sealer = BlockSealer.for_tier(cls.kind, cfg.name, shard, share)
        return tier

    async def _io(self, fn):
        async with self._free:
            buf = self._pool.pop()
            try:
                return await trio.to_thread.run_sync(fn, buf, limiter=self._limiter)
            except OSError as e:
                self.counters.errors += 1
                raise TierError(e.errno or errno.EIO, f"tier {self.name}: {e.strerror}") from None
            finally:
                self._pool.append(buf)

    async def write(self, base: int, data: bytes | memoryview) -> None:
        if self.sealer is not None:
            data = self.sealer.seal(base, data)
        n = len(data)
        if base % ALIGN or n > self._bufsize:
            raise TierError(errno.EINVAL, "unaligned or oversized file-tier write")
        padded = -(-n // ALIGN) * ALIGN

        def work(buf: mmap.mmap) -> None:
            mv = memoryview(buf)
            try:
                mv[:n] = data
                mv[n:padded] = bytes(padded - n)
                done = os.pwrite(self.fd, mv[:padded], self.origin + base)
            finally:
                mv.release()  # also on error: an export left behind breaks aclose()
            if done != padded:
                raise OSError(errno.EIO, "short write")

        await self._io(work)

    async def read(self, base: int, length: int) -> bytes:
        if self.sealer is not None:
            return await self.sealer.read(base, length, self._read_raw, self.name)
        return await self._read_raw(base, length)

    async def _read_raw(self, base: int, length: int) -> bytes:
        start = base - base % ALIGN
        end = -(-(base + length) // ALIGN) * ALIGN
        if end - start > self._bufsize:
            raise TierError(errno.EINVAL, "oversized file-tier read")

        def work(buf: mmap.mmap) -> bytes:
            mv = memoryview(buf)
            try:
                got = os.preadv(self.fd, [mv[: end - start]], self.origin + start)
                if got != end - start:
                    raise OSError(errno.EIO, "short read")
                return mv[base - start : base - start + length].tobytes()
            finally:
                mv.release()

        return await self._io(work)

    async def trim(self, base: int, length: int) -> None:
        await trio.to_thread.run_sync(punch_hole, self.fd, self.origin + base, length)

    async def aclose(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for b in self._pool:
            b.close()

    def extra_statistics(self) -> dict[str, object]:
        st = os.fstat(self.fd) if self.fd >= 0 else None
        extra: dict[str, object] = {
            "path": str(self.cfg.path),
            "file_allocated_bytes": st.st_blocks * 512 if st else 0,
        }
        if self.sealer is not None:
            extra["auth_failures"] = self.sealer.auth_failures
        return extra
