"""Tier `file`: compressed pages in a preallocated file on local storage (or on a block device,
which is never truncated nor preallocated: tierswap.blockdev), written with O_DIRECT.

O_DIRECT keeps swapped pages out of the page cache (caching them would defeat swapping) and
means writeback needs no page cache allocation under memory pressure. I/O goes through a
fixed pool of page-aligned, locked bounce buffers, which is also the tier's bound on queued
work: a writer waits for a buffer, never grows a queue. Batches start on 4 KiB boundaries
(the segment allocator aligns them), so each request's pages are one pwrite.

Shards share one file: after a 4 KiB header, shard k owns bytes
[HEADER + k * share, HEADER + (k + 1) * share).

With `encrypt = true` every 4 KiB block is sealed (tierswap/crypto.py); the key, counters and
tags are in the shard's kit (`secrets.T`), so a replacement shard reads the pages of a dead
one, and nothing that could open them ever reaches the disk.

The header marks the file as a tier file tierswap made (magic, version, a random id, the
capacity, a CRC). It is a block at the start rather than an extended attribute because it
must work the same for a tier on a block device, which has no xattrs of its own. An existing
file without it is never truncated, overwritten or chmod'ed (the config must say
``overwrite = true``), and a tier refuses to open a file without it.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from tierswap.config import Config, TierConfig, format_size, make_private_dir
from tierswap.hardening import dontdump
from tierswap.kit import KitError
from tierswap.tiers.base import SEG_SIZE, Store, TierError, shard_capacity

if TYPE_CHECKING:
    from tierswap.crypto import BlockSealer
    from tierswap.kit import Kit

_T = TypeVar("_T")

ALIGN = 4096
BUFFERS = 8  # bounce buffers per shard: at most this many file I/Os in flight
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _libc_fallocate() -> Any:
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


HEADER = 4096  # the tier-file header block; tier data starts after it
_MAGIC = b"tierswap-tier\x00\x00\x00"
_VERSION = 1
_HDR = struct.Struct("<16sII16sQQ")  # magic, version, header size, id, capacity, created


@dataclass(frozen=True)
class TierMark:
    id: bytes
    capacity: int
    created: int


class NotATierFile(OSError):
    """An existing file that tierswap did not make; it is left alone."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(errno.EEXIST, what, str(path))


def _pack_mark(mark: TierMark) -> bytes:
    body = _HDR.pack(_MAGIC, _VERSION, HEADER, mark.id, mark.capacity, mark.created)
    body += struct.pack("<I", zlib.crc32(body))
    return body + bytes(HEADER - len(body))


def _parse_mark(block: bytes) -> TierMark | None:
    n = _HDR.size
    if len(block) < n + 4 or not block.startswith(_MAGIC):
        return None
    _magic, version, size, ident, capacity, created = _HDR.unpack_from(block)
    (crc,) = struct.unpack_from("<I", block, n)
    if version != _VERSION or size != HEADER or crc != zlib.crc32(block[:n]):
        return None
    return TierMark(ident, capacity, created)


def read_mark(path: Path, *, follow: bool = False) -> TierMark | None:
    """The tier-file header of `path`, or None when it has none (not a tier file of ours).
    `follow`: for a block device, whose path (/dev/VG/LV) is often a symbolic link."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    try:
        return _parse_mark(os.pread(fd, HEADER, 0))
    finally:
        os.close(fd)


def prepare_file(path: Path, size: int, *, overwrite: bool = False, block: bool = False) -> str:
    """Create or resize and preallocate the tier file, `size` bytes of tier data after the
    header (called once by the supervisor); returns what was done, for the log.

    An existing file is used only if it is a regular file with our header, or if `overwrite`
    (the tier's ``overwrite = true``) says the operator wants it replaced; a symlink is
    never followed. Nothing is changed before that is decided. A block device (`block`) is
    never truncated or preallocated: only its header is written (`prepare_device`)."""
    if block:
        return prepare_device(path, size, overwrite=overwrite)
    make_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        created = False
    except FileNotFoundError:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        created = True
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotATierFile(path, "is a symbolic link") from None
        raise
    try:
        mark = None
        if not created:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotATierFile(path, "is not a regular file")
            mark = _parse_mark(os.pread(fd, HEADER, 0))
            if mark is None and not overwrite:
                raise NotATierFile(path, "exists and is not a tier file tierswap made "
                                         "(the tier's overwrite = true allows replacing it)")
        old_size = os.fstat(fd).st_size
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, HEADER + size)
        os.posix_fallocate(fd, 0, HEADER + size)
        new = TierMark(mark.id if mark else os.urandom(16), size,
                       mark.created if mark else int(time.time()))
        os.pwrite(fd, _pack_mark(new), 0)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    if created:
        return f"created {path} and preallocated {format_size(size)}"
    if mark is None:
        return f"replaced {path}, not a tier file (overwrite = true): {format_size(size)}"
    if old_size == HEADER + size and mark.capacity == size:
        return f"reusing the existing tier file {path} ({format_size(size)})"
    return (f"resized the tier file {path} from {format_size(max(0, old_size - HEADER))} "
            f"to {format_size(size)}")


def prepare_device(path: Path, size: int, *, overwrite: bool = False) -> str:
    """Check a block device tier and write its header; nothing else is written.

    Opened with O_EXCL: the kernel refuses it while mounted, active as swap or held by
    device mapper; `tierswap.blockdev.in_use` also checks its partitions."""
    from tierswap.blockdev import fd_size, in_use

    why = in_use(path)
    if why is not None:
        raise OSError(errno.EBUSY, f"block device is not free: {why}")
    fd = os.open(path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            raise NotATierFile(path, "is no longer a block device")
        have = fd_size(fd)
        if have < HEADER + size:
            raise OSError(errno.ENOSPC, f"the device holds {format_size(have)}, less than "
                                        f"{format_size(HEADER + size)}")
        mark = _parse_mark(os.pread(fd, HEADER, 0))
        if mark is None and not overwrite:
            raise NotATierFile(path, "has no tierswap tier header (the tier's overwrite = "
                                     "true allows using it)")
        new = TierMark(mark.id if mark else os.urandom(16), size,
                       mark.created if mark else int(time.time()))
        os.pwrite(fd, _pack_mark(new), 0)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    if mark is None:
        return f"took the block device {path} (overwrite = true): {format_size(size)}"
    return f"reusing the block device {path} ({format_size(size)} of {format_size(have)})"


class FileTier(Store):
    kind = "file"
    align = ALIGN
    sealer: BlockSealer | None = None  # when the config says encrypt = true
    discards = True  # a block device that can discard or write zeroes (blockdev.can_discard)

    def __init__(self, cfg: TierConfig, index: int, capacity: int, fd: int, origin: int) -> None:
        super().__init__(cfg, index, capacity)
        self.errors = 0
        self.fd = fd
        self.origin = origin
        self._bufsize = SEG_SIZE + 2 * ALIGN
        # populated now (and locked by mlockall): I/O never faults in a buffer under pressure
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self._pool = [mmap.mmap(-1, self._bufsize, flags=flags) for _ in range(BUFFERS)]
        for b in self._pool:
            dontdump(b)  # they hold page contents (plaintext, before sealing)
        self._free = trio.Semaphore(BUFFERS)
        self._limiter = trio.CapacityLimiter(BUFFERS)

    @classmethod
    async def create(cls, cfg: TierConfig, index: int, config: Config, shard: int,
                     kit: Kit | None = None) -> FileTier:
        assert cfg.path is not None
        share = shard_capacity(cfg, config)
        try:
            if read_mark(cfg.path, follow=cfg.block) is None:
                raise TierError(errno.EINVAL, f"tier {cfg.name}: {cfg.path} is not a tier file "
                                              "tierswap made")
            nofollow = 0 if cfg.block else os.O_NOFOLLOW
            fd = os.open(cfg.path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC | nofollow)
        except OSError as e:
            if isinstance(e, TierError):
                raise
            msg = f"tier {cfg.name}: cannot open {cfg.path}: {e.strerror}"
            raise TierError(e.errno or errno.EIO, msg) from None
        mode = os.fstat(fd).st_mode
        if stat.S_ISBLK(mode) != cfg.block:
            os.close(fd)
            raise TierError(errno.EINVAL, f"tier {cfg.name}: {cfg.path} changed between a "
                                          "file and a block device")
        if cfg.block:
            from tierswap.blockdev import fd_size

            have = fd_size(fd)
        else:
            have = os.fstat(fd).st_size
        if have < HEADER + (shard + 1) * share:
            os.close(fd)
            raise TierError(errno.ENOSPC, f"tier {cfg.name}: {cfg.path} is smaller than configured")
        tier = cls(cfg, index, share, fd, HEADER + shard * share)
        if cfg.block:
            from tierswap.blockdev import can_discard

            tier.discards = can_discard(fd)
        try:
            served = kit is not None and kit.has(f"life.{index}")  # by a process now dead
            if served and kit is not None and cfg.encrypt != kit.has(f"secrets.{index}"):
                raise KitError(f"tier {cfg.name}: the running device has this tier "
                               f"{'un' if cfg.encrypt else ''}encrypted; the configuration "
                               f"says encrypt = {str(cfg.encrypt).lower()} (change it only "
                               f"with a stop)")
            if cfg.encrypt:
                from tierswap.crypto import BlockSealer

                # in the kit: a replacement shard reads what this one sealed
                tier.sealer = BlockSealer.for_tier(cls.kind, cfg.name, shard, share, kit,
                                                   index, adopt=True if served else None)
        except BaseException:
            await tier.aclose()
            raise
        return tier

    async def _io(self, fn: Callable[[mmap.mmap], _T]) -> _T:
        async with self._free:
            buf = self._pool.pop()
            try:
                return await trio.to_thread.run_sync(fn, buf, limiter=self._limiter)
            except OSError as e:
                self.errors += 1
                raise TierError(e.errno or errno.EIO, f"tier {self.name}: {e.strerror}") from None
            finally:
                self._pool.append(buf)

    async def write(self, base: int, data: bytes | memoryview, life: int = 0) -> None:
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
        if self.cfg.block:
            from tierswap.blockdev import discard

            if self.discards:  # else nothing to give back: the device keeps its size
                await trio.to_thread.run_sync(discard, self.fd, self.origin + base, length)
            return
        await trio.to_thread.run_sync(punch_hole, self.fd, self.origin + base, length)

    async def aclose(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for b in self._pool:
            b.close()

    def extra_statistics(self) -> dict[str, object]:
        st = os.fstat(self.fd) if self.fd >= 0 else None
        extra: dict[str, object] = {"path": str(self.cfg.path)}
        if not self.cfg.block:  # a device's st_blocks says nothing about what it holds
            extra["file_allocated_bytes"] = st.st_blocks * 512 if st else 0
        if self.sealer is not None:
            extra["auth_failures"] = self.sealer.auth_failures
        return extra
