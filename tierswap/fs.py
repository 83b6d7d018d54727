"""Mounting a shard's one-file FUSE file system and handing its connection to the lane.

pyfuse3 mounts ``<run_dir>/shardK/mnt`` (without allow_other: only root, the mounting user, can
open ``swap.img``) and answers the kernel's INIT, then its main loop ends: `InitOnly.init` asks
it to stop right after INIT, before any other request can arrive (the kernel holds every other
request until INIT is answered). From then on every request of the connection is served by the
native lane (tierswap/native/fuse.c), from one cloned /dev/fuse fd per lane thread. The session
fd and the clones go into the shard's kit, so the connection outlives the shard process.

Unmounting is the last step of a stop, after swapoff: `unmount` detaches the mount point; the
connection ends when the last of its fds is closed. Nothing here ever unmounts a file system
whose loop device is still in swap (shard.py checks that first).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import logging
import os
import struct
from pathlib import Path

import pyfuse3
import trio

log = logging.getLogger(__name__)

FUSE_DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)
MNT_DETACH = 2


class MountError(Exception):
    """Mounting or handing over the FUSE connection failed; one line for the operator."""


class InitOnly(pyfuse3.Operations):
    """pyfuse3's part: answer INIT (in libfuse, which calls this), then stop reading."""

    def init(self) -> None:
        pyfuse3.terminate()


def session_fd() -> int:
    """The /dev/fuse fd libfuse opened for the mount (pyfuse3 does not expose it)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
    if len(found) != 1:
        raise MountError(f"expected one /dev/fuse fd after mounting, found {len(found)}")
    return found[0]


def clone(fd: int) -> int:
    """Another fd of the same FUSE connection: its reader gets requests from the same queue,
    and must answer each on the fd that read it."""
    c = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(c, FUSE_DEV_IOC_CLONE, struct.pack("I", fd))
    except OSError:
        os.close(c)
        raise
    return c


async def mount(mnt: Path, nclones: int) -> tuple[int, list[int]]:
    """Mount, let pyfuse3 answer INIT, return (session fd, clones for the lane threads)."""
    opts = set(pyfuse3.default_options) | {"fsname=tierswap", "subtype=tierswap"}
    try:
        pyfuse3.init(InitOnly(), str(mnt), opts)
    except RuntimeError as e:
        raise MountError(f"cannot mount {mnt}: {e}") from None
    with trio.fail_after(30):
        await pyfuse3.main(1, 1)  # one worker: it reads INIT, answers it and stops
    fd = session_fd()
    os.set_inheritable(fd, False)
    return fd, [clone(fd) for _ in range(nclones)]


def unmount(mnt: Path) -> None:
    """Detach the mount point (lazily: an open file keeps working until closed)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.umount2(str(mnt).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point (any more); ENOENT
            log.warning("unmount %s: %s", mnt, os.strerror(err))
