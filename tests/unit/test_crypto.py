"""Block sealing (tierswap.crypto): what reaches storage is ciphertext that only this process
can open, only at the place it was written, and only in its latest version."""

from __future__ import annotations

import dataclasses
import errno
import os

import pytest

from tierswap.crypto import BLOCK, AuthenticationError, BlockSealer, padded
from tierswap.tiers.base import TierError

MiB = 1 << 20


def sealer(capacity: int = 4 * MiB, context: bytes = b"test/shard0") -> BlockSealer:
    return BlockSealer(capacity, context)


@pytest.mark.parametrize("n", [1, 100, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, MiB])
def test_round_trip_and_sub_ranges(n: int) -> None:
    s = sealer()
    data = os.urandom(n)
    base = 2 * BLOCK
    sealed = s.seal(base, data)
    assert len(sealed) == padded(n) and len(sealed) % BLOCK == 0
    if n >= 16:
        assert data[:16] not in bytes(sealed)
    raw = bytes(sealed)
    assert s.open(base, raw)[:n] == data
    # any sub-range opens from just the blocks around it
    for a, b in [(0, n), (n // 3, n // 3 + 1), (n - 1, n), (n // 2, n)]:
        start, end = s.span(base + a, b - a)
        plain = s.open(start, raw[start - base : end - base])
        assert plain[base + a - start : base + b - start] == data[a:b]


async def test_read_helper_slices() -> None:
    s = sealer()
    data = os.urandom(3 * BLOCK + 5)
    store = bytearray(4 * MiB)
    sealed = s.seal(BLOCK, data)
    store[BLOCK : BLOCK + len(sealed)] = sealed
    asked: list[tuple[int, int]] = []

    async def read_raw(start: int, n: int) -> bytes:
        asked.append((start, n))
        return bytes(store[start : start + n])

    assert await s.read(BLOCK + 3000, 3000, read_raw, "t") == data[3000:6000]
    assert asked == [(BLOCK, 2 * BLOCK)]  # only the two blocks touched
    assert await s.read(BLOCK + 5000, 3000, read_raw, "t") == data[5000:8000]
    assert asked[-1] == (2 * BLOCK, BLOCK)


def test_tamper_fails() -> None:
    s = sealer()
    raw = bytearray(s.seal(0, os.urandom(2 * BLOCK)))
    raw[BLOCK + 7] ^= 1
    assert s.open(0, raw[:BLOCK])  # the untouched block still opens
    with pytest.raises(AuthenticationError) as info:
        s.open(0, raw)
    assert info.value.offset == BLOCK


async def test_read_helper_counts_failures_as_eio() -> None:
    s = sealer()
    s.seal(0, b"x" * 100)

    async def zeros(start: int, n: int) -> bytes:
        return bytes(n)

    with pytest.raises(TierError) as info:
        await s.read(0, 100, zeros, "t")
    assert info.value.errno == errno.EIO and s.auth_failures == 1


def test_wrong_location_fails() -> None:
    s = sealer()
    a = bytes(s.seal(0, os.urandom(BLOCK)))
    b = bytes(s.seal(BLOCK, os.urandom(BLOCK)))
    with pytest.raises(AuthenticationError):  # block from offset 0 replayed at offset 4096
        s.open(BLOCK, a)
    with pytest.raises(AuthenticationError):
        s.open(0, b)
    # the same ciphertext and tag under another location's associated data
    other = BlockSealer(4 * MiB, b"test/shard0", key=b"k" * 32)
    blk = bytes(other.seal(0, b"page" * 1024))
    moved = BlockSealer(4 * MiB, b"test/shard0", key=b"k" * 32)
    ctrs, tags = other.tags.get(0, 1)
    moved.tags.set(1, ctrs[0], tags)
    with pytest.raises(AuthenticationError):
        moved.open(BLOCK, blk)
    shard1 = BlockSealer(4 * MiB, b"test/shard1", key=b"k" * 32)
    shard1.tags.set(0, ctrs[0], tags)
    with pytest.raises(AuthenticationError):  # another shard (context) at the same offset
        shard1.open(0, blk)
    assert other.open(0, blk) == b"page" * 1024  # and the control: in place it opens


def test_rollback_and_unsealed_fail() -> None:
    s = sealer()
    old = bytes(s.seal(0, b"old" * 1000))
    s.seal(0, b"new" * 1000)
    with pytest.raises(AuthenticationError):  # the store returned an earlier version
        s.open(0, old)
    with pytest.raises(AuthenticationError):  # never written here
        s.open(8 * BLOCK, bytes(BLOCK))
    s.forget(0, BLOCK)
    with pytest.raises(AuthenticationError):
        s.open(0, old)


def test_nonces_unique_and_keys_private() -> None:
    s = sealer(16 * MiB)
    for i in range(1000):
        s.seal((i % 4096) * BLOCK, b"same plaintext")
    s.seal(0, os.urandom(MiB))
    ctrs = s.tags.ctr[s.tags.ctr != 0]
    assert len(set(ctrs.tolist())) == len(ctrs)
    assert s._next == 1000 + 256 + 1  # one counter value per sealed block, never reused
    a, b = sealer(), sealer()
    assert bytes(a.seal(0, b"x" * BLOCK)) != bytes(b.seal(0, b"x" * BLOCK))  # fresh keys
    c1 = bytes(a.seal(BLOCK, b"y" * BLOCK))
    c2 = bytes(a.seal(BLOCK, b"y" * BLOCK))
    assert c1 != c2  # same key, place and text: the new nonce still changes everything


def test_bounds_checked() -> None:
    s = sealer(MiB)
    with pytest.raises(ValueError):
        s.seal(1, b"x")
    with pytest.raises(ValueError):
        s.seal(MiB - BLOCK, b"x" * (BLOCK + 1))
    with pytest.raises(ValueError):
        s.open(0, b"x" * 10)
    assert s.last_sealed(0, MiB) is None
    s.seal(5 * BLOCK, b"x" * (2 * BLOCK))
    assert s.last_sealed(0, MiB) == 6 * BLOCK and s.is_sealed(5 * BLOCK)


async def test_file_tier_encrypt(tmp_path) -> None:
    """`encrypt = true` on a file tier: the same sealing, ciphertext on disk, EIO on tamper."""
    from tierswap.config import parse_config
    from tierswap.tiers.file import HEADER, FileTier, prepare_file

    path = tmp_path / "disk.tier"
    cfg = parse_config(f"""
[daemon]
state_dir = "{tmp_path}/state"
run_dir = "{tmp_path}/run"
[device]
size = "16M"
[[tier]]
name = "disk"
kind = "file"
path = "{path}"
capacity = "8M"
encrypt = true
""", check_fs=False)
    prepare_file(path, 8 * MiB)
    tier = await FileTier.create(cfg.tiers[0], 0, cfg, 0)
    try:
        assert tier.sealer is not None
        text = b"PLAINTEXT-CANARY-" * 500
        await tier.write(BLOCK, text, 1)
        assert await tier.read(BLOCK + 3, 5000) == text[3:5003]
        on_disk = path.read_bytes()
        assert b"PLAINTEXT-CANARY-" not in on_disk
        assert on_disk[HEADER + BLOCK : HEADER + 2 * BLOCK] != bytes(BLOCK)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xff" * 16, HEADER + 2 * BLOCK + 100)
        finally:
            os.close(fd)
        assert await tier.read(BLOCK, 100) == text[:100]  # first block untouched
        with pytest.raises(TierError) as info:
            await tier.read(BLOCK, len(text))
        assert info.value.errno == errno.EIO
        assert tier.extra_statistics()["auth_failures"] == 1
    finally:
        await tier.aclose()
    plain = await FileTier.create(dataclasses.replace(cfg.tiers[0], encrypt=False), 0, cfg, 0)
    try:
        assert plain.sealer is None and "auth_failures" not in plain.extra_statistics()
    finally:
        await plain.aclose()
