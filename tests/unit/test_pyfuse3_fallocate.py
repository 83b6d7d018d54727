"""The fallocate handler that tierswap/contrib/pyfuse3-3.5.0-fallocate.patch adds to pyfuse3.

A tiny pyfuse3 file system (one regular file) is mounted in a subprocess running this
very file; the test process then calls the real fallocate(2) through ctypes on that file.
The file system appends every fallocate request it gets to a log file, one line per call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

FILE_NAME = "disk.img"
FILE_SIZE = 1 << 20
FILE_FH = 42  # file handle the file system hands out; must come back in fallocate()
ENOSPC_OFFSET = 1 << 19  # the file system fails requests at this offset with ENOSPC

MOUNT_TIMEOUT = 10.0
EXIT_TIMEOUT = 10.0

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """Call libc fallocate(2); return 0 or the errno it failed with."""
    libc = ctypes.CDLL(None, use_errno=True)
    func = getattr(libc, "fallocate64", None) or libc.fallocate
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    if func(fd, mode, offset, length) == 0:
        return 0
    return ctypes.get_errno()


def _read_log(log: Path) -> list[tuple[int, ...]]:
    if not log.exists():
        return []
    return [tuple(map(int, line.split())) for line in log.read_text().splitlines()]


def _unmount(mnt: Path) -> None:
    if not os.path.ismount(mnt):
        return
    res = subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    if res.returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=True)


def _mount(tmp_path: Path, implement_fallocate: bool) -> Iterator[tuple[Path, Path]]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "fallocate.log"
    errlog = tmp_path / "fs.stderr"
    variant = "fallocate" if implement_fallocate else "default"
    with errlog.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, __file__, str(mnt), str(log), variant],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mnt):
            if proc.poll() is not None:
                pytest.fail(f"file system exited with {proc.returncode}:\n{errlog.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"not mounted after {MOUNT_TIMEOUT}s:\n{errlog.read_text()}")
            time.sleep(0.01)
        yield mnt, log
    finally:
        try:
            _unmount(mnt)
        finally:
            try:
                proc.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    # The file system must have shut down by itself once unmounted.
    assert proc.returncode == 0, errlog.read_text()


@pytest.fixture
def fallocate_fs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    yield from _mount(tmp_path, implement_fallocate=True)


@pytest.fixture
def default_fs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    yield from _mount(tmp_path, implement_fallocate=False)


def test_fallocate_reaches_handler(fallocate_fs: tuple[Path, Path]) -> None:
    mnt, log = fallocate_fs
    punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    fd = os.open(mnt / FILE_NAME, os.O_RDWR)
    try:
        assert _fallocate(fd, punch, 4096, 8192) == 0
        assert _fallocate(fd, punch, 65536, 4096) == 0
        # An error raised by the handler reaches the caller, and does not
        # make the kernel give up on fallocate for this mount.
        assert _fallocate(fd, punch, ENOSPC_OFFSET, 4096) == errno.ENOSPC
        assert _fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 4096) == 0
    finally:
        os.close(fd)
    assert _read_log(log) == [
        (FILE_FH, punch, 4096, 8192),
        (FILE_FH, punch, 65536, 4096),
        (FILE_FH, punch, ENOSPC_OFFSET, 4096),
        (FILE_FH, FALLOC_FL_KEEP_SIZE, 0, 4096),
    ]
    assert os.stat(mnt / FILE_NAME).st_size == FILE_SIZE


def test_fallocate_not_implemented(default_fs: tuple[Path, Path]) -> None:
    mnt, log = default_fs
    punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    fd = os.open(mnt / FILE_NAME, os.O_RDWR)
    try:
        # Operations.fallocate() raises ENOSYS by default; the kernel turns that
        # into EOPNOTSUPP and remembers it for the mount (the second call is
        # answered by the kernel alone).
        assert _fallocate(fd, punch, 4096, 8192) == errno.EOPNOTSUPP
        assert _fallocate(fd, punch, 4096, 8192) == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    assert _read_log(log) == []


def _serve(mountpoint: str, log_path: str, variant: str) -> None:
    """Run the test file system until it is unmounted (subprocess side)."""
    import stat

    import pyfuse3
    import trio

    class OneFileFs(pyfuse3.Operations):
        inode = pyfuse3.ROOT_INODE + 1

        async def getattr(
            self, inode: int, ctx: pyfuse3.RequestContext | None = None
        ) -> pyfuse3.EntryAttributes:
            entry = pyfuse3.EntryAttributes()
            if inode == pyfuse3.ROOT_INODE:
                entry.st_mode = stat.S_IFDIR | 0o755
            elif inode == self.inode:
                entry.st_mode = stat.S_IFREG | 0o644
                entry.st_size = FILE_SIZE
            else:
                raise pyfuse3.FUSEError(errno.ENOENT)
            entry.st_ino = inode
            entry.st_uid = os.getuid()
            entry.st_gid = os.getgid()
            return entry

        async def lookup(
            self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
        ) -> pyfuse3.EntryAttributes:
            if parent_inode != pyfuse3.ROOT_INODE or name != FILE_NAME.encode():
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self.getattr(self.inode)

        async def open(
            self, inode: int, flags: int, ctx: pyfuse3.RequestContext
        ) -> pyfuse3.FileInfo:
            if inode != self.inode:
                raise pyfuse3.FUSEError(errno.EISDIR)
            return pyfuse3.FileInfo(fh=FILE_FH)

        async def release(self, fh: int) -> None:
            pass

    class FallocateFs(OneFileFs):
        async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
            fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{fh} {mode} {offset} {length}\n".encode())
            finally:
                os.close(fd)
            if offset == ENOSPC_OFFSET:
                raise pyfuse3.FUSEError(errno.ENOSPC)

    ops = FallocateFs() if variant == "fallocate" else OneFileFs()
    options = set(pyfuse3.default_options)
    options.add("fsname=test_pyfuse3_fallocate")
    pyfuse3.init(ops, mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    _serve(*sys.argv[1:])
