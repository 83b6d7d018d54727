"""A file tier on a block device (a partition, a logical volume), like zram's writeback device.

What this module knows about block devices, for config validation (`tierswap.config`) and the
file tier (`tierswap.tiers.file`):

* its size, from the BLKGETSIZE64 ioctl (st_size of a device node is 0);
* whether something else uses it: mounted (by device number in mountinfo, or as a mount
  source), active swap (/proc/swaps), held by another block device (device mapper, md, bcache:
  /sys/dev/block/M:N/holders), any of its partitions in one of those uses, or claimed
  exclusively by the kernel (an O_EXCL open fails with EBUSY). Each is refused with one line;
* how to give space back: BLKDISCARD, and where the device cannot discard, fallocate
  PUNCH_HOLE (the block layer's write-zeroes, which thin volumes and loop devices turn into
  freed space). A device that can do neither is not trimmed (`can_discard`).

Limits: the in-use check is a snapshot; something may mount the device after it (the kernel's
exclusive claim is only held while the supervisor prepares the tier). Linux only.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from pathlib import Path

BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
SYS_BLOCK = Path("/sys/dev/block")


def is_block_device(path: Path) -> bool:
    """Whether `path` (following symbolic links, as /dev/VG/LV is one) is a block device."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def device_size(path: Path | str) -> int:
    """Bytes of the block device at `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd_size(fd)
    finally:
        os.close(fd)


def fd_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return int(struct.unpack("Q", buf)[0])


def _majmin(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _related(rdev: int) -> list[tuple[str, int]]:
    """(name, device number) of the device and of each of its partitions."""
    out = []
    sysdir = SYS_BLOCK / _majmin(rdev)
    try:
        real = sysdir.resolve()
        out.append((real.name, rdev))
        for child in real.iterdir():
            dev = child / "dev"
            if (child / "partition").exists() and dev.exists():
                major, minor = dev.read_text().split(":")
                out.append((child.name, os.makedev(int(major), int(minor))))
    except OSError:
        out.append((Path(f"/dev/block/{_majmin(rdev)}").name, rdev))
    return out


def _swap_devices() -> set[int]:
    found = set()
    try:
        with open("/proc/swaps") as f:
            next(f, None)
            for line in f:
                name = line.split()[0].replace("\\040", " ")
                try:
                    st = os.stat(name)
                except OSError:
                    continue
                if stat.S_ISBLK(st.st_mode):
                    found.add(st.st_rdev)
    except OSError:
        pass
    return found


def _mounted() -> dict[int, str]:
    """Device number -> a mount point, from mountinfo (by device number and by source)."""
    found: dict[int, str] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                mnt = fields[4].replace("\\040", " ")
                major, minor = fields[2].split(":")
                found.setdefault(os.makedev(int(major), int(minor)), mnt)
                sep = fields.index("-") if "-" in fields else -1
                source = fields[sep + 2] if 0 <= sep < len(fields) - 2 else ""
                if source.startswith("/dev/"):
                    try:
                        st = os.stat(source)
                    except OSError:
                        continue
                    if stat.S_ISBLK(st.st_mode):
                        found.setdefault(st.st_rdev, mnt)
    except (OSError, ValueError):
        pass
    return found


def in_use(path: Path) -> str | None:
    """Why the block device at `path` is not free for a tier, or None when it is."""
    rdev = os.stat(path).st_rdev
    swaps, mounts = _swap_devices(), _mounted()
    for name, dev in _related(rdev):
        what = "it" if dev == rdev else f"its partition {name}"
        if dev in swaps:
            return f"{what} is in use as swap"
        if dev in mounts:
            return f"{what} is mounted on {mounts[dev]}"
        try:
            holders = sorted(os.listdir(SYS_BLOCK / _majmin(dev) / "holders"))
        except OSError:
            holders = []
        if holders:
            return f"{what} is held by {holders[0]} (device mapper, RAID or the like)"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return "it is in use (the kernel refuses an exclusive open)"
        raise
    os.close(fd)
    return None


def discard(fd: int, offset: int, length: int) -> None:
    """Give [offset, offset+length) of the device back: BLKDISCARD, else PUNCH_HOLE."""
    try:
        fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", offset, length))
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
            raise
    from tierswap.tiers.file import punch_hole  # the block layer's write-zeroes

    punch_hole(fd, offset, length)


def can_discard(fd: int) -> bool:
    """Whether the device says it can discard or write zeroes (sysfs queue limits)."""
    rdev = os.fstat(fd).st_rdev
    q = SYS_BLOCK / _majmin(rdev)
    for sub in ("queue", "../queue"):  # a partition's limits are its disk's
        for limit in ("discard_max_bytes", "write_zeroes_max_bytes"):
            try:
                if int((q / sub / limit).read_text()) > 0:
                    return True
            except (OSError, ValueError):
                continue
    return False
