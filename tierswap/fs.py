"""The FUSE file system: one directory holding one file, `swap.img`, backed by the device.

The file has the device's fixed size; opening it sets `direct_io`, so the kernel sends the loop
device's requests straight through (no second page cache) as large reads and writes. Discards
arrive as fallocate(PUNCH_HOLE | KEEP_SIZE), served by the fallocate handler our pyfuse3
patch adds (docs/pyfuse3-fallocate.md). No I/O here touches page contents beyond handing them
to the device, and nothing about contents is logged.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time

import lmdb
import pyfuse3

from tierswap.device import DeviceError, VirtualSwapDevice

log = logging.getLogger(__name__)

FILE_NAME = b"swap.img"
FILE_INODE = pyfuse3.ROOT_INODE + 1
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _errno(e: Exception, what: str) -> pyfuse3.FUSEError:
    """Map any failure to an errno: pyfuse3 lets non-FUSEError exceptions end the session,
    which would leave the kernel's swap device without a server."""
    if isinstance(e, DeviceError):
        return pyfuse3.FUSEError(e.errno or errno.EIO)
    if isinstance(e, lmdb.MapFullError):
        log.error("%s: the slot map is full", what)
        return pyfuse3.FUSEError(errno.ENOSPC)
    log.exception("%s failed unexpectedly", what)
    return pyfuse3.FUSEError(errno.EIO)


class SwapFS(pyfuse3.Operations):
    def __init__(self, device: VirtualSwapDevice) -> None:
        super().__init__()
        self.device = device
        self._t = int(time.time() * 1e9)
        self._uid = os.getuid()
        self._gid = os.getgid()

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid, a.st_gid = self._uid, self._gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._t
        a.entry_timeout = a.attr_timeout = 3600
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o700
            a.st_nlink = 2
            a.st_size = 0
        elif inode == FILE_INODE:
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
            a.st_size = self.device.size
            a.st_blksize = 4096
            a.st_blocks = self.device.statistics().stored_bytes // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return a

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == FILE_NAME:
            return self._attrs(FILE_INODE)
        if parent_inode == pyfuse3.ROOT_INODE and name in (b".", b".."):
            return self._attrs(pyfuse3.ROOT_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode, attr, fields, fh, ctx):
        # The device has a fixed size: refuse truncation to anything else, accept no-ops
        # (times, same size) so tools that touch the file do not fail.
        if fields.update_size and attr.st_size != self.device.size:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attrs(inode)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attrs(FILE_INODE), 1)

    async def releasedir(self, fh):
        return None

    async def open(self, inode, flags, ctx):
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == pyfuse3.ROOT_INODE else errno.ENOENT)
        if flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EPERM)
        return pyfuse3.FileInfo(fh=FILE_INODE, direct_io=True, keep_cache=False)

    async def read(self, fh, off, size):
        if off >= self.device.size:
            return b""  # EOF, as for any regular file
        try:
            return await self.device.read(off, min(size, self.device.size - off))
        except Exception as e:
            raise _errno(e, "read") from None

    async def write(self, fh, off, buf):
        try:
            return await self.device.write(off, buf)
        except Exception as e:
            raise _errno(e, "write") from None

    async def fallocate(self, fh, mode, offset, length):
        if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            try:
                await self.device.discard(offset, length)
            except Exception as e:
                raise _errno(e, "discard") from None
            return
        if mode == 0 and offset >= 0 and length > 0 and offset + length <= self.device.size:
            return  # "allocate" inside the fixed size: nothing to do, storage is thin
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP if mode else errno.EFBIG)

    async def flush(self, fh):
        return None

    async def fsync(self, fh, datasync):
        return None  # swap contents need not survive a crash; see docs/design.md

    async def release(self, fh):
        return None

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self.device.size // 4096
        s.f_bfree = s.f_bavail = max(0, s.f_blocks - self.device.statistics().stored_pages)
        s.f_files = s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s
