"""A file tier on a block device: a real loop device over a sparse file in a temp directory.

Checked against the kernel, not a stand-in: the size comes from BLKGETSIZE64, "in use" from an
exclusive open and a real mount, and a trim must free blocks of the sparse backing file (the
loop driver turns a discard into a hole). Needs root and losetup (skipped otherwise); no swap
is involved, so these do not need the machine's swap lock.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierswap import blockdev
from tierswap.config import Config, ConfigError, parse_config
from tierswap.tiers.base import SEG_SIZE
from tierswap.tiers.file import HEADER, FileTier, prepare_file, read_mark

MIB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("losetup") is None
                                or not os.path.exists("/dev/loop-control"),
                                reason="needs root and loop devices")


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(64 * MIB)  # sparse
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


def conf(tmp: Path, path: str, capacity: str = '"auto"', *, overwrite: bool = False,
         shards: int = 1, extra_tier: str = "") -> str:
    return f"""
[daemon]
state_dir = "{tmp}/state"
run_dir = "{tmp}/run"
[device]
size = "{16 * shards}M"
shards = {shards}
[[tier]]
name = "ram"
kind = "memory"
capacity = "4M"
[[tier]]
name = "disk"
kind = "file"
path = "{path}"
capacity = {capacity}
overwrite = {str(overwrite).lower()}
{extra_tier}
"""


def reject(text: str, *needles: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "t.toml", check_fs=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("t.toml: "), msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_size_from_the_device(loop: tuple[str, Path]) -> None:
    dev, _ = loop
    assert blockdev.device_size(dev) == 64 * MIB
    assert blockdev.is_block_device(Path(dev)) and not blockdev.is_block_device(Path("/dev/null"))


def test_config_of_a_block_device_tier(tmp_path: Path, loop: tuple[str, Path]) -> None:
    dev, backing = loop
    reject(conf(tmp_path, dev), "tier[1].path:", f"block device {dev} has no tierswap tier "
           "header", "overwrite = true")
    tier = parse_config(conf(tmp_path, dev, overwrite=True), check_fs=True).tier("disk")
    assert tier.block and tier.capacity == 63 * MIB  # 64M less the header, whole MiB
    assert tier.sizing == f"auto: the whole block device {dev}"
    reject(conf(tmp_path, dev, '"80M"', overwrite=True), "tier[1].capacity: 80M exceeds the "
           f"block device {dev}")
    assert parse_config(conf(tmp_path, dev, '"32M"', overwrite=True),
                        check_fs=True).tier("disk").capacity == 32 * MIB
    # prepared: the header is written, nothing else; the device is never truncated
    done = prepare_file(Path(dev), tier.capacity, overwrite=True, block=True)
    assert done == f"took the block device {dev} (overwrite = true): 63M"
    assert backing.stat().st_size == 64 * MIB
    assert backing.stat().st_blocks * 512 <= 64 * 1024  # only the header block was written
    mark = read_mark(Path(dev), follow=True)
    assert mark is not None and mark.capacity == 63 * MIB
    # from now on it is ours: no overwrite needed, and a symbolic link to it is fine (/dev/VG/LV)
    link = tmp_path / "lv"
    link.symlink_to(dev)
    again = parse_config(conf(tmp_path, str(link)), check_fs=True).tier("disk")
    assert again.block and again.capacity == 63 * MIB
    assert prepare_file(link, again.capacity, block=True).startswith("reusing the block device")
    kept = read_mark(Path(dev), follow=True)
    assert kept is not None and (kept.id, kept.created) == (mark.id, mark.created)
    # two tiers on one device, under two names
    second = f'[[tier]]\nname = "cold"\nkind = "file"\npath = "{dev}"\ncapacity = "8M"\n'
    reject(conf(tmp_path, str(link), extra_tier=second), "tier[2].path:", "also tier[1]")


def test_a_device_in_use_is_refused(tmp_path: Path, loop: tuple[str, Path]) -> None:
    dev, _ = loop
    fd = os.open(dev, os.O_RDONLY | os.O_EXCL)  # claimed, as a mount or swapon claims it
    try:
        reject(conf(tmp_path, dev, overwrite=True), f"tier[1].path: block device {dev} is not "
               "free: it is in use")
        with pytest.raises(OSError, match="not free"):
            prepare_file(Path(dev), 8 * MIB, overwrite=True, block=True)
    finally:
        os.close(fd)
    assert blockdev.in_use(Path(dev)) is None


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4")
def test_a_mounted_device_is_refused(tmp_path: Path, loop: tuple[str, Path]) -> None:
    dev, _ = loop
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True)
    try:
        reject(conf(tmp_path, dev, overwrite=True), f"block device {dev} is not free: it is "
               f"mounted on {mnt}")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_not_a_block_device_nor_a_file(tmp_path: Path) -> None:
    reject(conf(tmp_path, "/dev/null", '"8M"'), "tier[1].path: /dev/null is not a block device")
    # a volume that is not there yet: never a tier file created among the device nodes
    reject(conf(tmp_path, "/dev/vg-absent/lv", '"8M"'),
           "tier[1].path: /dev/vg-absent/lv is not a block device (does it exist yet?)")
    reject(conf(tmp_path, str(tmp_path), '"8M"'), f"tier[1].path: {tmp_path} is not a regular file")


def tier_config(tmp: Path, dev: str, shards: int) -> Config:
    return parse_config(conf(tmp, dev, '"32M"', overwrite=True, shards=shards), check_fs=False)


async def test_block_tier_io_and_discard(tmp_path: Path, loop: tuple[str, Path]) -> None:
    dev, backing = loop
    cfg = tier_config(tmp_path, dev, shards=2)
    t = cfg.tier("disk")
    prepare_file(Path(dev), t.capacity, overwrite=True, block=True)
    t0 = await FileTier.create(t, 1, cfg, 0)
    t1 = await FileTier.create(t, 1, cfg, 1)
    try:
        assert t0.discards and t1.origin == HEADER + 16 * MIB
        data = os.urandom(SEG_SIZE)
        await t0.write(SEG_SIZE, data, 1)
        await t1.write(0, b"one!" * 1024, 1)
        assert await t0.read(SEG_SIZE, SEG_SIZE) == data
        assert await t1.read(0, 4) == b"one!"
        with open(dev, "rb") as f:  # shard 1's slice of the device
            f.seek(HEADER + 16 * MIB)
            assert f.read(4) == b"one!"
        os.sync()
        before = backing.stat().st_blocks
        assert before * 512 >= SEG_SIZE
        await t0.trim(SEG_SIZE, SEG_SIZE)  # BLKDISCARD: the loop driver punches the hole
        os.sync()
        assert before - backing.stat().st_blocks >= SEG_SIZE // 512
        assert await t1.read(0, 4) == b"one!"  # the other shard's pages are untouched
        assert "file_allocated_bytes" not in t0.extra_statistics()
        assert t0.can_trim
    finally:
        await t0.aclose()
        await t1.aclose()
    assert backing.stat().st_size == 64 * MIB


def test_block_tier_too_small(loop: tuple[str, Path]) -> None:
    dev, _ = loop
    with pytest.raises(OSError, match="less than"):
        prepare_file(Path(dev), 100 * MIB, overwrite=True, block=True)
    assert read_mark(Path(dev), follow=True) is None  # nothing written
