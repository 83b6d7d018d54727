"""The lane's requests one at a time: reads, writes, partial pages, discards, bad input."""

from __future__ import annotations

import errno
import struct

import pytest

from tests.lane.fuseproto import FILE_INO, OP, READ_IN, FuseError
from tests.lane.harness import PAGE, mixed_bytes, open_lane


async def test_write_read_roundtrip_through_both_tiers():
    async with open_lane(size=32 << 20, mem="4M", disk="32M") as rig:
        c = rig.client
        data = mixed_bytes(1, 24 << 20)  # more than the RAM tier holds: spills to the file
        for off in range(0, len(data), 256 << 10):
            assert await c.write(off, data[off:off + (256 << 10)]) == 256 << 10
        for off in range(0, len(data), 128 << 10):
            assert await c.read(off, 128 << 10) == data[off:off + (128 << 10)]
        st = rig.stats()
        assert st.tiers[0].pages > 0 and st.tiers[1].pages > 0
        assert st.forwarded > 0 and st.native > 0
        assert st.read_errors == st.write_errors == 0


async def test_partial_pages_and_unaligned_reads():
    async with open_lane() as rig:
        c = rig.client
        model = bytearray(rig.size)
        for off, n in ((100, 10), (4090, 20), (8192 + 512, 3000), (0, 4096 * 3 + 1)):
            buf = mixed_bytes(off, n)
            await c.write(off, buf)
            model[off:off + n] = buf
        for off, n in ((0, 20000), (4095, 2), (8000, 5000), (1, 1)):
            assert await c.read(off, n) == bytes(model[off:off + n])
        assert rig.stats().rmw > 0


async def test_discard_frees_and_reads_zero():
    async with open_lane() as rig:
        c = rig.client
        data = mixed_bytes(7, 64 * PAGE)
        await c.write(0, data)
        before = rig.stats().stored_pages
        await c.punch(PAGE + 100, 10 * PAGE)  # partial edges become zeros, whole pages leave
        model = bytearray(data)
        model[PAGE + 100:11 * PAGE + 100] = bytes(10 * PAGE)
        assert await c.read(0, len(data)) == bytes(model)
        assert rig.stats().stored_pages < before


async def test_out_of_range_and_malformed_requests_get_errnos():
    async with open_lane(size=1 << 20) as rig:
        c = rig.client
        with pytest.raises(FuseError) as e:
            await c.write((1 << 20) - 100, bytes(200))
        assert e.value.errno == errno.EFBIG
        assert await c.read(1 << 20, 4096) == b""  # EOF
        assert await c.read((1 << 20) - 10, 4096) == bytes(10)
        # a READ whose body is too short, a WRITE whose payload is missing, a huge size
        err, _ = await c.call(OP["READ"], FILE_INO, b"\0" * 8, raw=True)
        assert -err == errno.EINVAL
        err, _ = await c.call(OP["WRITE"], FILE_INO,
                              READ_IN.pack(FILE_INO, 0, 4096, 0, 0, 0, 0) + b"x", raw=True)
        assert -err == errno.EINVAL
        err, _ = await c.call(OP["READ"], FILE_INO,
                              READ_IN.pack(FILE_INO, 0, 1 << 30, 0, 0, 0, 0), raw=True)
        assert -err == errno.EINVAL
        err, _ = await c.call(OP["GETXATTR"], FILE_INO, b"\0" * 8 + b"user.x\0", raw=True)
        assert -err == errno.ENOSYS
        err, body = await c.call(OP["LOOKUP"], 1, b"swap.img\0", raw=True)
        assert err == 0 and struct.unpack_from("<Q", body)[0] == FILE_INO
        err, _ = await c.call(OP["LOOKUP"], 1, b"other\0", raw=True)
        assert -err == errno.ENOENT
        # the lane still serves
        await c.write(0, b"ok" * 2048)
        assert await c.read(0, 4) == b"okok"
